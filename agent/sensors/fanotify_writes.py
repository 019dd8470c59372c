"""Write-opens on filesystems where a file's stamp does not follow writes through a mapping.

Every verdict the fanotify runner keeps (its allow memo, and the trusted cache it decides
with) is keyed by the file's stamp (dev, ino, ctime, size): a write, a truncate or a chmod
changes the stamp, and the verdict no longer matches. A write through a shared mapping
changes it only where the filesystem asks to hear of the first write to each page of a new
mapping, and then updates the times (``page_mkwrite``: ext4, xfs, btrfs, f2fs). On tmpfs
(ramfs, hugetlbfs, an overlay over them, FUSE, ...) a read fault maps a shared page
writable at once: bytes written through it later change no stamp at all (measured on 6.18,
tmpfs: read a page of a ``MAP_SHARED`` ``PROT_WRITE`` mapping, then write the whole file
through it; ctime, mtime and size stay).

There, the runner trusts nothing it did not hash after the last write-open it saw. The
filesystem mark also carries ``FAN_OPEN_PERM``, so every open of a file on it waits for the
loop; the opener's write access is counted before the permission event, so a read lease on
the event's fd (``agent/writers.py``) tells a write-open. For one, before it answers, the
loop removes the inode's ignore mark, counts the open here and has the runner's memo
forget the inode. A verdict decided or remembered while that count moved is taken back.
Nothing can write through a mapping before its open is answered, fanotify never times out,
and the kernel adds no ignore mark to an inode open for write: no allow, remembered or
ignore-marked, outlives a change of the bytes. So on these filesystems an allowed file may
carry an ignore mark again (its exec then costs the loop one cheap open event), except on
an overlay, whose lower files change beneath the overlay's own inode.

Where neither holds (FUSE, network filesystems: the bytes may change with no write-open on
this host at all), nothing is kept: every exec is decided from the bytes.
"""

from __future__ import annotations

from typing import Dict, Tuple

# Filesystems whose page_mkwrite updates ctime/mtime (nanoseconds) at the first write to
# each page of every new shared mapping: there a changed file has a new stamp.
STAMPED = frozenset({"ext4", "ext3", "ext2", "xfs", "btrfs", "f2fs"})  # ext2/3: ext4's driver
# Filesystems whose bytes can change with no write-open on this host: never guarded.
REMOTE = frozenset({"nfs", "nfs4", "cifs", "smb3", "9p", "virtiofs", "ceph", "glusterfs",
                    "afs", "lustre", "fuse", "fuseblk", "ocfs2", "gfs2"})
# its files' bytes live on another filesystem's inodes (opening one opens the lower file:
# never guarded, fanotify_marks.py)
STACKED = frozenset({"overlay", "ecryptfs", "aufs", "shiftfs"})
# Device nodes: an open of one runs its driver's open (a tty, a watchdog device); the guard's
# read would do that in the agent for every open of /dev. Nothing there is worth guarding.
NEVER_GUARDED = frozenset({"devtmpfs"})
MAX_INODES = 65536  # inodes whose write-opens are counted one by one; then all at once

Key = Tuple[int, int]  # (st_dev, st_ino) as fstat() reports them (the memo's key)
Count = Tuple[int, int]  # (epoch, count): compared, never interpreted


def stamps_follow_writes(fstype: str) -> bool:
    """Every write to a file of this filesystem type changes its stamp."""
    return fstype in STAMPED


def guardable(fstype: str) -> bool:
    """Every write to a file of this type needs a write-open on this host, and its stamp
    does not prove the bytes: the loop watches the opens."""
    return not stamps_follow_writes(fstype) and fstype not in REMOTE \
        and fstype not in NEVER_GUARDED and not fstype.startswith("fuse.")


def ignore_marks_hold(fstype: str) -> bool:
    """A guarded filesystem whose inodes hold their own bytes: an ignore mark there is
    removed at the write-open that precedes any change."""
    return guardable(fstype) and fstype not in STACKED


class WriteOpens:
    """How many write-opens of each inode the loop has seen. Written by the loop thread
    only, read by the workers: plain dict operations, no lock."""

    def __init__(self, max_inodes: int = MAX_INODES) -> None:
        self._max = max_inodes
        self._counts: Dict[Key, int] = {}
        self._epoch = 0  # +1 when the table is full and starts again: every count moves
        self.total = 0

    def seen(self, dev: int, ino: int) -> None:
        """On the loop, before the write-open is answered."""
        self.total += 1
        key = (dev, ino)
        if key not in self._counts and len(self._counts) >= self._max:
            self._counts = {}
            self._epoch += 1
        self._counts[key] = self._counts.get(key, 0) + 1

    def count(self, dev: int, ino: int) -> Count:
        """Take it before the bytes are read and compare it after the verdict is out:
        any difference means a write-open came in between."""
        return self._epoch, self._counts.get((dev, ino), 0)
