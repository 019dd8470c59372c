/* execguard fmod_ret backend (BCC): where BPF LSM is not active (bpf missing from lsm=), a
 * BPF_MODIFY_RETURN program on security_bprm_check returns -EPERM for an untrusted exec,
 * before any LSM runs. Same verdict map and logic as the LSM backend (exec_verdict.h).
 *
 * These are tracing programs (BPF trampolines): they need BTF and no lsm= change. The
 * invalidation hooks are fentry programs on the security_* functions that call the LSM hooks
 * exec_lsm.c uses. bpf_d_path is not allowed in security_bprm_check, so the exec's path is
 * taken in security_file_open (allowed there) for the FMODE_EXEC open that precedes it.
 * No bpf_probe_read_kernel* anywhere: it loads under lockdown=confidentiality.
 */
#include "exec_verdict.h"

/* ret: what earlier fmod_ret programs decided; a refusal there stands. */
KMOD_RET(security_bprm_check, struct linux_binprm *bprm, int ret)
{
	if (ret)
		return ret;
	return eg_judge_exec(bprm);
}

KFUNC_PROBE(security_file_open, struct file *file)
{
	eg_forget_if_write(file);
	eg_note_exec_path(file);
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
	eg_forget_inode(eg_dentry_inode(dentry));
	return 0;
}
