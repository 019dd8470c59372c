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
#define EG_PROTECT 1     /* the self-protection hooks below (exec_verdict.h) */
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
	int ret = eg_guard_open(file);
	if (ret)
		return ret;
	eg_forget_if_write(file);
	eg_note_layer(file);
	eg_note_open(file);
	return 0;
}

LSM_PROBE(path_truncate, const struct path *path)
{
	const void *dentry = EG_LOAD(const void *, path, EG_OFF_PATH_DENTRY);
	int ret = eg_guard_change(dentry, eg_dentry_inode(dentry), EG_OPN_TRUNCATE);
	if (ret)
		return ret;
	eg_forget_inode(eg_dentry_inode(dentry));
	return 0;
}

/* The hook gained a leading idmap argument in 6.8; the loader reads which from BTF. */
#if EG_SETATTR_ARGS == 3
LSM_PROBE(inode_setattr, struct mnt_idmap *idmap, struct dentry *dentry, struct iattr *attr)
#else
LSM_PROBE(inode_setattr, struct dentry *dentry, struct iattr *attr)
#endif
{
	int ret = eg_guard_change(dentry, eg_dentry_inode(dentry), EG_OPN_SETATTR);
	if (ret)
		return ret;
	eg_setattr(eg_dentry_inode(dentry), attr);
	return 0;
}

LSM_PROBE(inode_rename, struct inode *old_dir, struct dentry *old_dentry, struct inode *new_dir,
	  struct dentry *new_dentry)
{
	int ret = eg_guard_change(old_dentry, eg_dentry_inode(old_dentry), EG_OPN_RENAME);
	if (!ret)
		ret = eg_guard_change(new_dentry, eg_dentry_inode(new_dentry), EG_OPN_RENAME);
	if (ret)
		return ret;
	eg_renamed(old_dentry);
	eg_renamed(new_dentry); /* RENAME_EXCHANGE moves it too; a plain rename replaces it */
	return 0;
}

LSM_PROBE(inode_link, struct dentry *old_dentry, struct inode *dir, struct dentry *new_dentry)
{
	/* a second name for a guarded file, or a name inside a guarded directory */
	int ret = eg_guard_change(old_dentry, eg_dentry_inode(old_dentry), EG_OPN_LINK);
	if (!ret)
		ret = eg_guard_change(new_dentry, 0, EG_OPN_LINK);
	if (ret)
		return ret;
	eg_renamed(old_dentry);
	return 0;
}

LSM_PROBE(inode_unlink, struct inode *dir, struct dentry *dentry)
{
	return eg_guard_change(dentry, eg_dentry_inode(dentry), EG_OPN_UNLINK);
}

LSM_PROBE(inode_rmdir, struct inode *dir, struct dentry *dentry)
{
	return eg_guard_change(dentry, eg_dentry_inode(dentry), EG_OPN_UNLINK);
}

LSM_PROBE(inode_create, struct inode *dir, struct dentry *dentry, umode_t mode)
{
	return eg_guard_change(dentry, 0, EG_OPN_CREATE);
}

LSM_PROBE(inode_mkdir, struct inode *dir, struct dentry *dentry, umode_t mode)
{
	return eg_guard_change(dentry, 0, EG_OPN_CREATE);
}

LSM_PROBE(inode_mknod, struct inode *dir, struct dentry *dentry, umode_t mode, dev_t dev)
{
	return eg_guard_change(dentry, 0, EG_OPN_CREATE);
}

LSM_PROBE(inode_symlink, struct inode *dir, struct dentry *dentry, const char *old_name)
{
	return eg_guard_change(dentry, 0, EG_OPN_CREATE);
}

LSM_PROBE(inode_permission, struct inode *inode, int mask)
{
	return eg_guard_permission(inode, mask);
}

LSM_PROBE(sb_mount, const char *dev_name, const struct path *path, const char *type,
	  unsigned long flags, void *data)
{
	const void *target = EG_LOAD(const void *, path, EG_OFF_PATH_DENTRY);
	int ret = (flags & EG_MS_REMOUNT) ? eg_guard_remount(target, path)
					  : eg_guard_mount_target(target, path, flags);
	return ret ? ret : eg_guard_mount(target, path, flags);
}

LSM_PROBE(move_mount, const struct path *from_path, const struct path *to_path)
{
	const void *target = EG_LOAD(const void *, to_path, EG_OFF_PATH_DENTRY);
	int ret = eg_guard_mount_target(target, to_path, EG_MS_MOVE);
	return ret ? ret : eg_guard_mount(target, to_path, EG_MS_MOVE);
}

struct vfsmount;
LSM_PROBE(sb_umount, struct vfsmount *mnt, int flags)
{
	return eg_guard_umount(mnt);
}

LSM_PROBE(ptrace_access_check, struct task_struct *child, unsigned int mode)
{
	int ret = eg_guard_ptrace_agent(child, mode);
	return ret ? ret : eg_guard_ptrace(child, mode);
}

/* ---- self-protection: the agent's process and its BPF objects (exec_verdict.h) ---- */

struct kernel_siginfo;
struct cred;
struct rlimit;
struct bpf_map;
struct bpf_prog;
union bpf_attr;

LSM_PROBE(task_kill, struct task_struct *p, struct kernel_siginfo *info, int sig,
	  const struct cred *cred)
{
	return eg_guard_signal(p, sig);
}

LSM_PROBE(task_setrlimit, struct task_struct *p, unsigned int resource, struct rlimit *new_rlim)
{
	return eg_guard_task(p, EG_TAMPER_TASK, EG_TASK_RLIMIT);
}

LSM_PROBE(task_setscheduler, struct task_struct *p)
{
	return eg_guard_task(p, EG_TAMPER_TASK, EG_TASK_SCHED);
}

LSM_PROBE(task_setnice, struct task_struct *p, int nice)
{
	return eg_guard_task(p, EG_TAMPER_TASK, EG_TASK_NICE);
}

LSM_PROBE(task_setioprio, struct task_struct *p, int ioprio)
{
	return eg_guard_task(p, EG_TAMPER_TASK, EG_TASK_IOPRIO);
}

LSM_PROBE(bpf, int cmd, union bpf_attr *attr, unsigned int size)
{
	return eg_guard_bpf(cmd, attr);
}

LSM_PROBE(bpf_map, struct bpf_map *map, fmode_t fmode)
{
	return eg_guard_id(EG_ID_MAP, EG_LOAD(__u32, map, EG_OFF_MAP_ID), 0,
			   !(fmode & EG_FMODE_WRITE));
}

LSM_PROBE(bpf_prog, struct bpf_prog *prog)
{
	const void *aux = EG_LOAD(const void *, prog, EG_OFF_PROG_AUX);
	return aux ? eg_guard_id(EG_ID_PROG, EG_LOAD(__u32, aux, EG_OFF_PROG_AUX_ID), 0, 0) : 0;
}

/* SIGIO and its F_SETSIG replacement reach a process without security_task_kill. */
struct fown_struct;
LSM_PROBE(file_send_sigiotask, struct task_struct *tsk, struct fown_struct *fown, int sig)
{
	return eg_guard_signal(tsk, sig ? sig : 29 /* SIGIO */);
}

LSM_PROBE(task_free, struct task_struct *task)
{
	eg_note_exit(task);
	return 0;
}

LSM_PROBE(inode_setxattr, void *idmap_or_userns, struct dentry *dentry, const char *name,
	  const void *value, size_t size, int flags)
{
	return eg_guard_change(dentry, eg_dentry_inode(dentry), EG_OPN_SETATTR);
}

LSM_PROBE(inode_removexattr, void *idmap_or_userns, struct dentry *dentry, const char *name)
{
	return eg_guard_change(dentry, eg_dentry_inode(dentry), EG_OPN_SETATTR);
}

/* chattr +i / +a on a guarded file (FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR): one compare for
 * every other ioctl on the host */
LSM_PROBE(file_ioctl, struct file *file, unsigned int cmd, unsigned long arg)
{
	if (cmd != 0x40086602 && cmd != 0x401c5820)
		return 0;
	return eg_guard_change(eg_file_dentry(file), eg_file_inode(file), EG_OPN_SETATTR);
}
