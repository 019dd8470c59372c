/* execguard exec sensor and kill backend (BCC).
 *
 * A raw tracepoint on sched_process_exec. It runs in the exec'ing task after the new
 * image is mapped and before that task returns to user space, so a SIGKILL sent here
 * kills the process before the new program runs one instruction.
 *
 * Kernel structs are read at offsets taken from the running kernel's BTF and passed as
 * -D cflags (agent/sensors/kernel_layout.py), never through the headers BCC compiled
 * with: on hosts without matching headers those come from another kernel.
 *
 * Knobs (cflags, validated ints): EG_RINGBUF_PAGES, EG_VERDICT_MAX, EG_SCOPE_MAX, and the
 * EG_OFF_* offsets (EG_OFF_TASK_LOGINUID only with CONFIG_AUDIT). Runtime knobs live in the
 * config map.
 */
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
#ifndef EG_OFF_BPRM_FILE
#error "EG_OFF_* offsets must come from the kernel's BTF (agent/sensors/kernel_layout.py)"
#endif

#define EG_SIGKILL 9

BPF_RINGBUF_OUTPUT(events, EG_RINGBUF_PAGES);
BPF_HASH(verdicts, struct eg_file_key, struct eg_verdict, EG_VERDICT_MAX);
BPF_HASH(scope_devs, __u32, __u32, EG_SCOPE_MAX); /* kernel-encoded dev -> 1 */
BPF_ARRAY(config, struct eg_config, 1);
BPF_PERCPU_ARRAY(stats, __u64, EG_STAT_N);
BPF_PERCPU_ARRAY(scratch, struct eg_exec_event, 1); /* stands in when the ring is full */

static __always_inline void eg_count(int idx)
{
	__u64 *v = stats.lookup(&idx);
	if (v)
		*v += 1;
}

/* Read an 8- or 4-byte field at base + off; returns non-zero on failure. */
static __always_inline int eg_read_u64(__u64 *dst, const void *base, unsigned long off)
{
	return bpf_probe_read_kernel(dst, sizeof(*dst), (const char *)base + off);
}

static __always_inline int eg_read_u32(__u32 *dst, const void *base, unsigned long off)
{
	return bpf_probe_read_kernel(dst, sizeof(*dst), (const char *)base + off);
}

/* Fill in the event and apply the verdict (and the kill) to it. Kept apart from the probe
 * so that the ring-buffer record and the scratch slot (ring full) never share a pointer:
 * older verifiers (6.1) cannot prove the reservation is released through such an alias. */
static __always_inline void eg_fill_and_decide(struct eg_exec_event *e, const void *task,
					       const void *bprm, int with_path)
{
	const void *file = NULL, *inode = NULL, *sb = NULL, *parent = NULL, *filename = NULL;
	__u64 sec = 0, nsec = 0;
	__u32 nsec32 = 0;
	int err = 0, zero = 0;

	__builtin_memset(e, 0, sizeof(*e));

	e->op = EG_MSG_EXEC;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	__u64 uid_gid = bpf_get_current_uid_gid();
	e->uid = (__u32)uid_gid;
	e->gid = (__u32)(uid_gid >> 32);
	e->boot_ns = bpf_ktime_get_boot_ns();
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	err |= bpf_probe_read_kernel(&parent, sizeof(parent),
				     (const char *)task + EG_OFF_TASK_REAL_PARENT);
	if (parent)
		err |= eg_read_u32(&e->ppid, parent, EG_OFF_TASK_TGID);
#ifdef EG_OFF_TASK_LOGINUID
	err |= eg_read_u32(&e->auid, task, EG_OFF_TASK_LOGINUID);
#else
	e->auid = 0xFFFFFFFF; /* kernel without CONFIG_AUDIT: no loginuid */
#endif

	err |= bpf_probe_read_kernel(&filename, sizeof(filename),
				     (const char *)bprm + EG_OFF_BPRM_FILENAME);
	if (filename && with_path)
		bpf_probe_read_kernel_str(e->path, sizeof(e->path), filename);

	err |= bpf_probe_read_kernel(&file, sizeof(file), (const char *)bprm + EG_OFF_BPRM_FILE);
	if (file)
		err |= bpf_probe_read_kernel(&inode, sizeof(inode),
					     (const char *)file + EG_OFF_FILE_INODE);
	if (inode) {
		err |= eg_read_u64(&e->ino, inode, EG_OFF_INODE_INO);
		err |= eg_read_u64(&e->size, inode, EG_OFF_INODE_SIZE);
		err |= eg_read_u64(&sec, inode, EG_OFF_INODE_CTIME_SEC);
#if EG_SZ_INODE_CTIME_NSEC == 8
		err |= eg_read_u64(&nsec, inode, EG_OFF_INODE_CTIME_NSEC);
#else
		err |= eg_read_u32(&nsec32, inode, EG_OFF_INODE_CTIME_NSEC);
		/* 6.13+ multigrain timestamps keep a "queried" flag in bit 31 (I_CTIME_QUERIED) */
		nsec = nsec32 & ~(1U << 31);
#endif
		e->ctime_ns = sec * 1000000000ULL + nsec;
		err |= bpf_probe_read_kernel(&sb, sizeof(sb), (const char *)inode + EG_OFF_INODE_SB);
		if (sb)
			err |= eg_read_u32(&e->dev, sb, EG_OFF_SB_DEV);
	}
	if (err || !inode || !sb) {
		e->flags |= EG_F_READ_ERR;
		eg_count(EG_STAT_READ_ERR);
	}

	/* The verdict, only trusted when the change stamp still matches. */
	struct eg_file_key key = {.ino = e->ino, .dev = e->dev};
	struct eg_verdict *v = verdicts.lookup(&key);
	if (!v)
		e->state = EG_STATE_UNKNOWN;
	else if (v->ctime_ns != e->ctime_ns || v->size != e->size)
		e->state = EG_STATE_STALE;
	else if (v->verdict == EG_VERDICT_ALLOW)
		e->state = EG_STATE_ALLOW;
	else
		e->state = EG_STATE_DENY; /* any other value fails closed */

	struct eg_config *cfg = config.lookup(&zero);
	__u32 flags = cfg ? cfg->flags : 0;
	__u32 dev = e->dev;
	if (!(e->flags & EG_F_READ_ERR) && scope_devs.lookup(&dev))
		e->flags |= EG_F_IN_SCOPE;
	if (e->state == EG_STATE_DENY ||
	    (e->state != EG_STATE_ALLOW && (flags & EG_CFG_DENY_UNKNOWN)))
		e->flags |= EG_F_DENIED;

	/* Only ever kill inside the scope; everything else is reported. */
	if ((e->flags & EG_F_DENIED) && (e->flags & EG_F_IN_SCOPE) && (flags & EG_CFG_KILL)) {
		e->kill_err = bpf_send_signal(EG_SIGKILL);
		e->action = e->kill_err ? EG_ACT_KILL_FAILED : EG_ACT_KILLED;
		eg_count(e->kill_err ? EG_STAT_KILL_FAILED : EG_STAT_KILLS);
	}
}

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	/* TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm) */
	const void *task = (const void *)ctx->args[0];
	const void *bprm = (const void *)ctx->args[2];
	int zero = 0;

	eg_count(EG_STAT_EXECS);
	struct eg_exec_event *ev = events.ringbuf_reserve(sizeof(struct eg_exec_event));
	if (!ev) {
		/* Decide even when the ring is full: a dropped event must not skip a kill. */
		struct eg_exec_event *e = scratch.lookup(&zero);
		eg_count(EG_STAT_DROPS);
		if (e)
			eg_fill_and_decide(e, task, bprm, 0);
		return 0;
	}
	eg_fill_and_decide(ev, task, bprm, 1);
	/* Wake the consumer only when it has work (an unknown file to verify) or a kill to
	 * record; cache hits wait for its next poll tick (a wake-up costs ~20 us here). */
	if (ev->state == EG_STATE_ALLOW || (ev->state == EG_STATE_DENY && ev->action == EG_ACT_NONE))
		events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
	else
		events.ringbuf_submit(ev, BPF_RB_FORCE_WAKEUP);
	return 0;
}
