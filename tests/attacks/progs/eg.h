/* Shared by the attack programs: how a step reports its failure.
 *
 * The harness (tests/attacks/harness.py) must tell "refused before any attacker code ran"
 * from "the test itself is broken". A step refused with EPERM/EACCES (what every execguard
 * backend and the kernel's own checks answer) exits 126 with an EG-DENIED line; any other
 * failure exits 70 with an EG-ERROR line. Only attacker code (payload, blob, preload,
 * injected shellcode) ever prints EG-PWNED; these helpers never do.
 */
#ifndef EG_H
#define EG_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define EG_EXIT_DENIED 126
#define EG_EXIT_ERROR 70

static void eg_fail(const char *step) __attribute__((noreturn));
static void eg_fail(const char *step) {
    int e = errno;
    if (e == EPERM || e == EACCES) {
        dprintf(2, "EG-DENIED %s: %s\n", step, strerror(e));
        _exit(EG_EXIT_DENIED);
    }
    dprintf(2, "EG-ERROR %s: %s\n", step, strerror(e));
    _exit(EG_EXIT_ERROR);
}

static void eg_usage(const char *text) __attribute__((noreturn));
static void eg_usage(const char *text) {
    dprintf(2, "EG-ERROR usage: %s\n", text);
    _exit(EG_EXIT_ERROR);
}

/* Copy all of src_fd into dst_fd from their current offsets. */
static void eg_copy(int src_fd, int dst_fd) {
    char buf[65536];
    for (;;) {
        ssize_t n = read(src_fd, buf, sizeof buf);
        if (n < 0) eg_fail("read");
        if (n == 0) return;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(dst_fd, buf + off, (size_t)(n - off));
            if (w < 0) eg_fail("write");
            off += w;
        }
    }
}

/* A read-only descriptor for the file behind a writable one, which is then closed: exec
 * refuses a file that has writers (ETXTBSY), and an unlinked file has no other path. */
static int eg_reopen_readonly(int rw_fd) {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", rw_fd);
    int ro = open(path, O_RDONLY);
    if (ro < 0) eg_fail("reopen read-only");
    close(rw_fd);
    return ro;
}

#endif
