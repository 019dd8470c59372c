/* A user-space loader: the attacker's code file is never exec'd, only mapped executable
 * and called, so an exec hook never sees it.
 *
 *   loader mmap FILE       mmap(PROT_READ|PROT_EXEC) and jump
 *   loader mprotect FILE   mmap(PROT_READ), then mprotect(PROT_READ|PROT_EXEC), then jump
 *   loader readexec FILE   personality(READ_IMPLIES_EXEC), then mmap(PROT_READ) and jump:
 *                          the kernel adds PROT_EXEC itself (mmap_prot), so a check of the
 *                          prot the caller asked for sees no PROT_EXEC at all
 */
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/personality.h>

#include "eg.h"

int main(int argc, char **argv) {
    if (argc != 3) eg_usage("loader mmap|mprotect|readexec FILE");
    int late = strcmp(argv[1], "mprotect") == 0;
    int implied = strcmp(argv[1], "readexec") == 0;
    if (!late && !implied && strcmp(argv[1], "mmap") != 0)
        eg_usage("loader mmap|mprotect|readexec FILE");
    if (implied && personality(READ_IMPLIES_EXEC) < 0) eg_fail("personality");
    int fd = open(argv[2], O_RDONLY);
    if (fd < 0) eg_fail("open");
    struct stat st;
    if (fstat(fd, &st) < 0) eg_fail("fstat");
    int prot = late || implied ? PROT_READ : PROT_READ | PROT_EXEC;
    void *code = mmap(NULL, (size_t)st.st_size, prot, MAP_PRIVATE, fd, 0);
    if (code == MAP_FAILED) eg_fail("mmap");
    if (late && mprotect(code, (size_t)st.st_size, PROT_READ | PROT_EXEC) < 0)
        eg_fail("mprotect");
    ((void (*)(void))code)(); /* the blob exits by itself */
    dprintf(2, "EG-ERROR the blob returned\n");
    return EG_EXIT_ERROR;
}
