/* execguard BPF LSM backend (BCC): the kernel refuses what the policy has not allowed.
 *
 * bprm_check_security judges every exec, mmap_file and file_mprotect every PROT_EXEC
 * mapping of a file, from the verdict map that user space fills (exec_verdict.h, shared
 * with the fmod_ret backend); sb_mount and move_mount guard the scope's paths and
 * ptrace_access_check the programs in scope. Only files in scope are ever denied.
 *
 * No bpf_probe_read_kernel* anywhere, so the program loads under lockdown=confidentiality.
 * Invalidation: an open for write, a truncate or a setattr that changes the size drops its
 * verdict; chmod, chown and utimes keep it (EG_VF_ATTR); a rename or a link moves it (or
 * drops it, when verdicts depend on paths).
 */
#define EG_PATH_D_PATH 1 /* bprm_check_security is a hook bpf_d_path may be called from */
#include "exec_verdict.h"

LSM_PROBE(bprm_check_security, struct linux_binprm *bprm)
{
	return eg_judge_exec(bprm);
}

LSM_PROBE(mmap_file, struct file *file, unsigned long reqprot, unsigned long prot,
	  unsigned long flags)
{
	return eg_judge_map(file, EG_MSG_MMAP, prot);
}

LSM_PROBE(file_mprotect, struct vm_area_struct *vma, unsigned long reqprot, unsigned long prot)
{
	return eg_judge_mprotect(vma, prot);
}

LSM_PROBE(file_open, struct file *file)
{
	eg_forget_if_write(file);
	eg_note_open(file);
	return 0;
}

LSM_PROBE(path_truncate, const struct path *path)
{
	eg_forget_inode(eg_dentry_inode(EG_LOAD(const void *, path, EG_OFF_PATH_DENTRY)));
	return 0;
}

/* The hook gained a leading idmap argument in 6.8; the loader reads which from BTF. */
#if EG_SETATTR_ARGS == 3
LSM_PROBE(inode_setattr, struct mnt_idmap *idmap, struct dentry *dentry, struct iattr *attr)
#else
LSM_PROBE(inode_setattr, struct dentry *dentry, struct iattr *attr)
#endif
{
	eg_setattr(eg_dentry_inode(dentry), attr);
	return 0;
}

LSM_PROBE(inode_rename, struct inode *old_dir, struct dentry *old_dentry, struct inode *new_dir,
	  struct dentry *new_dentry)
{
	eg_renamed(old_dentry);
	eg_renamed(new_dentry); /* RENAME_EXCHANGE moves it too; a plain rename replaces it */
	return 0;
}

LSM_PROBE(inode_link, struct dentry *old_dentry, struct inode *dir, struct dentry *new_dentry)
{
	eg_renamed(old_dentry);
	return 0;
}

LSM_PROBE(sb_mount, const char *dev_name, const struct path *path, const char *type,
	  unsigned long flags, void *data)
{
	return eg_guard_mount(EG_LOAD(const void *, path, EG_OFF_PATH_DENTRY), flags);
}

LSM_PROBE(move_mount, const struct path *from_path, const struct path *to_path)
{
	return eg_guard_mount(EG_LOAD(const void *, to_path, EG_OFF_PATH_DENTRY), EG_MS_MOVE);
}

LSM_PROBE(ptrace_access_check, struct task_struct *child, unsigned int mode)
{
	return eg_guard_ptrace(child, mode);
}
