/* Exec through a mount that is attached nowhere: it never shows in any mountinfo, so
 * nothing that watches the mount table can see it (root, or root of a user namespace).
 *
 *   mount-exec open-tree DIR NAME     open_tree(DIR, OPEN_TREE_CLONE): a detached copy of
 *                                     DIR's mount; exec DIR/NAME through it
 *   mount-exec fsmount PAYLOAD        fsopen("tmpfs") + fsmount: a new, detached tmpfs;
 *                                     copy PAYLOAD in and exec it
 *   mount-exec bind SRC DST           mount(2) SRC over DST (MS_BIND), then exec DST: a
 *                                     refused mount says EG-DENIED with the errno, which
 *                                     mount(8) words misleadingly for a file bind mount
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/syscall.h>

#include "eg.h"

#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_fsopen
#define SYS_fsopen 430
#endif
#ifndef SYS_fsconfig
#define SYS_fsconfig 431
#endif
#ifndef SYS_fsmount
#define SYS_fsmount 432
#endif
#define EG_OPEN_TREE_CLONE 1
#define EG_FSCONFIG_CMD_CREATE 6

extern char **environ;

static char *args[] = {"payload", NULL};

static void run_fd(int fd) __attribute__((noreturn));
static void run_fd(int fd) {
    syscall(SYS_execveat, fd, "", args, environ, AT_EMPTY_PATH);
    eg_fail("execveat");
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "open-tree") == 0) {
        int tree = (int)syscall(SYS_open_tree, AT_FDCWD, argv[2], EG_OPEN_TREE_CLONE);
        if (tree < 0) eg_fail("open_tree");
        int fd = openat(tree, argv[3], O_RDONLY);
        if (fd < 0) eg_fail("openat");
        run_fd(fd);
    }
    if (argc == 3 && strcmp(argv[1], "fsmount") == 0) {
        int src = open(argv[2], O_RDONLY);
        if (src < 0) eg_fail("open payload");
        int fs = (int)syscall(SYS_fsopen, "tmpfs", 0);
        if (fs < 0) eg_fail("fsopen");
        if (syscall(SYS_fsconfig, fs, EG_FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0)
            eg_fail("fsconfig");
        int mnt = (int)syscall(SYS_fsmount, fs, 0, 0);
        if (mnt < 0) eg_fail("fsmount");
        int fd = openat(mnt, "payload", O_CREAT | O_RDWR, 0755);
        if (fd < 0) eg_fail("openat");
        eg_copy(src, fd);
        run_fd(eg_reopen_readonly(fd));
    }
    if (argc == 4 && strcmp(argv[1], "bind") == 0) {
        if (mount(argv[2], argv[3], NULL, MS_BIND, NULL) < 0)
            eg_fail("mount --bind"); /* EPERM: EG-DENIED (the mount guard) */
        execv(argv[3], args);
        eg_fail("execv");
    }
    eg_usage("mount-exec open-tree DIR NAME | fsmount PAYLOAD | bind SRC DST");
}
