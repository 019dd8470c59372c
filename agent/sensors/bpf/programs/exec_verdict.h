/* execguard: the kernel side of the exec boundary, shared by the BPF LSM backend (exec_lsm.c)
 * and the fmod_ret backend (exec_fmod_ret.c). One copy, so both judge the same way:
 *
 *   where   is a file in scope? (eg_place: its filesystem's class, the directories above it)
 *   what    is its verdict?     (eg_state_of: the verdict map, the change stamp, writers;
 *                                an overlay file without one: its layer's, eg_layer_state)
 *   judge   an exec             (eg_judge_exec: deny unknown and denied files in scope,
 *                                and a dynamic loader run as a program)
 *           a mapping           (eg_judge_map: PROT_EXEC of a file in scope, by mmap or
 *                                mprotect, is an exec without execve)
 *   guard   mounts onto scope paths, ptrace of programs in scope
 *   forget  verdicts when the bytes may change (open for write, truncate, setattr) and,
 *           under path rules, when a name changes (rename, link)
 * docs/threat-model.md states what each of these closes and what it cannot see.
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
 *   otherwise: eg_note_open() from a hook where bpf_d_path is allowed (security_file_open
 *     of the exec's own open, __FMODE_EXEC, before bprm_check) parks it per thread.
 * Mappings take their path the same way for files that are denied on sight (eg_note_open
 * parks it per file when the file is fresh); others are named by user space from
 * /proc/PID/map_files.
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
#ifndef EG_SB_MAX
#define EG_SB_MAX 4096 /* filesystems with a class */
#endif
#ifndef EG_PATH_SLOTS
#define EG_PATH_SLOTS 1024 /* threads between their exec open and bprm_check at once */
#endif
#ifndef EG_LAYER_SLOTS
#define EG_LAYER_SLOTS 4096 /* overlay files whose layer file was opened lately */
#endif
#ifndef EG_WALK_MAX
#define EG_WALK_MAX 40 /* directory levels walked up from a file in a PARTIAL filesystem */
#endif
#ifndef EG_OFF_BPRM_FILE
#error "EG_OFF_* offsets must come from the kernel's BTF (agent/sensors/bpf_lsm.py)"
#endif

#define EG_EPERM 1
#define EG_FMODE_WRITE 0x2
#define EG_O_FMODE_EXEC 0x20 /* __FMODE_EXEC in file->f_flags: the open of an exec */
#define EG_PROT_READ 0x1
#define EG_PROT_EXEC 0x4
#define EG_READ_IMPLIES_EXEC 0x0400000 /* personality(2) flag */
#define EG_VM_EXEC 0x4
#define EG_S_IFMT 0170000
#define EG_S_IFDIR 0040000
#define EG_MS_REMOUNT 32
#define EG_MS_BIND 4096
#define EG_MS_MOVE 8192
#define EG_MS_PROPAGATION ((1 << 16) | (1 << 17) | (1 << 19) | (1 << 20)) /* UNBINDABLE..SHARED */
#define EG_PTRACE_MODE_ATTACH 0x02
#define EG_OVERLAYFS_MAGIC 0x794c7630

/* eg_config.flags for these programs (the kill bit of exec_sensor.c means "enforce" here) */
#define EG_LSM_CFG_ENFORCE 0x01      /* return -EPERM for deny verdicts in scope */
#define EG_LSM_CFG_DENY_UNKNOWN 0x02 /* and for unknown or stale files in scope */
#define EG_LSM_CFG_LOADER 0x04       /* a dynamic loader run as a program is denied */
#define EG_LSM_CFG_MAPS 0x08         /* judge PROT_EXEC mappings of files in scope */
#define EG_LSM_CFG_PATHS 0x10        /* verdicts depend on paths: a rename or link drops them */
#define EG_LSM_CFG_MOUNTS 0x20       /* refuse mounts onto paths in scope */
#define EG_LSM_CFG_PTRACE 0x40       /* refuse ptrace attach to programs in scope */
#define EG_LSM_CFG_UNSEEN_OUT 0x80   /* filesystems without a class are out of scope (weaker) */
#define EG_LSM_CFG_STRICT_MAPS 0x100 /* the pre-scan verified the whole scope: a mapping of a
				      * file without a verdict is denied, untouched or not */
#define EG_LSM_CFG_PROTECT 0x200     /* self-protection: the agent, its objects and files are
				      * refused to everyone else (EG_PROTECT programs only) */
#define EG_LSM_CFG_BPF_LOAD 0x400    /* and nobody else loads programs that run in other
				      * processes' context (tracing, kprobes, LSM, ...) */

/* sb_class values: the class in the low byte (agent/scope/classify.py FsClass) */
#define EG_SB_OUT 1
#define EG_SB_IN 2
#define EG_SB_PARTIAL 3
#define EG_SB_CLASS_MASK 0xff
#define EG_SB_DYNAMIC 0x100 /* appeared after the agent started: its files are all fresh */

/* stats[] indexes */
#define EG_LSM_STAT_EXECS 0
#define EG_LSM_STAT_DROPS 1
#define EG_LSM_STAT_DENIED 2
#define EG_LSM_STAT_INVALIDATED 3
#define EG_LSM_STAT_IN_SCOPE 4
#define EG_LSM_STAT_MAPS 5          /* PROT_EXEC mappings of files in scope judged */
#define EG_LSM_STAT_MAPS_DENIED 6
#define EG_LSM_STAT_LOADER_DENIED 7
#define EG_LSM_STAT_MOUNTS_REFUSED 8
#define EG_LSM_STAT_PTRACE_REFUSED 9
#define EG_LSM_STAT_EPOCHS 10       /* directory renames under path rules */
#define EG_LSM_STAT_ORPHAN_DENIED 11 /* denials after the agent's process was freed */
#define EG_LSM_STAT_TAMPER 12       /* attempts on the agent refused (self-protection) */
#define EG_LSM_STAT_N 13

struct linux_binprm;
struct file;
struct path;
struct dentry;
struct inode;
struct iattr;
struct mnt_idmap;
struct user_namespace;
struct vm_area_struct;
struct task_struct;

/* Run-time state: the epoch the programs move, the start time user space sets. */
struct eg_runtime {
	__u32 epoch;          /* +1 per directory rename while verdicts depend on paths */
	__u32 _pad;
	__u64 fresh_after_ns; /* CLOCK_REALTIME when the agent started: a ctime at or after it
			       * means the file was written, created, renamed or chmod'ed since */
	__u64 agent_gone_ns;  /* boot clock when the agent's process was freed (0: it lives;
			       * bpf-lsm's task_free hook sets it): pinned programs outlive
			       * their agent, and count what they deny alone */
	__u32 pin_dev;        /* kernel dev of the bpffs holding the pins (self-protection) */
	__u32 agent_mnt_ns;   /* the inode number of the agent's mount namespace */
};

#ifndef EG_TICK_NS
#define EG_TICK_NS 10000000ULL /* 1e9 / USER_HZ: /proc/PID/stat counts start times in ticks */
#endif

BPF_RINGBUF_OUTPUT(events, EG_RINGBUF_PAGES);
BPF_HASH(verdicts, struct eg_file_key, struct eg_verdict, EG_VERDICT_MAX);
BPF_HASH(sb_class, __u32, __u32, EG_SB_MAX);                  /* kernel dev -> EG_SB_* */
BPF_HASH(scope_dirs, struct eg_file_key, __u32, EG_SCOPE_MAX); /* scope roots in PARTIAL fs */
BPF_HASH(loaders, struct eg_file_key, __u32, 64);              /* ld.so and friends */
BPF_HASH(exempt, __u32, __u64, 64); /* the agent's tgid -> its start time in ticks */
BPF_ARRAY(config, struct eg_config, 1);
BPF_ARRAY(runtime, struct eg_runtime, 1);
BPF_PERCPU_ARRAY(stats, __u64, EG_LSM_STAT_N);

/* A path parked for a record that a later hook sends: per thread for an exec (from its
 * FMODE_EXEC open), per file for a fresh file opened before it is mapped. */
struct eg_parked_path {
	__u64 ino;
	__u32 dev;
	__u32 _pad;
	char path[EG_PATH_LEN];
};
BPF_TABLE("lru_hash", __u64, struct eg_parked_path, exec_paths, EG_PATH_SLOTS);
BPF_TABLE("lru_hash", struct eg_file_key, struct eg_parked_path, open_paths, EG_PATH_SLOTS);
BPF_PERCPU_ARRAY(path_scratch, struct eg_parked_path, 1); /* too big for the stack */

/* An overlay file's layer file: the real file underneath, which holds its bytes, seen when
 * the overlay opened it (eg_note_layer), with both files' stamps of that moment. */
struct eg_layer {
	struct eg_file_key real;
	__u64 real_file;  /* the open real file, as a number: the overlay file that opened it
			   * holds it (file->private_data) for as long as it is open */
	__u64 real_ctime_ns;
	__u64 real_mtime_ns;
	__u64 real_size;
	__u64 ctime_ns; /* the overlay inode's own stamp */
	__u64 size;
	__u32 writers;  /* the real file was open for write */
	__u32 _pad;
};
BPF_TABLE("lru_hash", struct eg_file_key, struct eg_layer, layers, EG_LAYER_SLOTS);

/* A typed direct load of base + off: stays a BTF load because every caller is static. */
#define EG_LOAD(type, base, off) (*(type *)((const char *)(base) + (off)))

static __always_inline void eg_count(int idx)
{
	__u64 *v = stats.lookup(&idx);
	if (v)
		*v += 1;
}

static __always_inline __u32 eg_cfg(void)
{
	int zero = 0;
	struct eg_config *cfg = config.lookup(&zero);
	return cfg ? cfg->flags : 0;
}

static __always_inline const void *eg_file_inode(const void *file)
{
	return file ? EG_LOAD(const void *, file, EG_OFF_FILE_INODE) : 0;
}

static __always_inline const void *eg_file_dentry(const void *file)
{
	return file ? EG_LOAD(const void *, file, EG_OFF_FILE_PATH + EG_OFF_PATH_DENTRY) : 0;
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

/* Is this task (a thread) the agent? Its tgid is in the exempt map and, where the program
 * knows where a task's start time is, its process started when the agent did: pinned
 * programs outlive the agent, and its pid may come back as someone else's. */
static __always_inline int eg_task_is_agent(const void *task)
{
	if (!task)
		return 0;
	__u32 tgid = EG_LOAD(__u32, task, EG_OFF_TASK_TGID);
	__u64 *start = exempt.lookup(&tgid);
	if (!start)
		return 0;
#ifdef EG_OFF_TASK_START_BOOTTIME
	const void *leader = EG_LOAD(const void *, task, EG_OFF_TASK_GROUP_LEADER);
	if (!leader)
		return 0;
	return EG_LOAD(__u64, leader, EG_OFF_TASK_START_BOOTTIME) / EG_TICK_NS == *start;
#else
	return 1;
#endif
}

static __always_inline int eg_exempt(void)
{
	return eg_task_is_agent(bpf_get_current_task_btf());
}

/* The agent, or a process it started (its helpers: mount, auditctl): one level is enough,
 * the agent starts nothing that starts more. */
static __always_inline int eg_exempt_or_child(void)
{
	const void *task = bpf_get_current_task_btf();
	if (eg_task_is_agent(task))
		return 1;
	return eg_task_is_agent(EG_LOAD(const void *, task, EG_OFF_TASK_REAL_PARENT));
}

/* The agent's process is gone (freed: not stopped, frozen or slow): the pinned programs
 * enforce alone. Only bpf-lsm sees the death (task_free); elsewhere this stays 0. */
static __always_inline int eg_orphaned(void)
{
	int zero = 0;
	struct eg_runtime *rt = runtime.lookup(&zero);
	return rt && rt->agent_gone_ns;
}

/* ------------------------------------------------------------------------------- where */

/* Where a file stands, for the judge and the record. */
struct eg_where {
	struct eg_file_key key;
	__u32 in_scope;
	__u32 flags; /* EG_F_PATHLESS, EG_F_FRESH */
};

/* Is the file at dentry (of inode) in scope? A file with no name is, a filesystem without a
 * class is (unless configured otherwise), a PARTIAL filesystem's file is when a directory
 * above it within that filesystem is a scope root: the walk follows d_parent, not mounts,
 * so a bind mount, another mount namespace or a chroot shows the same ancestors. A walk
 * that ends away from the filesystem's root (a disconnected dentry) or runs out of levels
 * counts as in scope. */
static __always_inline int eg_place(const void *dentry, const void *inode, struct eg_where *w)
{
	w->in_scope = 0;
	w->flags = 0;
	if (!eg_inode_key(inode, &w->key)) {
		w->in_scope = 1; /* no identity: nothing proves it is outside */
		return 1;
	}
	if (EG_LOAD(__u32, inode, EG_OFF_INODE_NLINK) == 0) {
		w->flags |= EG_F_PATHLESS | EG_F_FRESH;
		w->in_scope = 1;
		return 1;
	}
	__u32 dev = w->key.dev;
	__u32 *cls = sb_class.lookup(&dev);
	if (!cls) {
		w->flags |= EG_F_FRESH;
		w->in_scope = !(eg_cfg() & EG_LSM_CFG_UNSEEN_OUT);
		return w->in_scope;
	}
	__u32 c = *cls;
	if (c & EG_SB_DYNAMIC)
		w->flags |= EG_F_FRESH;
	c &= EG_SB_CLASS_MASK;
	if (c == EG_SB_OUT)
		return 0;
	if (c != EG_SB_PARTIAL || !dentry) {
		w->in_scope = 1;
		return 1;
	}
	const void *sb = EG_LOAD(const void *, inode, EG_OFF_INODE_SB);
	const void *sroot = EG_LOAD(const void *, sb, EG_OFF_SB_ROOT);
	const void *d = dentry;
	for (int i = 0; i < EG_WALK_MAX; i++) {
		const void *di = EG_LOAD(const void *, d, EG_OFF_DENTRY_INODE);
		if (di) {
			struct eg_file_key k = {};
			k.ino = EG_LOAD(__u64, di, EG_OFF_INODE_INO);
			k.dev = dev;
			if (scope_dirs.lookup(&k)) {
				w->in_scope = 1;
				return 1;
			}
		}
		const void *p = EG_LOAD(const void *, d, EG_OFF_DENTRY_PARENT);
		if (!p || p == d) {
			w->in_scope = d != sroot; /* the top of a disconnected tree: fail closed */
			return w->in_scope;
		}
		d = p;
	}
	w->in_scope = 1; /* deeper than we walk: fail closed */
	return 1;
}

/* ------------------------------------------------------------------------------- what */

static __always_inline __u64 eg_ctime(const void *inode)
{
	__u64 sec = EG_LOAD(__u64, inode, EG_OFF_INODE_CTIME_SEC);
#if EG_SZ_INODE_CTIME_NSEC == 8
	__u64 nsec = EG_LOAD(__u64, inode, EG_OFF_INODE_CTIME_NSEC);
#else
	/* 6.13+ multigrain timestamps keep a "queried" flag in bit 31 (I_CTIME_QUERIED) */
	__u64 nsec = EG_LOAD(__u32, inode, EG_OFF_INODE_CTIME_NSEC) & ~(1U << 31);
#endif
	return sec * 1000000000ULL + nsec;
}

static __always_inline __u64 eg_mtime(const void *inode)
{
	__u64 sec = EG_LOAD(__u64, inode, EG_OFF_INODE_MTIME_SEC);
#if EG_SZ_INODE_MTIME_NSEC == 8
	__u64 nsec = EG_LOAD(__u64, inode, EG_OFF_INODE_MTIME_NSEC);
#else
	__u64 nsec = EG_LOAD(__u32, inode, EG_OFF_INODE_MTIME_NSEC);
#endif
	return sec * 1000000000ULL + nsec;
}

static __always_inline __u32 eg_epoch(void)
{
	int zero = 0;
	struct eg_runtime *rt = runtime.lookup(&zero);
	return rt ? rt->epoch : 0;
}

/* The verdict map's word on this version of a file, by its key and stamp. A verdict
 * written in another rename epoch, or whose stamp moved, is stale: unknown again. After a
 * rename or a link (which move the ctime, not the bytes) the entry is marked and (mtime,
 * size) stand instead: every write that could keep the mtime (an open for write, a
 * truncate, a setattr) drops the entry outright. */
static __always_inline __u8 eg_stamp_state(struct eg_file_key *key, __u64 ctime_ns,
					   __u64 mtime_ns, __u64 size)
{
	struct eg_verdict *v = verdicts.lookup(key);
	if (!v)
		return EG_STATE_UNKNOWN;
	if (v->epoch != eg_epoch() || v->size != size)
		return EG_STATE_STALE;
	if (v->ctime_ns != ctime_ns && !(v->flags & EG_VF_ATTR) &&
	    !((v->flags & EG_VF_MOVED) && v->mtime_ns == mtime_ns))
		return EG_STATE_STALE;
	return v->verdict == EG_VERDICT_ALLOW ? EG_STATE_ALLOW : EG_STATE_DENY;
}

static __always_inline __u8 eg_state_of(const void *inode, struct eg_file_key *key,
					__u64 ctime_ns, __u64 size)
{
	return eg_stamp_state(key, ctime_ns, eg_mtime(inode), size);
}

/* ------------------------------------------------------------------------------- layers */

/* overlayfs (5.x to 6.5) opens an overlay file's layer file inside the overlay file's own
 * open, with the overlay's path and the layer's inode (open_with_fake_path), and keeps it
 * as the overlay file's private_data: every read and mapping of the overlay file goes to
 * it. Such a file (its dentry shows another inode than its own, on an overlay) is made by
 * the kernel alone. Its pairing is noted, when the layer file has a verdict at all: an
 * exec of the overlay file, or a mapping of it, that has no verdict of its own is then
 * judged by the layer file's verdict, if the overlay file being judged holds that very
 * real file (so two overlay inodes that share a number, a ctime and a size, which a FUSE
 * layer can report at will, never stand for each other). A new container's overlay over
 * a verified layer runs at its first start. 6.6+ opens a "backing file" with the layer's
 * own path instead: nothing is noted there, and an overlay file is judged by its own
 * verdict alone, as before. */
static __always_inline void eg_note_layer(const void *file)
{
	const void *real = eg_file_inode(file);
	const void *shown = eg_dentry_inode(eg_file_dentry(file));
	if (!real || !shown || real == shown)
		return;
	const void *sb = EG_LOAD(const void *, shown, EG_OFF_INODE_SB);
	if (!sb || EG_LOAD(unsigned long, sb, EG_OFF_SB_MAGIC) != EG_OVERLAYFS_MAGIC)
		return;
	struct eg_file_key key = {};
	struct eg_layer l = {};
	if (!eg_inode_key(shown, &key) || !eg_inode_key(real, &l.real))
		return;
	if (!verdicts.lookup(&l.real))
		return; /* nothing to judge it by: no pairing (and no LRU churn) */
	l.real_file = (__u64)file;
	l.real_ctime_ns = eg_ctime(real);
	l.real_mtime_ns = eg_mtime(real);
	l.real_size = EG_LOAD(__u64, real, EG_OFF_INODE_SIZE);
	l.ctime_ns = eg_ctime(shown);
	l.size = EG_LOAD(__u64, shown, EG_OFF_INODE_SIZE);
	l.writers = EG_LOAD(__s32, real, EG_OFF_INODE_WRITECOUNT) > 0;
	layers.update(&key, &l);
}

/* The state of the overlay file ``file`` (key, stamp) from its layer file's verdict:
 * unknown unless ``file`` holds the very real file noted (its private_data), the overlay
 * inode's stamp is the one noted, the layer file had no writers then, and that file's
 * verdict holds for the stamp noted. A write to the layer file since dropped its verdict
 * (the open for write, a truncate); a copy-up opens a new real file. Not under path rules:
 * the layer file's verdict was earned at its own path. */
static __always_inline __u8 eg_layer_state(const void *file, struct eg_file_key *key,
					   __u64 ctime_ns, __u64 size, __u32 flags)
{
	if ((flags & EG_LSM_CFG_PATHS) || !file)
		return EG_STATE_UNKNOWN;
	struct eg_layer *found = layers.lookup(key);
	if (!found)
		return EG_STATE_UNKNOWN;
	struct eg_layer l = *found; /* an LRU slot may be reused meanwhile: check a copy */
	if (l.real_file != EG_LOAD(__u64, file, EG_OFF_FILE_PRIVATE_DATA) || l.writers ||
	    l.ctime_ns != ctime_ns || l.size != size)
		return EG_STATE_UNKNOWN;
	__u8 state = eg_stamp_state(&l.real, l.real_ctime_ns, l.real_mtime_ns, l.real_size);
	return state == EG_STATE_STALE ? EG_STATE_UNKNOWN : state;
}

/* Changed since the agent started (created, written, renamed, chmod'ed: every one of them
 * sets the ctime, which no system call sets back): such a file is never given the benefit
 * of the doubt at a mapping. A file changed while no agent ran looks untouched. */
static __always_inline int eg_changed_since_start(__u64 ctime_ns)
{
	int zero = 0;
	struct eg_runtime *rt = runtime.lookup(&zero);
	return !rt || ctime_ns >= rt->fresh_after_ns;
}

/* ------------------------------------------------------------------------------- forget */

static __always_inline void eg_forget_key(struct eg_file_key *key)
{
	if (verdicts.delete(key) == 0)
		eg_count(EG_LSM_STAT_INVALIDATED);
}

static __always_inline void eg_forget_inode(const void *inode)
{
	struct eg_file_key key = {};
	if (eg_inode_key(inode, &key))
		eg_forget_key(&key);
}

#define EG_ATTR_SIZE (1 << 3) /* iattr.ia_valid: a truncate or extension */

/* A setattr: one that changes the size drops the verdict (the bytes change). Any other
 * (chmod, chown, utimes) moves the ctime, not the bytes: a current verdict stays, marked
 * EG_VF_ATTR (size alone then stands for the bytes), so a signed file whose mode changed
 * still runs without asking user space again. Every way to change the bytes later (an open
 * for write, a truncate) drops the entry outright. iattr.ia_valid is its first member. */
static __always_inline void eg_setattr(const void *inode, const void *attr)
{
	struct eg_file_key key = {};
	if (!eg_inode_key(inode, &key))
		return;
	__u32 valid = attr ? EG_LOAD(__u32, attr, 0) : EG_ATTR_SIZE;
	__u8 state = eg_state_of(inode, &key, eg_ctime(inode), EG_LOAD(__u64, inode, EG_OFF_INODE_SIZE));
	struct eg_verdict *v = verdicts.lookup(&key);
	if (!v)
		return;
	/* only a verdict still current for these bytes (a chmod after a chmod included) */
	if (!(valid & EG_ATTR_SIZE) && (state == EG_STATE_ALLOW || state == EG_STATE_DENY))
		v->flags |= EG_VF_ATTR;
	else
		eg_forget_key(&key);
}

/* A file opened for write may change: its verdict goes (an open for read costs one test). */
static __always_inline void eg_forget_if_write(const void *file)
{
	__u32 mode = EG_LOAD(__u32, file, EG_OFF_FILE_MODE);
	if (mode & EG_FMODE_WRITE)
		eg_forget_inode(eg_file_inode(file));
}

/* A name changed. Under path rules the verdict (or, for a directory, every verdict: the
 * files below keep their ctime) no longer holds; otherwise the bytes are the same and the
 * verdict follows the file, its ctime no longer compared. */
static __always_inline void eg_renamed(const void *dentry)
{
	const void *inode = eg_dentry_inode(dentry);
	if (!inode)
		return;
	__u16 mode = EG_LOAD(__u16, inode, EG_OFF_INODE_MODE);
	__u32 flags = eg_cfg();
	if ((mode & EG_S_IFMT) == EG_S_IFDIR) {
		if (flags & EG_LSM_CFG_PATHS) {
			int zero = 0;
			struct eg_runtime *rt = runtime.lookup(&zero);
			if (rt) {
				__sync_fetch_and_add(&rt->epoch, 1);
				eg_count(EG_LSM_STAT_EPOCHS);
			}
		}
		return;
	}
	struct eg_file_key key = {};
	if (!eg_inode_key(inode, &key))
		return;
	if (flags & EG_LSM_CFG_PATHS) {
		eg_forget_key(&key);
		return;
	}
	struct eg_verdict *v = verdicts.lookup(&key);
	if (v && v->ctime_ns == eg_ctime(inode) && v->mtime_ns == eg_mtime(inode))
		v->flags |= EG_VF_MOVED;
}

/* ------------------------------------------------------------------------------- records */

static __always_inline struct eg_exec_event *eg_record(__u8 op, __u8 state, __u8 flags,
						       struct eg_file_key *key,
						       __u64 ctime_ns, __u64 size, __s32 aux)
{
	struct eg_exec_event *e = events.ringbuf_reserve(sizeof(struct eg_exec_event));
	if (!e) {
		eg_count(EG_LSM_STAT_DROPS); /* the verdict stands: a full ring denies nothing more */
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->op = op;
	e->state = state;
	e->flags = flags;
	e->kill_err = aux;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->pid = pid_tgid >> 32;
	__u64 uid_gid = bpf_get_current_uid_gid();
	e->uid = (__u32)uid_gid;
	e->gid = (__u32)(uid_gid >> 32);
	e->boot_ns = bpf_ktime_get_boot_ns();
	e->dev = key->dev;
	e->ino = key->ino;
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
	return e;
}

/* Wake user space only when it has work: a file to verify or a denial to record. */
static __always_inline void eg_send(struct eg_exec_event *e)
{
	if (e->state == EG_STATE_ALLOW)
		events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	else
		events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

static __always_inline void eg_copy_parked(struct eg_exec_event *e, struct eg_parked_path *p)
{
	if (p && p->ino == e->ino && p->dev == e->dev)
		__builtin_memcpy(e->path, p->path, sizeof(e->path));
}

/* From security_file_open (a hook bpf_d_path is allowed in): park the path of an exec's
 * open per thread (for fmod-ret's bprm_check, which cannot call bpf_d_path), and the path
 * of a fresh file per file (for the record of its mapping, denied on sight). */
static __always_inline void eg_note_open(const void *file)
{
	int zero = 0;
	struct eg_where w = {};
	__u32 oflags = EG_LOAD(__u32, file, EG_OFF_FILE_FLAGS);
	int exec_open = (oflags & EG_O_FMODE_EXEC) != 0;
	const void *inode = eg_file_inode(file);
	int in_scope = eg_place(eg_file_dentry(file), inode, &w);
#ifdef EG_PATH_D_PATH
	if (exec_open)
		return; /* the verdict hook takes the exec's path itself */
#endif
	if (exec_open && !in_scope && !loaders.lookup(&w.key))
		return;
	if (!exec_open) {
		__u32 mode = EG_LOAD(__u32, file, EG_OFF_FILE_MODE);
		if (!in_scope || !inode || (mode & EG_FMODE_WRITE) || !(eg_cfg() & EG_LSM_CFG_MAPS))
			return;
		if (!(w.flags & EG_F_FRESH) && !eg_changed_since_start(eg_ctime(inode)))
			return; /* not denied on sight: user space names it from /proc/PID/map_files */
	}
	struct eg_parked_path *slot = path_scratch.lookup(&zero);
	if (!slot)
		return;
	slot->ino = w.key.ino;
	slot->dev = w.key.dev;
	slot->_pad = 0;
	if (bpf_d_path((struct path *)((const char *)file + EG_OFF_FILE_PATH), slot->path,
		       sizeof(slot->path)) < 0)
		return;
	if (exec_open) {
		__u64 tid = bpf_get_current_pid_tgid();
		exec_paths.update(&tid, slot);
	} else {
		open_paths.update(&w.key, slot);
	}
}

/* ------------------------------------------------------------------------------- judge */

/* The verdict for the exec of bprm's file: 0 or -EPERM, and a ring record for every exec in
 * scope. A dynamic loader run as a program (`ld.so ./prog`, or named as a script's
 * interpreter) is denied while the loader switch is on: the file it would load is mapped,
 * never exec'd, and the kernel's ELF loader never passes ld.so through bprm_check when it
 * loads it as an interpreter. */
static __always_inline int eg_judge_exec(const void *bprm)
{
	const void *file = EG_LOAD(const void *, bprm, EG_OFF_BPRM_FILE);
	const void *inode = eg_file_inode(file);
	struct eg_where w = {};
	__u32 flags = eg_cfg();

	eg_count(EG_LSM_STAT_EXECS);
	int in_scope = eg_place(eg_file_dentry(file), inode, &w);
	int loader = (flags & EG_LSM_CFG_LOADER) && loaders.lookup(&w.key) && !eg_exempt_or_child();
	if (!inode || (!in_scope && !loader))
		return 0; /* outside the scope: never denied, never reported */
	if (in_scope && eg_exempt_or_child())
		return 0; /* the agent's own helpers (the fanotify fill answers them at once) */
	eg_count(EG_LSM_STAT_IN_SCOPE);

	__u64 size = EG_LOAD(__u64, inode, EG_OFF_INODE_SIZE);
	__u64 ctime_ns = eg_ctime(inode);
	__u8 state = eg_state_of(inode, &w.key, ctime_ns, size);
	__u8 action = EG_ACT_NONE;
	if (in_scope && state != EG_STATE_ALLOW && state != EG_STATE_DENY) {
		__u8 layer = eg_layer_state(file, &w.key, ctime_ns, size, flags);
		if (layer != EG_STATE_UNKNOWN) {
			state = layer;
			action = EG_ACT_LAYER;
		}
	}

	__u8 evflags = w.flags | (in_scope ? EG_F_IN_SCOPE : 0);
	if (loader)
		evflags |= EG_F_LOADER | EG_F_DENIED;
	if (in_scope && (state == EG_STATE_DENY ||
			 (state != EG_STATE_ALLOW && (flags & EG_LSM_CFG_DENY_UNKNOWN))))
		evflags |= EG_F_DENIED;
	int ret = 0;
	if ((evflags & EG_F_DENIED) && (flags & EG_LSM_CFG_ENFORCE)) {
		evflags |= EG_F_EPERM;
		ret = -EG_EPERM;
		eg_count(loader ? EG_LSM_STAT_LOADER_DENIED : EG_LSM_STAT_DENIED);
		if (eg_orphaned())
			eg_count(EG_LSM_STAT_ORPHAN_DENIED);
	}

	__u64 pid_tgid = bpf_get_current_pid_tgid();
#ifndef EG_PATH_D_PATH
	struct eg_parked_path *parked = exec_paths.lookup(&pid_tgid);
#endif
	struct eg_exec_event *e = eg_record(EG_MSG_EXEC, state, evflags, &w.key, ctime_ns, size, 0);
	if (!e) {
#ifndef EG_PATH_D_PATH
		if (parked)
			exec_paths.delete(&pid_tgid);
#endif
		return ret;
	}
	e->action = action;
#ifdef EG_PATH_D_PATH
	/* The absolute path of the file being loaded (f_path is a struct inside struct file). */
	if (bpf_d_path((struct path *)((const char *)file + EG_OFF_FILE_PATH), e->path,
		       sizeof(e->path)) < 0)
		e->path[0] = 0;
#else
	/* The path the exec's open parked; a copy between map value and record (no probe read). */
	if (parked) {
		eg_copy_parked(e, parked);
		exec_paths.delete(&pid_tgid);
	}
#endif
	eg_send(e);
	return ret;
}

/* The verdict on a file in scope mapped executable, shared by eg_judge_map (EPERM) and the
 * kill backend's eg_kill_map (SIGKILL): its state, and the flags of its record (EG_F_DENIED
 * when it must not run). */
struct eg_map_look {
	__u64 size;
	__u64 ctime_ns;
	__u8 state;
	__u8 evflags;
	__u8 action; /* EG_ACT_LAYER: the state is the overlay's layer file's */
};

static __always_inline void eg_map_verdict(const void *file, const void *inode,
					   struct eg_where *w, __u32 flags, struct eg_map_look *m)
{
	eg_count(EG_LSM_STAT_MAPS);
	m->size = EG_LOAD(__u64, inode, EG_OFF_INODE_SIZE);
	m->ctime_ns = eg_ctime(inode);
	m->state = eg_state_of(inode, &w->key, m->ctime_ns, m->size);
	m->action = EG_ACT_NONE;
	if (m->state != EG_STATE_ALLOW && m->state != EG_STATE_DENY) {
		__u8 layer = eg_layer_state(file, &w->key, m->ctime_ns, m->size, flags);
		if (layer != EG_STATE_UNKNOWN) {
			m->state = layer;
			m->action = EG_ACT_LAYER;
		}
	}
	m->evflags = w->flags | EG_F_IN_SCOPE;
	if (EG_LOAD(__s32, inode, EG_OFF_INODE_WRITECOUNT) > 0) {
		m->evflags |= EG_F_WRITERS; /* the bytes may change under the verdict */
		m->state = m->state == EG_STATE_DENY ? m->state : EG_STATE_STALE;
	}
	if (m->state != EG_STATE_ALLOW && m->state != EG_STATE_DENY &&
	    eg_changed_since_start(m->ctime_ns))
		m->evflags |= EG_F_FRESH;
	if (m->state == EG_STATE_DENY ||
	    (m->state != EG_STATE_ALLOW &&
	     ((m->evflags & (EG_F_FRESH | EG_F_WRITERS)) || (flags & EG_LSM_CFG_STRICT_MAPS)) &&
	     (flags & EG_LSM_CFG_DENY_UNKNOWN)))
		m->evflags |= EG_F_DENIED;
}

/* A file mapped with PROT_EXEC (op EG_MSG_MMAP) or made executable (EG_MSG_MPROTECT) is an
 * exec without execve: the dynamic loader maps libraries and `ld.so ./prog`'s program this
 * way, and so does any loader of its own. A file in scope: allowed by an allow verdict,
 * denied by a deny verdict; without one it is denied when it is fresh (changed since the
 * agent started, on a filesystem that appeared since, or without a name) or open for write
 * right now, and otherwise (a file untouched since before the agent started, not verified
 * yet) allowed and verified: its verdict holds from the next mapping. Once the pre-scan
 * has verified the whole scope (EG_LSM_CFG_STRICT_MAPS), there is no such benefit: every
 * file without a verdict is denied. */
static __always_inline int eg_judge_map(const void *file, __u8 op, unsigned long prot)
{
	__u32 flags = eg_cfg();
	if (!(flags & EG_LSM_CFG_MAPS) || !file || !(prot & EG_PROT_EXEC))
		return 0;
	const void *inode = eg_file_inode(file);
	struct eg_where w = {};
	if (!eg_place(eg_file_dentry(file), inode, &w) || !inode || eg_exempt())
		return 0;
	struct eg_map_look m = {};
	eg_map_verdict(file, inode, &w, flags, &m);
	__u64 size = m.size, ctime_ns = m.ctime_ns;
	__u8 state = m.state, evflags = m.evflags;
	int ret = 0;
	if ((evflags & EG_F_DENIED) && (flags & EG_LSM_CFG_ENFORCE)) {
		evflags |= EG_F_EPERM;
		ret = -EG_EPERM;
		eg_count(EG_LSM_STAT_MAPS_DENIED);
		if (eg_orphaned())
			eg_count(EG_LSM_STAT_ORPHAN_DENIED);
	}
	if (state == EG_STATE_ALLOW)
		return ret; /* a hit: nothing to record (the exec or first mapping was) */
	struct eg_exec_event *e = eg_record(op, state, evflags, &w.key, ctime_ns, size, (__s32)prot);
	if (!e)
		return ret;
	e->action = m.action;
	eg_copy_parked(e, open_paths.lookup(&w.key));
	eg_send(e);
	return ret;
}

/* The protection a mapping will really get, from the one the caller asked for: a process
 * with personality(READ_IMPLIES_EXEC) gets PROT_EXEC with every PROT_READ (the kernel's
 * mmap_prot). The LSM mmap_file hook is handed it already; security_mmap_file's fmod_ret
 * program and the kill backend's syscall tracepoint see only what was asked. */
static __always_inline unsigned long eg_effective_prot(unsigned long prot)
{
	if (!(prot & EG_PROT_READ) || (prot & EG_PROT_EXEC))
		return prot;
	const void *task = bpf_get_current_task_btf();
	__u32 persona = EG_LOAD(__u32, task, EG_OFF_TASK_PERSONALITY);
	return (persona & EG_READ_IMPLIES_EXEC) ? prot | EG_PROT_EXEC : prot;
}

/* mprotect: only a mapping that was not executable before is judged (an executable one was
 * judged when it was mapped). */
static __always_inline int eg_judge_mprotect(const void *vma, unsigned long prot)
{
	if (!vma || !(prot & EG_PROT_EXEC))
		return 0;
	unsigned long vm_flags = EG_LOAD(unsigned long, vma, EG_OFF_VMA_FLAGS);
	if (vm_flags & EG_VM_EXEC)
		return 0;
	return eg_judge_map(EG_LOAD(const void *, vma, EG_OFF_VMA_FILE), EG_MSG_MPROTECT, prot);
}

/* ------------------------------------------------------------------------------- guard */

#define EG_MNT_SHARED 0x1000 /* vfsmount.mnt_flags: the mount has peers (propagates) */

/* Could a mount onto ``path`` change what the agent sees? Yes in the agent's own mount
 * namespace, and from any namespace where the target mount propagates (shared: a peer of
 * the agent's). A private or slave copy, as systemd makes for a unit's ProtectSystem=, is
 * the unit's alone: refusing it would stop such units from starting. */
static __always_inline int eg_vfsmount_reaches_agent(const void *mnt)
{
	if (!mnt || (EG_LOAD(__s32, mnt, EG_OFF_VFSMOUNT_FLAGS) & EG_MNT_SHARED))
		return 1;
	const void *nsp = EG_LOAD(const void *, bpf_get_current_task_btf(), EG_OFF_TASK_NSPROXY);
	const void *mnt_ns = nsp ? EG_LOAD(const void *, nsp, EG_OFF_NSPROXY_MNT_NS) : 0;
	int zero = 0;
	struct eg_runtime *rt = runtime.lookup(&zero);
	/* not known yet (0): as if it reached the agent, so a guard never lapses */
	return !mnt_ns || !rt || !rt->agent_mnt_ns ||
	       EG_LOAD(__u32, mnt_ns, EG_OFF_MNT_NS_INUM) == rt->agent_mnt_ns;
}

static __always_inline int eg_mount_reaches_agent(const void *path)
{
	return eg_vfsmount_reaches_agent(path ? EG_LOAD(const void *, path, EG_OFF_PATH_MNT) : 0);
}

/* While the scopes do not cover the host, a mount onto a path in scope could put files of
 * an out-of-scope filesystem under a scope path (a bind mount, a move, a remount of a
 * block device elsewhere): refused, for everyone but the agent, where it reaches the
 * agent's mount namespace (made there, or onto a shared mount that propagates to it). A
 * new filesystem mounted there would be in scope, but is refused too: one rule. A mount
 * in a private or slave copy (a container's rootfs, /dev/pts, /proc; a unit's
 * ProtectSystem=) is left alone: it shows nothing to anyone outside that namespace, and
 * what runs there is judged by where its file is in its filesystem, not by that path. */
static __always_inline int eg_guard_mount(const void *target_dentry, const void *path,
					  unsigned long mflags)
{
	__u32 flags = eg_cfg();
	if (!(flags & EG_LSM_CFG_MOUNTS) || !target_dentry)
		return 0;
	if ((mflags & EG_MS_REMOUNT) || ((mflags & EG_MS_PROPAGATION) &&
					 !(mflags & (EG_MS_BIND | EG_MS_MOVE))))
		return 0; /* options and propagation change no file */
	if (!eg_mount_reaches_agent(path))
		return 0;
	struct eg_where w = {};
	if (!eg_place(target_dentry, eg_dentry_inode(target_dentry), &w) || eg_exempt())
		return 0; /* the agent only: a child of it is no proof of anything */
	int ret = 0;
	__u8 evflags = EG_F_IN_SCOPE | EG_F_DENIED;
	if (flags & EG_LSM_CFG_ENFORCE) {
		ret = -EG_EPERM;
		evflags |= EG_F_EPERM;
		eg_count(EG_LSM_STAT_MOUNTS_REFUSED);
	}
	struct eg_exec_event *e = eg_record(EG_MSG_MOUNT, EG_STATE_DENY, evflags, &w.key, 0, 0,
					    (__s32)mflags);
	if (e)
		eg_send(e);
	return ret;
}

/* ptrace attach (and what needs the same right: process_vm_writev, /proc/PID/mem writes)
 * to a process whose program is in scope: refused for everyone but the agent, or code the
 * policy never saw would run as that program. */
static __always_inline int eg_guard_ptrace(const void *child, unsigned int mode)
{
	__u32 flags = eg_cfg();
	if (!(flags & EG_LSM_CFG_PTRACE) || !child || !(mode & EG_PTRACE_MODE_ATTACH))
		return 0;
	const void *mm = EG_LOAD(const void *, child, EG_OFF_TASK_MM);
	if (!mm)
		return 0; /* a kernel thread */
	const void *exe = EG_LOAD(const void *, mm, EG_OFF_MM_EXE_FILE);
	struct eg_where w = {};
	if (!exe || !eg_place(eg_file_dentry(exe), eg_file_inode(exe), &w) || eg_exempt())
		return 0;
	int ret = 0;
	__u8 evflags = EG_F_IN_SCOPE | EG_F_DENIED | (w.flags & EG_F_PATHLESS);
	if (flags & EG_LSM_CFG_ENFORCE) {
		ret = -EG_EPERM;
		evflags |= EG_F_EPERM;
		eg_count(EG_LSM_STAT_PTRACE_REFUSED);
	}
	__u32 target = EG_LOAD(__u32, child, EG_OFF_TASK_TGID);
	struct eg_exec_event *e = eg_record(EG_MSG_PTRACE, EG_STATE_DENY, evflags, &w.key, 0, 0,
					    (__s32)target);
	if (e)
		eg_send(e);
	return ret;
}

/* ----------------------------------------------------------------------------- protect */
#ifdef EG_PROTECT
/* Self-protection (bpf-lsm; docs/threat-model.md "Tamper resistance"). While the agent
 * enforces with its programs pinned, every process but the agent is refused: signals to
 * it, ptrace of it, changes to its limits and scheduling, file descriptors for its maps,
 * programs and links (by id or by pinned path), changes to its pin directory, unmounting
 * the bpffs that holds it, and changes to the files and directories it registers (its code,
 * state, keys, policy). Each refusal is a record (EG_MSG_TAMPER). */
#ifndef EG_GUARD_MAX
#define EG_GUARD_MAX 1024
#endif
#define EG_GUARD_DIR 1  /* a directory: nothing below it is created, written or removed */
#define EG_GUARD_PIN 2  /* a pinned object: not even opened */
#define EG_GUARD_FILE 4 /* a file: not written, renamed, linked or removed */
#define EG_GUARD_RO 8   /* with EG_GUARD_PIN: may be opened read-only (the counters a
			 * restarted agent reads from an orphaned program) */
#define EG_GUARD_ABOVE 16 /* a directory above a guarded path (or the bpffs root): not
			   * renamed and not mounted over; what is inside it is not guarded */
#define EG_MAY_WRITE 2
#define EG_BPF_F_RDONLY (1U << 3)
#define EG_GUARD_WALK 24 /* directory levels walked up from a changed file */

#define EG_TAMPER_SIGNAL 1   /* detail: the signal */
#define EG_TAMPER_PTRACE 2   /* detail: the ptrace mode */
#define EG_TAMPER_TASK 3     /* detail: EG_TASK_* (limits, scheduling) */
#define EG_TAMPER_BPF_ID 4   /* detail: the bpf() command; ino: the object id */
#define EG_TAMPER_BPF_FD 5   /* detail: 1 map, 2 program; ino: the object id */
#define EG_TAMPER_BPF_LOAD 6 /* detail: the program type */
#define EG_TAMPER_PIN 7      /* detail: EG_OPN_* */
#define EG_TAMPER_FILE 8     /* detail: EG_OPN_* */
#define EG_TAMPER_UMOUNT 9
#define EG_TAMPER_MOUNT 10   /* a mount onto a guarded path */

#define EG_OPN_OPEN 1
#define EG_OPN_WRITE 2
#define EG_OPN_UNLINK 3
#define EG_OPN_RENAME 4
#define EG_OPN_CREATE 5
#define EG_OPN_SETATTR 6
#define EG_OPN_TRUNCATE 7
#define EG_OPN_LINK 8

#define EG_TASK_RLIMIT 1
#define EG_TASK_SCHED 2
#define EG_TASK_NICE 3
#define EG_TASK_IOPRIO 4

#define EG_ID_MAP 1
#define EG_ID_PROG 2
#define EG_ID_LINK 3

#define EG_BPF_PROG_LOAD 5
#define EG_BPF_PROG_GET_FD_BY_ID 13
#define EG_BPF_MAP_GET_FD_BY_ID 14
#define EG_BPF_LINK_GET_FD_BY_ID 30

BPF_HASH(guarded, struct eg_file_key, __u32, EG_GUARD_MAX); /* -> EG_GUARD_* */
BPF_HASH(guarded_ids, __u64, __u32, 256); /* EG_ID_* << 32 | id -> EG_IDF_* */
#define EG_IDF_GUARDED 1
#define EG_IDF_READABLE 2 /* the counters: a read-only descriptor is allowed */
BPF_HASH(guarded_devs, __u32, __u32, 64); /* filesystems holding guarded directories */

/* What guards the enforcement itself (pins, object ids, the bpffs) holds while the
 * programs live. What guards the agent (its process, its files, tracing program loads)
 * lifts once it is gone: a restarted agent must load its programs and write its state,
 * while the orphaned programs go on enforcing from their verdicts. */
static __always_inline int eg_protecting_objects(void)
{
	return (eg_cfg() & EG_LSM_CFG_PROTECT) != 0;
}

static __always_inline int eg_protecting(void)
{
	return eg_protecting_objects() && !eg_orphaned();
}

/* The agent, or a process it started (its fanotify watchdog, its helpers). */
static __always_inline int eg_task_is_agent_or_child(const void *task)
{
	return task && (eg_task_is_agent(task) ||
			eg_task_is_agent(EG_LOAD(const void *, task, EG_OFF_TASK_REAL_PARENT)));
}

static __always_inline int eg_tamper(__u32 kind, __u32 detail, struct eg_file_key *key,
				     __u64 target)
{
	struct eg_file_key none = {};
	eg_count(EG_LSM_STAT_TAMPER);
	struct eg_exec_event *e = eg_record(EG_MSG_TAMPER, EG_STATE_DENY,
					    EG_F_IN_SCOPE | EG_F_DENIED | EG_F_EPERM,
					    key ? key : &none, 0, target,
					    (__s32)((kind << 16) | (detail & 0xffff)));
	if (e)
		eg_send(e);
	return -EG_EPERM;
}

/* A signal, ptrace, limit or scheduling change aimed at the agent or a process it started
 * (its watchdog holds what the agent holds), by anyone outside that family. Never lifted by
 * the agent's death: a dead agent is no target, and its pid with another start time is
 * someone else. */
static __always_inline int eg_guard_task(const void *target, __u32 kind, __u32 detail)
{
	if (!eg_protecting_objects() || !eg_task_is_agent_or_child(target) || eg_exempt_or_child())
		return 0;
	return eg_tamper(kind, detail, 0, EG_LOAD(__u32, target, EG_OFF_TASK_TGID));
}

static __always_inline int eg_guard_ptrace_agent(const void *target, unsigned int mode)
{
	if (!(mode & EG_PTRACE_MODE_ATTACH))
		return 0; /* reading /proc/PID/stat and its like: ps, top, systemd */
	return eg_guard_task(target, EG_TAMPER_PTRACE, mode);
}

static __always_inline int eg_guard_signal(const void *target, int sig)
{
	if (sig == 0 || sig == 1)
		return 0; /* "does it exist?" changes nothing; SIGHUP reloads the policy, whose
			   * files are guarded (the agent's handler is set before it protects) */
	return eg_guard_task(target, EG_TAMPER_SIGNAL, (__u32)sig);
}

/* The guard flags of an inode, or of the nearest guarded directory above dentry. A walk
 * that ends away from its filesystem's root (a disconnected dentry, as open_by_handle_at
 * gives) on a filesystem that holds guarded directories counts as guarded: fail closed. */
static __always_inline __u32 eg_guard_of(const void *dentry, const void *inode)
{
	struct eg_file_key key = {};
	if (eg_inode_key(inode, &key)) {
		__u32 *g = guarded.lookup(&key);
		if (g)
			return *g;
	}
	if (!dentry)
		return 0;
	const void *d = EG_LOAD(const void *, dentry, EG_OFF_DENTRY_PARENT);
	for (int i = 0; i < EG_GUARD_WALK && d; i++) {
		struct eg_file_key k = {};
		if (!eg_inode_key(eg_dentry_inode(d), &k))
			return 0;
		__u32 *g = guarded.lookup(&k);
		if (g && (*g & EG_GUARD_DIR))
			return EG_GUARD_DIR;
		const void *p = EG_LOAD(const void *, d, EG_OFF_DENTRY_PARENT);
		if (p == d) {
			const void *sb = EG_LOAD(const void *, eg_dentry_inode(d), EG_OFF_INODE_SB);
			if (sb && EG_LOAD(const void *, sb, EG_OFF_SB_ROOT) != d &&
			    guarded_devs.lookup(&k.dev))
				return EG_GUARD_DIR;
			return 0;
		}
		d = p;
	}
	return 0;
}

/* A change (opn) to a file or under a directory the agent guards. */
static __always_inline int eg_on_pin_fs(const void *dentry, const void *inode)
{
	if (!inode && dentry) /* a name being created: its directory's filesystem */
		inode = eg_dentry_inode(EG_LOAD(const void *, dentry, EG_OFF_DENTRY_PARENT));
	struct eg_file_key k = {};
	int zero = 0;
	struct eg_runtime *rt = runtime.lookup(&zero);
	return rt && eg_inode_key(inode, &k) && k.dev == rt->pin_dev;
}

static __always_inline int eg_guard_change(const void *dentry, const void *inode, __u32 opn)
{
	if (!eg_protecting_objects())
		return 0;
	__u32 g = eg_guard_of(dentry, inode);
	if (g == EG_GUARD_ABOVE && opn != EG_OPN_RENAME)
		return 0; /* above a guarded path: only moving it matters */
	if (!g || eg_exempt())
		return 0;
	int pins = eg_on_pin_fs(dentry, inode);
	if (!pins && eg_orphaned())
		return 0; /* the agent's files: its successor writes them */
	struct eg_file_key key = {};
	eg_inode_key(inode, &key);
	return eg_tamper(pins ? EG_TAMPER_PIN : EG_TAMPER_FILE, opn, &key, 0);
}

static __always_inline int eg_guard_open(const void *file)
{
	if (!eg_protecting())
		return 0;
	__u32 mode = EG_LOAD(__u32, file, EG_OFF_FILE_MODE);
	const void *inode = eg_file_inode(file);
	if (mode & EG_FMODE_WRITE)
		return eg_guard_change(eg_file_dentry(file), inode, EG_OPN_WRITE);
	return 0;
}

/* Any access to a pinned object (bpf_obj_get checks it with inode_permission). */
static __always_inline int eg_guard_permission(const void *inode, int mask)
{
	if (!eg_protecting_objects())
		return 0;
	struct eg_file_key key = {};
	if (!eg_inode_key(inode, &key))
		return 0;
	int zero = 0;
	struct eg_runtime *rt = runtime.lookup(&zero);
	if (!rt || key.dev != rt->pin_dev)
		return 0; /* one compare for every other inode on the host */
	__u32 *g = guarded.lookup(&key);
	if (!g || !(*g & EG_GUARD_PIN) || ((*g & EG_GUARD_RO) && !(mask & EG_MAY_WRITE)) ||
	    eg_exempt())
		return 0;
	return eg_tamper(EG_TAMPER_PIN, EG_OPN_OPEN, &key, 0);
}

/* A descriptor for one of the agent's BPF objects: refused, even read-only (a read-only map
 * descriptor still lets a program of one's own write the map), except the counters. */
static __always_inline int eg_guard_id(__u32 kind, __u32 id, __u32 detail, int readonly)
{
	__u64 k = ((__u64)kind << 32) | id;
	if (!eg_protecting_objects())
		return 0;
	__u32 *f = guarded_ids.lookup(&k);
	if (!f || (readonly && (*f & EG_IDF_READABLE)) || eg_exempt())
		return 0;
	struct eg_file_key key = {};
	key.ino = id;
	return eg_tamper(detail ? EG_TAMPER_BPF_ID : EG_TAMPER_BPF_FD, detail ? detail : kind, &key, 0);
}

/* Program types that run in other processes' context: with one, anyone could signal or
 * trace the agent from inside it (bpf_send_signal), so only the agent loads them. */
static __always_inline int eg_tracing_type(__u32 t)
{
	return t == 2 /* KPROBE */ || t == 5 /* TRACEPOINT */ || t == 7 /* PERF_EVENT */ ||
	       t == 17 /* RAW_TRACEPOINT */ || t == 24 /* RAW_TRACEPOINT_WRITABLE */ ||
	       t == 26 /* TRACING */ || t == 27 /* STRUCT_OPS */ || t == 28 /* EXT */ ||
	       t == 29 /* LSM */ || t == 31 /* SYSCALL */;
}

/* bpf(2) itself: an fd for a guarded object by id, or a tracing program load. */
static __always_inline int eg_guard_bpf(int cmd, const void *attr)
{
	if (!eg_protecting_objects() || !attr)
		return 0;
	__u32 first = EG_LOAD(__u32, attr, 0); /* the id, or the program type */
	if (cmd == EG_BPF_LINK_GET_FD_BY_ID)
		return eg_guard_id(EG_ID_LINK, first, (__u32)cmd, 0);
	if (cmd == EG_BPF_MAP_GET_FD_BY_ID) /* open_flags at 8: read-only only for the counters */
		return eg_guard_id(EG_ID_MAP, first, (__u32)cmd,
				   EG_LOAD(__u32, attr, 8) == EG_BPF_F_RDONLY);
	if (cmd == EG_BPF_PROG_GET_FD_BY_ID)
		return eg_guard_id(EG_ID_PROG, first, (__u32)cmd, 0);
	/* lifted once the agent is dead: its successor loads its own programs */
	if (cmd == EG_BPF_PROG_LOAD && (eg_cfg() & EG_LSM_CFG_BPF_LOAD) && eg_tracing_type(first) &&
	    eg_protecting() && !eg_exempt())
		return eg_tamper(EG_TAMPER_BPF_LOAD, first, 0, 0);
	return 0;
}

/* Unmounting the bpffs that holds the pins would drop them. */

static __always_inline int eg_guard_umount(const void *mnt)
{
	if (!eg_protecting_objects() || !mnt || !eg_vfsmount_reaches_agent(mnt))
		return 0;
	const void *sb = EG_LOAD(const void *, mnt, EG_OFF_VFSMOUNT_SB);
	int zero = 0;
	struct eg_runtime *rt = runtime.lookup(&zero);
	if (!sb || !rt)
		return 0;
	__u32 dev = EG_LOAD(__u32, sb, EG_OFF_SB_DEV);
	if (dev != rt->pin_dev && (!guarded_devs.lookup(&dev) || eg_orphaned()))
		return 0; /* the agent's files are its successor's once it is dead */
	if (eg_exempt())
		return 0;
	return eg_tamper(EG_TAMPER_UMOUNT, 0, 0, 0);
}

/* A remount of the bpffs that holds the pins (read-only: the authorized stop could not
 * unpin). */
static __always_inline int eg_guard_remount(const void *dentry, const void *path)
{
	if (!eg_protecting_objects() || !dentry || !eg_on_pin_fs(dentry, eg_dentry_inode(dentry)) ||
	    !eg_mount_reaches_agent(path) || eg_exempt())
		return 0;
	return eg_tamper(EG_TAMPER_UMOUNT, 1, 0, 0);
}

/* The agent's process was freed: from now on its programs enforce alone. */
static __always_inline void eg_note_exit(const void *task)
{
	if (!eg_task_is_agent(task))
		return;
	if (EG_LOAD(__u32, task, EG_OFF_TASK_PID) != EG_LOAD(__u32, task, EG_OFF_TASK_TGID))
		return; /* a thread: the process lives on */
	int zero = 0;
	struct eg_runtime *rt = runtime.lookup(&zero);
	if (rt && !rt->agent_gone_ns)
		rt->agent_gone_ns = bpf_ktime_get_boot_ns();
}

/* A mount onto a guarded path would hide what the agent reads there. */
static __always_inline int eg_guard_mount_target(const void *dentry, const void *path,
						 unsigned long mflags)
{
	if ((mflags & EG_MS_PROPAGATION) && !(mflags & (EG_MS_BIND | EG_MS_MOVE)))
		return 0; /* propagation changes no file (systemd makes a unit's / a slave) */
	if (!eg_protecting_objects() || !dentry || !eg_mount_reaches_agent(path))
		return 0;
	const void *inode = eg_dentry_inode(dentry);
	__u32 g = eg_guard_of(dentry, inode);
	if (!g || eg_exempt() || (!eg_on_pin_fs(dentry, inode) && eg_orphaned()))
		return 0;
	struct eg_file_key key = {};
	eg_inode_key(inode, &key);
	return eg_tamper(EG_TAMPER_MOUNT, 0, &key, 0);
}
#endif /* EG_PROTECT */

#endif
