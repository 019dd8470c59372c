/* execguard fmod_ret backend (BCC): where BPF LSM is not active (bpf missing from lsm=),
 * BPF_MODIFY_RETURN programs on the security_* functions refuse what the BPF LSM backend
 * refuses, before any LSM runs. Same maps and logic as the LSM backend (exec_verdict.h).
 *
 * These are tracing programs (BPF trampolines): they need BTF and no lsm= change. The
 * invalidation hooks are fentry programs on the security_* functions that call the LSM hooks
 * exec_lsm.c uses. bpf_d_path is allowed only in security_file_open among them, so paths
 * are parked there (the exec's own FMODE_EXEC open precedes bprm_check).
 * No bpf_probe_read_kernel* anywhere: it loads under lockdown=confidentiality.
 *
 * ret: what earlier fmod_ret programs decided; a refusal there stands.
 */
#include "exec_verdict.h"

KMOD_RET(security_bprm_check, struct linux_binprm *bprm, int ret)
{
	if (ret)
		return ret;
	return eg_judge_exec(bprm);
}

/* prot: what the caller asked for (the LSM hook gets what the kernel will grant) */
KMOD_RET(security_mmap_file, struct file *file, unsigned long prot, unsigned long flags, int ret)
{
	if (ret)
		return ret;
	return eg_judge_map(file, EG_MSG_MMAP, eg_effective_prot(prot));
}

KMOD_RET(security_file_mprotect, struct vm_area_struct *vma, unsigned long reqprot,
	 unsigned long prot, int ret)
{
	if (ret)
		return ret;
	return eg_judge_mprotect(vma, prot);
}

KMOD_RET(security_sb_mount, const char *dev_name, const struct path *path, const char *type,
	 unsigned long flags, void *data, int ret)
{
	if (ret)
		return ret;
	return eg_guard_mount(EG_LOAD(const void *, path, EG_OFF_PATH_DENTRY), path, flags);
}

KMOD_RET(security_move_mount, const struct path *from_path, const struct path *to_path, int ret)
{
	if (ret)
		return ret;
	return eg_guard_mount(EG_LOAD(const void *, to_path, EG_OFF_PATH_DENTRY), to_path,
			      EG_MS_MOVE);
}

KMOD_RET(security_ptrace_access_check, struct task_struct *child, unsigned int mode, int ret)
{
	if (ret)
		return ret;
	return eg_guard_ptrace(child, mode);
}

KFUNC_PROBE(security_file_open, struct file *file)
{
	eg_forget_if_write(file);
	eg_note_layer(file);
	eg_note_open(file);
	return 0;
}

KFUNC_PROBE(security_path_truncate, const struct path *path)
{
	eg_forget_inode(eg_dentry_inode(EG_LOAD(const void *, path, EG_OFF_PATH_DENTRY)));
	return 0;
}

/* security_inode_setattr gained a leading idmap (or user namespace) argument after 6.1; the
 * loader counts its parameters in BTF. */
#if EG_SETATTR_ARGS == 3
KFUNC_PROBE(security_inode_setattr, void *idmap, struct dentry *dentry, struct iattr *attr)
#else
KFUNC_PROBE(security_inode_setattr, struct dentry *dentry, struct iattr *attr)
#endif
{
	eg_setattr(eg_dentry_inode(dentry), attr);
	return 0;
}

KFUNC_PROBE(security_inode_rename, struct inode *old_dir, struct dentry *old_dentry,
	    struct inode *new_dir, struct dentry *new_dentry)
{
	eg_renamed(old_dentry);
	eg_renamed(new_dentry);
	return 0;
}

KFUNC_PROBE(security_inode_link, struct dentry *old_dentry, struct inode *dir,
	    struct dentry *new_dentry)
{
	eg_renamed(old_dentry);
	return 0;
}
