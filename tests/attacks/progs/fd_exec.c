/* Exec through a file descriptor instead of a path.
 *
 *   fd-exec tmpfile DIR PAYLOAD   open(DIR, O_TMPFILE), copy PAYLOAD in, fexecve: an
 *                                 unlinked file that never had a name
 *   fd-exec opath PAYLOAD         open(O_PATH), execveat(fd, "", AT_EMPTY_PATH)
 *   fd-exec unlinked PAYLOAD      open, unlink PAYLOAD, fexecve
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "eg.h"

#ifndef SYS_execveat
#include <sys/syscall.h>
#endif

extern char **environ;

static char *args[] = {"payload", NULL};

static void run_fd(int fd) __attribute__((noreturn));
static void run_fd(int fd) {
    /* execveat directly: glibc's fexecve would fall back to /proc/self/fd for O_PATH */
    syscall(SYS_execveat, fd, "", args, environ, AT_EMPTY_PATH);
    eg_fail("execveat");
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "tmpfile") == 0) {
        int src = open(argv[3], O_RDONLY);
        if (src < 0) eg_fail("open payload");
        int fd = open(argv[2], O_TMPFILE | O_RDWR, 0755);
        if (fd < 0) eg_fail("open O_TMPFILE");
        eg_copy(src, fd);
        run_fd(eg_reopen_readonly(fd));
    }
    if (argc == 3 && strcmp(argv[1], "opath") == 0) {
        int fd = open(argv[2], O_PATH);
        if (fd < 0) eg_fail("open O_PATH");
        run_fd(fd);
    }
    if (argc == 3 && strcmp(argv[1], "unlinked") == 0) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) eg_fail("open");
        if (unlink(argv[2]) < 0) eg_fail("unlink");
        run_fd(fd);
    }
    eg_usage("fd-exec tmpfile DIR PAYLOAD | opath PAYLOAD | unlinked PAYLOAD");
}
