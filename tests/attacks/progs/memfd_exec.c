/* Exec a copy of PAYLOAD from a memfd: a file with no path on any real filesystem.
 *
 *   memfd-exec fexecve PAYLOAD    execveat(memfd, "", AT_EMPTY_PATH) (glibc's fexecve)
 *   memfd-exec procfd PAYLOAD     execve("/proc/self/fd/N")
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/mman.h>

#include "eg.h"

#ifndef MFD_EXEC
#define MFD_EXEC 0x0010U /* 6.3+: ask for an executable memfd under vm.memfd_noexec=1 */
#endif

extern char **environ;

int main(int argc, char **argv) {
    if (argc != 3) eg_usage("memfd-exec fexecve|procfd PAYLOAD");
    int via_proc = strcmp(argv[1], "procfd") == 0;
    if (!via_proc && strcmp(argv[1], "fexecve") != 0) eg_usage("bad mode");
    int src = open(argv[2], O_RDONLY);
    if (src < 0) eg_fail("open payload");
    int mfd = memfd_create("eg-payload", MFD_EXEC);
    if (mfd < 0 && errno == EINVAL) mfd = memfd_create("eg-payload", 0); /* before 6.3 */
    if (mfd < 0) eg_fail("memfd_create");
    eg_copy(src, mfd);
    int ro = eg_reopen_readonly(mfd);
    char *args[] = {"payload", NULL};
    if (via_proc) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", ro);
        execve(path, args, environ);
        eg_fail("execve /proc/self/fd/N");
    }
    fexecve(ro, args, environ);
    eg_fail("fexecve");
}
