/* execguard BPF LSM backend (BCC): the kernel refuses an untrusted exec with EPERM.
 *
 * bprm_check_security looks the file up in the verdict map by (dev, ino) and trusts the
 * entry only while its change stamp (ctime ns, size) still matches (exec_verdict.h, shared
 * with the fmod_ret backend). Only files on devices in scope_devs are ever denied.
 *
 * No bpf_probe_read_kernel* anywhere, so the program loads under lockdown=confidentiality.
 * Invalidation: an open for write, a truncate or a setattr of a file drops its verdict.
 */
#define EG_PATH_D_PATH 1 /* bprm_check_security is a hook bpf_d_path may be called from */
#include "exec_verdict.h"

LSM_PROBE(bprm_check_security, struct linux_binprm *bprm)
{
	return eg_judge_exec(bprm);
}

LSM_PROBE(file_open, struct file *file)
{
	eg_forget_if_write(file);
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
	eg_forget_inode(eg_dentry_inode(dentry));
	return 0;
}
