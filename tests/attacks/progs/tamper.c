/* Change an allowed binary's bytes the ordinary ways (each must drop its verdict):
 *
 *   tamper write TARGET SOURCE          write(2) SOURCE over the head of TARGET
 *   tamper truncate TARGET SOURCE       O_TRUNC, then write SOURCE
 *   tamper copy-range TARGET SOURCE     copy_file_range SOURCE over the head of TARGET
 *   tamper hardlink TARGET SOURCE LINK  link TARGET as LINK, write SOURCE through LINK
 *   tamper rename-over TARGET SOURCE    rename SOURCE over TARGET (a new inode)
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "eg.h"

static int open_source(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) eg_fail("open source");
    return fd;
}

static void write_over(const char *target, const char *source, int flags) {
    int dst = open(target, O_WRONLY | flags);
    if (dst < 0) eg_fail("open target");
    eg_copy(open_source(source), dst);
    if (close(dst) < 0) eg_fail("close");
}

static void copy_range(const char *target, const char *source) {
    int src = open_source(source);
    int dst = open(target, O_WRONLY);
    if (dst < 0) eg_fail("open target");
    for (;;) {
        ssize_t n = copy_file_range(src, NULL, dst, NULL, 1 << 20, 0);
        if (n < 0) eg_fail("copy_file_range");
        if (n == 0) break;
    }
    if (close(dst) < 0) eg_fail("close");
}

int main(int argc, char **argv) {
    if (argc < 4) eg_usage("tamper MODE TARGET SOURCE [LINK]");
    const char *mode = argv[1], *target = argv[2], *source = argv[3];
    if (strcmp(mode, "write") == 0) {
        write_over(target, source, 0);
    } else if (strcmp(mode, "truncate") == 0) {
        write_over(target, source, O_TRUNC);
    } else if (strcmp(mode, "copy-range") == 0) {
        copy_range(target, source);
    } else if (strcmp(mode, "hardlink") == 0 && argc == 5) {
        if (link(target, argv[4]) < 0) eg_fail("link");
        write_over(argv[4], source, 0);
    } else if (strcmp(mode, "rename-over") == 0) {
        if (rename(source, target) < 0) eg_fail("rename");
    } else {
        eg_usage("tamper write|truncate|copy-range|hardlink|rename-over TARGET SOURCE [LINK]");
    }
    printf("EG-TAMPERED %s\n", mode);
    return 0;
}
