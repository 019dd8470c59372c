/* execguard kill backend (BCC): SIGKILL before a denied program or mapping runs.
 *
 * For hosts that allow no BPF LSM, fentry or kprobe programs: only tracepoints, raw
 * tracepoints and bpf_send_signal. Where a file is, what its verdict is and when it is
 * denied come from exec_verdict.h, the header the bpf-lsm and fmod-ret backends judge
 * with, so all three place files the same way (docs/threat-model.md, "Scope"). Only the
 * reading differs: a tracepoint's pointers are plain numbers to the verifier, so the loader
 * (agent/sensors/bpf/build.py) pastes the header with EG_LOAD as bpf_probe_read_kernel.
 * This program therefore never loads under lockdown=confidentiality.
 *
 *   sched_process_exec (raw tracepoint): runs in the exec'ing task after the new image is
 *     mapped, before it returns to user space. A SIGKILL sent here kills the process before
 *     the new program runs one instruction. Denied: an unknown, stale or denied file in
 *     scope (enforce), and a dynamic loader run as a program (EG_LSM_CFG_LOADER).
 *   sys_enter_mmap (tracepoint): a PROT_EXEC mapping of a file, judged like eg_judge_map.
 *     The file is current->files->fdt->fd[fd]. SIGKILL at syscall entry, before the mapping
 *     exists: every thread of the process has it pending, and the caller never returns to
 *     user space (docs/sensors.md says what another thread could still do).
 *   sys_enter_shmat (tracepoint): SHM_EXEC attaches a SysV segment, a file with no name,
 *     executable: denied in enforce mode like any path-less file that cannot be verified.
 *
 * What a syscall tracepoint cannot see (docs/sensors.md, "What the kill backend cannot
 * see"): mprotect(PROT_EXEC) of a file mapping (the VMA is not reachable without
 * bpf_find_vma, whose callback BCC 0.26 cannot load), 32-bit syscalls (int 0x80), and a
 * descriptor swapped by another thread between this check and the mmap itself.
 *
 * Decisions never depend on the ring: a full ring loses the record, never the kill.
 */
#include "exec_verdict.h"

#define EG_SIGKILL 9
#define EG_MAP_ANONYMOUS 0x20
#define EG_SHM_EXEC 0100000
#define EG_NAME_LEVELS 16 /* directory levels of a mapping's path put in its record */

/* kill_stats[] indexes: what only this backend counts (exec_verdict.h's stats[] has the rest) */
#define EG_KILL_STAT_KILLS 0
#define EG_KILL_STAT_KILL_FAILED 1
#define EG_KILL_STAT_READ_ERR 2
#define EG_KILL_STAT_MMAP_CALLS 3 /* PROT_EXEC mmap calls of a file, before placement */
#define EG_KILL_STAT_SHM_EXEC 4
#define EG_KILL_STAT_N 5

BPF_PERCPU_ARRAY(kill_stats, __u64, EG_KILL_STAT_N);
struct eg_name_buf {
	char text[2 * EG_PATH_LEN]; /* twice the path: a masked offset plus a read stays inside */
};
BPF_PERCPU_ARRAY(name_scratch, struct eg_name_buf, 1); /* a path being built */

static __always_inline void eg_kill_count(int idx)
{
	__u64 *v = kill_stats.lookup(&idx);
	if (v)
		*v += 1;
}

/* SIGKILL the current process (every thread of it); the record's action. */
static __always_inline __u8 eg_kill(__s32 *err)
{
	long r = bpf_send_signal(EG_SIGKILL);
	*err = (__s32)r;
	if (r) {
		eg_kill_count(EG_KILL_STAT_KILL_FAILED);
		return EG_ACT_KILL_FAILED;
	}
	eg_kill_count(EG_KILL_STAT_KILLS);
	return EG_ACT_KILLED;
}

/* Wake user space when it has work: a file to verify or a kill to record. A known allow,
 * or a known deny only reported (monitor), waits for its next poll. */
static __always_inline void eg_submit(struct eg_exec_event *e)
{
	if (e->state == EG_STATE_ALLOW || (e->state == EG_STATE_DENY && e->action == EG_ACT_NONE))
		events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	else
		events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

/* The path of dentry within its filesystem ("/dir/file"), into out (EG_PATH_LEN bytes): the
 * process of a killed mapping is gone before user space reads the record, so its
 * /proc/PID/map_files cannot name the file. User space turns it into a path through one of
 * its mounts and checks (dev, ino) before trusting it. Deeper than EG_NAME_LEVELS: the
 * top levels are left out (the check then fails, and the record says no path). */
static __always_inline void eg_fs_path(const void *dentry, char *out)
{
	const void *chain[EG_NAME_LEVELS];
	int depth = 0, zero = 0;
	const void *d = dentry;
	for (int i = 0; i < EG_NAME_LEVELS; i++) {
		if (!d)
			break;
		const void *p = EG_LOAD(const void *, d, EG_OFF_DENTRY_PARENT);
		if (!p || p == d)
			break; /* the root of the filesystem: no name of its own */
		chain[i] = d;
		depth = i + 1;
		d = p;
	}
	struct eg_name_buf *nb = name_scratch.lookup(&zero);
	if (!nb)
		return;
	char *buf = nb->text;
	__u32 pos = 0;
	for (int i = EG_NAME_LEVELS - 1; i >= 0; i--) {
		if (i >= depth)
			continue;
		const void *name = EG_LOAD(const void *, chain[i], EG_OFF_DENTRY_NAME + EG_OFF_QSTR_NAME);
		if (!name || pos >= EG_PATH_LEN - 2)
			break;
		/* hide pos's range from clang, so the masks stay for the verifier */
		asm volatile("" : "+r"(pos));
		buf[pos & (EG_PATH_LEN - 1)] = '/';
		pos++;
		asm volatile("" : "+r"(pos));
		long n = bpf_probe_read_kernel_str(buf + (pos & (EG_PATH_LEN - 1)), EG_PATH_LEN, name);
		if (n <= 1 || n > EG_PATH_LEN)
			break;
		pos += n - 1;
	}
	if (pos >= EG_PATH_LEN)
		pos = EG_PATH_LEN - 1;
	asm volatile("" : "+r"(pos));
	buf[pos & (EG_PATH_LEN - 1)] = 0;
	bpf_probe_read_kernel(out, EG_PATH_LEN, buf);
}

/* ------------------------------------------------------------------------------- exec */

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	/* TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm) */
	const void *bprm = (const void *)ctx->args[2];
	const void *file = EG_LOAD(const void *, bprm, EG_OFF_BPRM_FILE);
	const void *inode = eg_file_inode(file);
	struct eg_where w = {};
	__u32 flags = eg_cfg();

	eg_count(EG_LSM_STAT_EXECS);
	int in_scope = eg_place(eg_file_dentry(file), inode, &w);
	int loader = (flags & EG_LSM_CFG_LOADER) && loaders.lookup(&w.key);
	/* bprm->file is the program that runs: for a script (#!, binfmt_misc) the interpreter,
	 * and the file that was exec'd, which may be in scope, is closed by now. bprm->interp
	 * is bprm->filename unless such a handler put its interpreter there: then user space
	 * judges the file by the name the caller gave (EG_MSG_SCRIPT; docs/sensors.md says
	 * what that costs), whether the interpreter is in scope or not. */
	const void *fname = EG_LOAD(const void *, bprm, EG_OFF_BPRM_FILENAME);
	int interpreted = fname && EG_LOAD(const void *, bprm, EG_OFF_BPRM_INTERP) != fname;
	if (interpreted && !eg_exempt_or_child()) {
		struct eg_exec_event *s = eg_record(EG_MSG_SCRIPT, EG_STATE_UNKNOWN, 0, &w.key, 0, 0, 0);
		if (s) {
			bpf_probe_read_kernel_str(s->path, sizeof(s->path), fname);
			eg_submit(s);
		}
	}
	if (!in_scope && !loader)
		return 0; /* outside the scope: never killed */
	if (eg_exempt_or_child())
		return 0; /* the agent's own helpers (looked up last: most execs are out of scope) */
	eg_count(EG_LSM_STAT_IN_SCOPE);

	__u64 size = 0, ctime_ns = 0;
	__u8 state = EG_STATE_UNKNOWN;
	__u8 evflags = w.flags | (in_scope ? EG_F_IN_SCOPE : 0);
	if (inode) {
		size = EG_LOAD(__u64, inode, EG_OFF_INODE_SIZE);
		ctime_ns = eg_ctime(inode);
		state = eg_state_of(inode, &w.key, ctime_ns, size);
	} else {
		evflags |= EG_F_READ_ERR; /* nothing proves it is outside: judged as unknown */
		eg_kill_count(EG_KILL_STAT_READ_ERR);
	}
	if (loader)
		evflags |= EG_F_LOADER | EG_F_DENIED;
	if (in_scope && (state == EG_STATE_DENY ||
			 (state != EG_STATE_ALLOW && (flags & EG_LSM_CFG_DENY_UNKNOWN))))
		evflags |= EG_F_DENIED;
	__u8 action = EG_ACT_NONE;
	__s32 err = 0;
	if ((evflags & EG_F_DENIED) && (flags & EG_LSM_CFG_ENFORCE)) {
		action = eg_kill(&err);
		eg_count(loader ? EG_LSM_STAT_LOADER_DENIED : EG_LSM_STAT_DENIED);
	}

	struct eg_exec_event *e = eg_record(EG_MSG_EXEC, state, evflags, &w.key, ctime_ns, size, err);
	if (!e)
		return 0; /* counted in stats[drops]; the kill above stands */
	e->action = action;
	if (interpreted) /* the name is the script's: the interpreter's path within its fs */
		eg_fs_path(eg_file_dentry(file), e->path);
	else if (fname)
		bpf_probe_read_kernel_str(e->path, sizeof(e->path), fname);
	eg_submit(e);
	return 0;
}

/* ------------------------------------------------------------------------------- mappings */

/* The open file behind descriptor fd of the current process, or 0. */
static __always_inline const void *eg_fd_file(long fd)
{
	if (fd < 0)
		return 0;
	const void *task = bpf_get_current_task_btf();
	const void *files = EG_LOAD(const void *, task, EG_OFF_TASK_FILES);
	const void *fdt = files ? EG_LOAD(const void *, files, EG_OFF_FILES_FDT) : 0;
	if (!fdt || (__u64)fd >= EG_LOAD(__u32, fdt, EG_OFF_FDT_MAX_FDS))
		return 0; /* EBADF: the mmap fails by itself */
	const void *array = EG_LOAD(const void *, fdt, EG_OFF_FDT_FD);
	return array ? EG_LOAD(const void *, array, (__u64)fd * sizeof(void *)) : 0;
}

/* eg_judge_map with a SIGKILL for the EPERM (the decision is eg_map_verdict's for both;
 * only the action and the record's path differ): a file in scope mapped with
 * PROT_EXEC is allowed by an allow verdict, killed by a deny verdict, and without one killed
 * when it is fresh (changed since the agent started, on a filesystem that appeared since, or
 * without a name) or open for write right now, or once the pre-scan has verified the whole
 * scope (EG_LSM_CFG_STRICT_MAPS); otherwise allowed once and verified by user space. */
static __always_inline void eg_kill_map(const void *file, __u8 op, unsigned long prot)
{
	__u32 flags = eg_cfg();
	const void *inode = eg_file_inode(file);
	const void *dentry = eg_file_dentry(file);
	struct eg_where w = {};
	if (!eg_place(dentry, inode, &w) || !inode || eg_exempt())
		return;
	struct eg_map_look m = {};
	eg_map_verdict(file, inode, &w, flags, &m);
	__u64 size = m.size, ctime_ns = m.ctime_ns;
	__u8 state = m.state, evflags = m.evflags;
	__u8 action = EG_ACT_NONE;
	__s32 err = 0;
	if ((evflags & EG_F_DENIED) && (flags & EG_LSM_CFG_ENFORCE)) {
		action = eg_kill(&err); /* a failed kill's errno is in kill_stats only: aux = prot */
		eg_count(EG_LSM_STAT_MAPS_DENIED);
	}
	if (state == EG_STATE_ALLOW)
		return; /* a hit: nothing to record (the exec or first mapping was) */
	struct eg_exec_event *e = eg_record(op, state, evflags, &w.key, ctime_ns, size, (__s32)prot);
	if (!e)
		return;
	e->action = action;
	if (!(w.flags & EG_F_PATHLESS))
		eg_fs_path(dentry, e->path);
	eg_submit(e);
}

/* Without syscall tracepoints (EG_NO_MAPPING_HOOKS, set by the loader) only execs are judged. */
#ifndef EG_NO_MAPPING_HOOKS
TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
	unsigned long prot = eg_effective_prot(args->prot); /* READ_IMPLIES_EXEC */
	if (!(prot & EG_PROT_EXEC) || (args->flags & EG_MAP_ANONYMOUS) ||
	    !(eg_cfg() & EG_LSM_CFG_MAPS))
		return 0;
	const void *file = eg_fd_file((long)(int)args->fd);
	if (!file)
		return 0;
	eg_kill_count(EG_KILL_STAT_MMAP_CALLS);
	eg_kill_map(file, EG_MSG_MMAP, prot);
	return 0;
}

/* shmat(SHM_EXEC): the segment is a shmem file without a name (nlink 0), in scope wherever
 * it is, and its bytes were written by whoever holds the segment: denied in enforce mode
 * unless the policy leaves mappings alone. The record has no identity (the segment is
 * found by its id in an IPC namespace, which this program does not walk). */
TRACEPOINT_PROBE(syscalls, sys_enter_shmat)
{
	__u32 flags = eg_cfg();
	if (!(args->shmflg & EG_SHM_EXEC) || !(flags & EG_LSM_CFG_MAPS) || eg_exempt())
		return 0;
	eg_kill_count(EG_KILL_STAT_SHM_EXEC);
	eg_count(EG_LSM_STAT_MAPS);
	__u8 evflags = EG_F_IN_SCOPE | EG_F_PATHLESS | EG_F_FRESH;
	__u8 action = EG_ACT_NONE;
	__s32 err = 0;
	if (flags & EG_LSM_CFG_DENY_UNKNOWN)
		evflags |= EG_F_DENIED;
	if ((evflags & EG_F_DENIED) && (flags & EG_LSM_CFG_ENFORCE)) {
		action = eg_kill(&err);
		eg_count(EG_LSM_STAT_MAPS_DENIED);
	}
	struct eg_file_key key = {};
	struct eg_exec_event *e = eg_record(EG_MSG_MMAP, EG_STATE_UNKNOWN, evflags, &key, 0, 0,
					    EG_PROT_EXEC);
	if (!e)
		return 0;
	e->action = action;
	eg_submit(e);
	return 0;
}
#endif
