/* execguard: records the BPF programs send to user space, and the maps they share.
 *
 * One header for the kernel side; agent/sensors/decode.py mirrors it (a test compares
 * the two layouts through BCC). Every record starts with a one-byte opcode so the
 * decoder can dispatch on it. Fields are laid out by hand with natural alignment and
 * no implicit padding, so the layout is the same for every compiler.
 */
#ifndef EXECGUARD_EVENTS_H
#define EXECGUARD_EVENTS_H

#define EG_COMM_LEN 16
#ifndef EG_PATH_LEN
#define EG_PATH_LEN 256 /* bytes of the exec path kept, NUL included */
#endif

/* What a record reports. All share struct eg_exec_event; `aux` says more per kind. */
enum eg_msg_op {
	EG_MSG_EXEC = 1,     /* an exec (bprm_check, or sched_process_exec for kill) */
	EG_MSG_MMAP = 2,     /* a file mapped with PROT_EXEC; aux = prot */
	EG_MSG_MPROTECT = 3, /* PROT_EXEC added to a file mapping; aux = prot */
	EG_MSG_MOUNT = 4,    /* a mount onto a path in scope was refused; aux = mount flags */
	EG_MSG_PTRACE = 5,   /* a ptrace attach to a program in scope was refused; aux = target tgid */
	EG_MSG_SCRIPT = 6,   /* kill/audit: an interpreter outside every scope started for the
			      * file named in path (#!, binfmt_misc); user space judges that file */
	EG_MSG_TAMPER = 7,   /* bpf-lsm self-protection refused an attempt on the agent; aux =
			      * EG_TAMPER_* << 16 | detail, dev/ino = the object, size = the
			      * target tgid (signals, ptrace, rlimits) */
};

/* What the kernel knew about the file when it ran (verdict map lookup). */
enum eg_state {
	EG_STATE_UNKNOWN = 0, /* no entry for (dev, ino) */
	EG_STATE_ALLOW = 1,   /* entry says allow and the stamp matches */
	EG_STATE_DENY = 2,    /* entry says deny and the stamp matches */
	EG_STATE_STALE = 3,   /* entry exists but ctime or size changed: unknown again */
};

/* What the program did about it. */
enum eg_action {
	EG_ACT_NONE = 0,        /* allowed, or denied but out of scope / kill off: reported only */
	EG_ACT_KILLED = 1,      /* bpf_send_signal(SIGKILL) returned 0 */
	EG_ACT_KILL_FAILED = 2, /* bpf_send_signal returned an error (in ev.kill_err) */
	EG_ACT_LAYER = 3,       /* bpf-lsm, fmod-ret: an overlay file without a verdict of its
				 * own, judged by its layer file's (the real file underneath) */
};

/* eg_exec_event.flags */
#define EG_F_IN_SCOPE 0x01  /* the file is in scope (see docs/threat-model.md, "Scope") */
#define EG_F_DENIED 0x02    /* the policy in the kernel denies it (deny verdict, or unknown while enforcing) */
#define EG_F_READ_ERR 0x04  /* a kernel read failed: identity fields may be 0 */
#define EG_F_EPERM 0x08     /* the hook returned -EPERM (bpf-lsm, fmod-ret) */
#define EG_F_LOADER 0x10    /* the file is a dynamic loader, run as a program */
#define EG_F_PATHLESS 0x20  /* the file has no name (memfd, O_TMPFILE, deleted): nlink 0 */
#define EG_F_FRESH 0x40     /* written since the agent started, on a filesystem that appeared
			     * since, or pathless: never given the benefit of the doubt */
#define EG_F_WRITERS 0x80   /* open for write (a writable shared mapping included) right now */

struct eg_exec_event {
	__u8 op;      /* enum eg_msg_op */
	__u8 state;   /* enum eg_state */
	__u8 action;  /* enum eg_action */
	__u8 flags;   /* EG_F_* */
	__s32 kill_err; /* kill: bpf_send_signal's error; other kinds: `aux` (see eg_msg_op) */
	__u32 pid;    /* tgid of the exec'ing process */
	__u32 ppid;   /* tgid of its real parent */
	__u32 uid;    /* real uid: low half of bpf_get_current_uid_gid() */
	__u32 auid;   /* loginuid; 4294967295 when unset */
	__u32 dev;    /* kernel encoding: MKDEV(major, minor) = major << 20 | minor */
	__u32 gid;    /* real gid: high half of bpf_get_current_uid_gid(), i.e. current_cred()->gid
		       * in the initial user namespace (not the egid or fsgid; an exec never
		       * changes the real gid, so before and after the exec agree) */
	__u64 ino;
	__u64 ctime_ns;
	__u64 size;
	__u64 boot_ns; /* bpf_ktime_get_boot_ns() at the exec */
	char comm[EG_COMM_LEN];
	char path[EG_PATH_LEN]; /* linux_binprm.filename, as given to execve */
};

/* Verdict map: file identity -> stamp and verdict. User space writes, the program reads. */
struct eg_file_key {
	__u64 ino;
	__u32 dev; /* kernel encoding, like eg_exec_event.dev */
	__u32 _pad;
};

#define EG_VERDICT_ALLOW 1
#define EG_VERDICT_DENY 2

/* eg_verdict.flags */
#define EG_VF_MOVED 0x01 /* renamed or linked since it was verified (bpf-lsm, fmod-ret): the
			  * ctime moved with the name, so (mtime, size) stand for the bytes */
#define EG_VF_ATTR 0x02  /* chmod, chown or utimes since it was verified: the ctime (and maybe
			  * the mtime) moved, the bytes did not; the size stands for them */

struct eg_verdict {
	__u64 ctime_ns;
	__u64 size;
	__u32 verdict; /* EG_VERDICT_* */
	__u32 epoch;   /* the rename epoch it was written in (bpf-lsm, fmod-ret) */
	__u64 mtime_ns;
	__u32 flags;   /* EG_VF_* */
	__u32 _pad;
};

/* config[0]: the knobs user space may change while the program runs. */
#define EG_CFG_KILL 0x01         /* send SIGKILL to denied execs in scope */
#define EG_CFG_DENY_UNKNOWN 0x02 /* enforce: unknown or stale files in scope are denied */

struct eg_config {
	__u32 flags;
	__u32 _pad;
};

/* stats[] indexes (per-CPU counters). */
#define EG_STAT_EXECS 0
#define EG_STAT_DROPS 1       /* ring buffer reserve failed: the event is lost */
#define EG_STAT_KILLS 2
#define EG_STAT_KILL_FAILED 3
#define EG_STAT_READ_ERR 4
#define EG_STAT_N 5

#endif
