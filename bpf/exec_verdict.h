/* execguard: the kernel-side exec verdict shared by the BPF LSM backend (exec_lsm.c) and the
 * fmod_ret backend (exec_fmod_ret.c): the maps, the lookup by (dev, ino) with the change
 * stamp (ctime ns, size), the enforce/monitor decision, the ring record, and the
 * invalidation helper. One copy, so both backends judge an exec the same way.
 *
 * Lockdown=confidentiality forbids bpf_probe_read_kernel*, so nothing here uses it: every
 * kernel read is a BTF-typed direct load (PTR_TO_BTF_ID plus a constant offset, which the
 * verifier checks against the kernel's BTF), and every helper is static so BCC does not
 * rewrite its loads into probe reads. The offsets come from the running kernel's BTF as -D
 * cflags (agent/sensors/bpf_lsm.py), not from the headers BCC compiled with.
 *
 * The including program chooses how the exec's path reaches the record:
 *   EG_PATH_D_PATH defined: bpf_d_path(&bprm->file->f_path) in the verdict hook itself (an
 *     LSM program on bprm_check_security, a hook bpf_d_path is allowed in);
 *   otherwise: eg_note_exec_path() from a hook where bpf_d_path is allowed (security_file_open
 *     of the exec's own open, __FMODE_EXEC, before bprm_check) parks it per thread.
 */
#ifndef EXECGUARD_EXEC_VERDICT_H
#define EXECGUARD_EXEC_VERDICT_H

#include "events.h"

#ifndef EG_RINGBUF_PAGES
#define EG_RINGBUF_PAGES 64
#endif
#ifndef EG_VERDICT_MAX
#define EG_VERDICT_MAX 65536
#endif
#ifndef EG_SCOPE_MAX
#define EG_SCOPE_MAX 64
#endif
#ifndef EG_PATH_SLOTS
#define EG_PATH_SLOTS 1024 /* threads between their exec open and bprm_check at once */
#endif
#ifndef EG_OFF_BPRM_FILE
#error "EG_OFF_* offsets must come from the kernel's BTF (agent/sensors/bpf_lsm.py)"
#endif

#define EG_EPERM 1
#define EG_FMODE_WRITE 0x2
#define EG_O_FMODE_EXEC 0x20 /* __FMODE_EXEC in file->f_flags: the open of an exec */
/* eg_config.flags for these programs (the kill bit of exec_sensor.c means "enforce" here) */
#define EG_LSM_CFG_ENFORCE 0x01      /* return -EPERM for deny verdicts in scope */
#define EG_LSM_CFG_DENY_UNKNOWN 0x02 /* and for unknown or stale files in scope */
/* eg_exec_event.flags bit set only by these programs: the hook returned -EPERM */
#define EG_F_EPERM 0x08

/* stats[] indexes */
#define EG_LSM_STAT_EXECS 0
#define EG_LSM_STAT_DROPS 1
#define EG_LSM_STAT_DENIED 2
#define EG_LSM_STAT_INVALIDATED 3
#define EG_LSM_STAT_IN_SCOPE 4
#define EG_LSM_STAT_N 5

struct linux_binprm;
struct file;
struct path;
struct dentry;
struct iattr;
struct mnt_idmap;
struct user_namespace;

BPF_RINGBUF_OUTPUT(events, EG_RINGBUF_PAGES);
BPF_HASH(verdicts, struct eg_file_key, struct eg_verdict, EG_VERDICT_MAX);
BPF_HASH(scope_devs, __u32, __u32, EG_SCOPE_MAX); /* kernel-encoded dev -> 1 */
BPF_ARRAY(config, struct eg_config, 1);
BPF_PERCPU_ARRAY(stats, __u64, EG_LSM_STAT_N);

#ifndef EG_PATH_D_PATH
/* The path of a thread's pending exec, from its FMODE_EXEC open (LRU: an exec that fails
 * between the open and bprm_check leaves an entry that ages out). */
struct eg_exec_path {
	__u64 ino;
	__u32 dev;
	__u32 _pad;
	char path[EG_PATH_LEN];
};
BPF_TABLE("lru_hash", __u64, struct eg_exec_path, exec_paths, EG_PATH_SLOTS);
BPF_PERCPU_ARRAY(path_scratch, struct eg_exec_path, 1); /* too big for the stack */
#endif

/* A typed direct load of base + off: stays a BTF load because every caller is static. */
#define EG_LOAD(type, base, off) (*(type *)((const char *)(base) + (off)))

static __always_inline void eg_count(int idx)
{
	__u64 *v = stats.lookup(&idx);
	if (v)
		*v += 1;
}

static __always_inline const void *eg_file_inode(const void *file)
{
	return file ? EG_LOAD(const void *, file, EG_OFF_FILE_INODE) : 0;
}

static __always_inline const void *eg_dentry_inode(const void *dentry)
{
	return dentry ? EG_LOAD(const void *, dentry, EG_OFF_DENTRY_INODE) : 0;
}

/* (dev, ino) of an inode; returns 0 when the inode or its super block is missing. */
static __always_inline int eg_inode_key(const void *inode, struct eg_file_key *key)
{
	if (!inode)
		return 0;
	const void *sb = EG_LOAD(const void *, inode, EG_OFF_INODE_SB);
	if (!sb)
		return 0;
	key->ino = EG_LOAD(__u64, inode, EG_OFF_INODE_INO);
	key->dev = EG_LOAD(__u32, sb, EG_OFF_SB_DEV);
	key->_pad = 0;
	return 1;
}

static __always_inline void eg_forget_inode(const void *inode)
{
	struct eg_file_key key = {};
	if (eg_inode_key(inode, &key) && verdicts.delete(&key) == 0)
		eg_count(EG_LSM_STAT_INVALIDATED);
}

/* A file opened for write may change: its verdict goes (an open for read costs one test). */
static __always_inline void eg_forget_if_write(const void *file)
{
	__u32 mode = EG_LOAD(__u32, file, EG_OFF_FILE_MODE);
	if (mode & EG_FMODE_WRITE)
		eg_forget_inode(eg_file_inode(file));
}

#ifndef EG_PATH_D_PATH
/* From security_file_open: park the path of an exec open of a file in scope for this thread's
 * bprm_check, which cannot call bpf_d_path itself. */
static __always_inline void eg_note_exec_path(const void *file)
{
	struct eg_file_key key = {};
	int zero = 0;
	/* f_flags, not f_mode: do_dentry_open() keeps only the access bits of the open flags in
	 * f_mode, so an exec open is told by __FMODE_EXEC in f_flags (as fsnotify does) */
	__u32 oflags = EG_LOAD(__u32, file, EG_OFF_FILE_FLAGS);
	if (!(oflags & EG_O_FMODE_EXEC) || !eg_inode_key(eg_file_inode(file), &key))
		return;
	__u32 dev = key.dev;
	if (!scope_devs.lookup(&dev))
		return;
	struct eg_exec_path *slot = path_scratch.lookup(&zero);
	if (!slot)
		return;
	slot->ino = key.ino;
	slot->dev = key.dev;
	slot->_pad = 0;
	if (bpf_d_path((struct path *)((const char *)file + EG_OFF_FILE_PATH), slot->path,
		       sizeof(slot->path)) < 0)
		return;
	__u64 tid = bpf_get_current_pid_tgid();
	exec_paths.update(&tid, slot);
}
#endif

/* The verdict for the exec of bprm's file: 0 or -EPERM, and a ring record for every exec in
 * scope. Only files on devices in scope_devs are ever denied. */
static __always_inline int eg_judge_exec(const void *bprm)
{
	const void *file = EG_LOAD(const void *, bprm, EG_OFF_BPRM_FILE);
	const void *inode = eg_file_inode(file);
	struct eg_file_key key = {};
	int zero = 0;

	eg_count(EG_LSM_STAT_EXECS);
	if (!eg_inode_key(inode, &key))
		return 0; /* no identity: not ours to judge (and never deny outside the scope) */
	__u32 dev = key.dev;
	if (!scope_devs.lookup(&dev))
		return 0; /* outside the scope: never denied, never reported */
	eg_count(EG_LSM_STAT_IN_SCOPE);

	__u64 size = EG_LOAD(__u64, inode, EG_OFF_INODE_SIZE);
	__u64 sec = EG_LOAD(__u64, inode, EG_OFF_INODE_CTIME_SEC);
#if EG_SZ_INODE_CTIME_NSEC == 8
	__u64 nsec = EG_LOAD(__u64, inode, EG_OFF_INODE_CTIME_NSEC);
#else
	/* 6.13+ multigrain timestamps keep a "queried" flag in bit 31 (I_CTIME_QUERIED) */
	__u64 nsec = EG_LOAD(__u32, inode, EG_OFF_INODE_CTIME_NSEC) & ~(1U << 31);
#endif
	__u64 ctime_ns = sec * 1000000000ULL + nsec;

	__u8 state;
	struct eg_verdict *v = verdicts.lookup(&key);
	if (!v)
		state = EG_STATE_UNKNOWN;
	else if (v->ctime_ns != ctime_ns || v->size != size)
		state = EG_STATE_STALE;
	else if (v->verdict == EG_VERDICT_ALLOW)
		state = EG_STATE_ALLOW;
	else
		state = EG_STATE_DENY; /* any other value fails closed */

	struct eg_config *cfg = config.lookup(&zero);
	__u32 flags = cfg ? cfg->flags : 0;
	__u8 evflags = EG_F_IN_SCOPE;
	if (state == EG_STATE_DENY ||
	    (state != EG_STATE_ALLOW && (flags & EG_LSM_CFG_DENY_UNKNOWN)))
		evflags |= EG_F_DENIED;
	int ret = 0;
	if ((evflags & EG_F_DENIED) && (flags & EG_LSM_CFG_ENFORCE)) {
		evflags |= EG_F_EPERM;
		ret = -EG_EPERM;
		eg_count(EG_LSM_STAT_DENIED);
	}

	__u64 pid_tgid = bpf_get_current_pid_tgid();
#ifndef EG_PATH_D_PATH
	struct eg_exec_path *parked = exec_paths.lookup(&pid_tgid);
#endif
	struct eg_exec_event *e = events.ringbuf_reserve(sizeof(struct eg_exec_event));
	if (!e) {
		eg_count(EG_LSM_STAT_DROPS); /* the verdict above stands: a full ring denies nothing more */
#ifndef EG_PATH_D_PATH
		if (parked)
			exec_paths.delete(&pid_tgid);
#endif
		return ret;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->op = EG_MSG_EXEC;
	e->state = state;
	e->flags = evflags;
	e->pid = pid_tgid >> 32;
	__u64 uid_gid = bpf_get_current_uid_gid();
	e->uid = (__u32)uid_gid;
	e->gid = (__u32)(uid_gid >> 32);
	e->boot_ns = bpf_ktime_get_boot_ns();
	e->dev = key.dev;
	e->ino = key.ino;
	e->ctime_ns = ctime_ns;
	e->size = size;
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	const void *task = bpf_get_current_task_btf();
	const void *parent = EG_LOAD(const void *, task, EG_OFF_TASK_REAL_PARENT);
	if (parent)
		e->ppid = EG_LOAD(__u32, parent, EG_OFF_TASK_TGID);
#ifdef EG_OFF_TASK_LOGINUID
	e->auid = EG_LOAD(__u32, task, EG_OFF_TASK_LOGINUID);
#else
	e->auid = 0xFFFFFFFF; /* kernel without CONFIG_AUDIT: no loginuid */
#endif
#ifdef EG_PATH_D_PATH
	/* The absolute path of the file being loaded (f_path is a struct inside struct file). */
	if (bpf_d_path((struct path *)((const char *)file + EG_OFF_FILE_PATH), e->path,
		       sizeof(e->path)) < 0)
		e->path[0] = 0;
#else
	/* The path the exec's open parked; a copy between map value and record (no probe read). */
	if (parked) {
		if (parked->ino == key.ino && parked->dev == key.dev)
			__builtin_memcpy(e->path, parked->path, sizeof(e->path));
		exec_paths.delete(&pid_tgid);
	}
#endif

	/* Wake user space only when it has work: a file to verify or a denial to record. */
	if (state == EG_STATE_ALLOW)
		events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	else
		events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	return ret;
}

#endif
