"""A FUSE filesystem that serves an executable file and never answers the agent.

The attacker's side of the FUSE stall (docs/threat-model.md, "A FUSE filesystem in
scope"): for every exec permission event the kernel opens the event's file *inside the
agent's* ``read(2)`` of its fanotify group, and on FUSE that open is a request to this
daemon. Requests made by any thread of ``--stall-pid`` (the agent) are read and never
answered (``--stall read``: only its reads of file data, so the agent's open and stat get
through and a decide worker hashing the file is what waits; ``--stall none``: a plain
filesystem); everybody else is served.
Every name in the root directory is a file of its own (its own inode) with the same
bytes, so many execs need many decisions. Without a defence the agent's event loop (or a decide
worker hashing the file) waits for ever, and with it every exec in scope.

Speaks the kernel's FUSE protocol on /dev/fuse directly (no libfuse: nothing to install),
mounting with mount(2) as root, or (``--fusermount``) through the setuid
``fusermount3`` as any user, as an unprivileged attacker would. Only what an exec needs:
INIT, LOOKUP, GETATTR, OPEN, READ, RELEASE, FLUSH; everything else gets ENOSYS.
Attributes are never cached (valid for 0 s), so every stat of the file is a request too.

    python -m tests.attacks.fuse_daemon --mountpoint DIR --file PATH \
        --stall-pid PID [--stall all|read|none] [--fusermount] [--ready FILE] \
        [--options default_permissions]

``--ready FILE`` is written once the mount exists. The daemon exits when the connection
goes (unmounted, or aborted through /sys/fs/fuse/connections/N/abort).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Set

# opcodes (include/uapi/linux/fuse.h)
LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH = 1, 2, 3, 14, 15, 18, 25
INIT, INTERRUPT, BATCH_FORGET, DESTROY = 26, 36, 42, 38
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ext, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime, nsecs, mode ... flags
ROOT = 1
BUFFER = 1 << 20 | 4096  # at least max_write + a header


def attr(ino: int, size: int, mode: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(mode) else 1
    return ATTR.pack(ino, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, nlink,
                     0, 0, 0, 4096, 0)


class Daemon:
    def __init__(self, dev: int, payload: bytes, stall_pid: int, ops: Set[int]) -> None:
        self.dev, self.payload, self.stall_pid, self.ops = dev, payload, stall_pid, ops
        self.stalled: Dict[int, int] = {}  # unique -> opcode, never answered
        self.inodes: Dict[bytes, int] = {}  # name -> inode

    def of_stalled(self, pid: int) -> bool:
        return os.path.exists(f"/proc/{self.stall_pid}/task/{pid}")

    def serve(self) -> None:
        while True:
            try:
                req = os.read(self.dev, BUFFER)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return  # ENODEV: unmounted or aborted
            length, op, unique, node, _uid, _gid, pid, _ext, _pad = IN_HEADER.unpack_from(req)
            body = req[IN_HEADER.size:length]
            if op in NO_REPLY:
                continue
            if op in self.ops and self.of_stalled(pid):
                self.stalled[unique] = op
                continue
            self.answer(op, unique, node, body)

    def answer(self, op: int, unique: int, node: int, body: bytes) -> None:
        err, out = 0, b""
        if op == INIT:
            _major, _minor, readahead, _flags = struct.unpack_from("<IIII", body)
            # major, minor, max_readahead, flags, max_background, congestion, max_write,
            # time_gran, max_pages, map_alignment, flags2, then reserved words: 64 bytes
            out = struct.pack("<IIIIHHIIHHI", 7, 31, readahead, 0, 16, 12, 1 << 20, 1, 0, 0, 0)
            out += bytes(64 - len(out))
        elif op == LOOKUP:
            if node == ROOT:
                ino = self.inodes.setdefault(body.rstrip(b"\0"), ROOT + 1 + len(self.inodes))
                out = struct.pack("<QQQQII", ino, 0, 0, 0, 0, 0)
                out += attr(ino, len(self.payload), stat.S_IFREG | 0o755)
            else:
                err = -errno.ENOENT
        elif op == GETATTR:
            a = (attr(ROOT, 0, stat.S_IFDIR | 0o755) if node == ROOT
                 else attr(node, len(self.payload), stat.S_IFREG | 0o755))
            out = struct.pack("<QII", 0, 0, 0) + a
        elif op == OPEN:
            out = struct.pack("<QIi", 1, 0, 0)
        elif op == READ:
            _fh, offset, size = struct.unpack_from("<QQI", body)
            out = self.payload[offset:offset + size]
        elif op in (RELEASE, FLUSH, DESTROY):
            pass
        else:
            err = -errno.ENOSYS
        # ENOENT: the request was interrupted meanwhile, nothing to do
        with contextlib.suppress(OSError):
            os.write(self.dev, OUT_HEADER.pack(OUT_HEADER.size + len(out), err, unique) + out)


def mount(dev: int, where: str, extra: str = "") -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={dev},rootmode=40000,user_id=0,group_id=0,allow_other{extra}".encode()
    if libc.mount(b"eg-stall-fuse", where.encode(), b"fuse", 0, opts) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount fuse on {where}: {os.strerror(e)}")


def mount_as_user(where: str, extra: str = "") -> int:
    """fusermount3 mounts for us and hands /dev/fuse back over a socket (_FUSE_COMMFD)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
    subprocess.run(["fusermount3", "-o", f"fsname=eg-stall-fuse{extra}", "--", where], env=env,
                   pass_fds=[theirs.fileno()], check=True, timeout=30)
    theirs.close()
    _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    ours.close()
    if not fds:
        raise OSError(f"fusermount3 sent no /dev/fuse fd for {where}")
    return fds[0]


def main(argv: Optional[list] = None) -> int:  # type: ignore[type-arg]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mountpoint", required=True)
    ap.add_argument("--file", required=True, help="the bytes to serve")
    ap.add_argument("--stall-pid", type=int, required=True)
    ap.add_argument("--stall", choices=("all", "read", "none"), default="all",
                    help="which of the stalled pid's requests are never answered")
    ap.add_argument("--ready")
    ap.add_argument("--fusermount", action="store_true",
                    help="mount through fusermount3 (as the user running this)")
    ap.add_argument("--options", default="",
                    help="more mount options, comma-separated (default_permissions: the "
                         "kernel asks the daemon for attributes at every permission check, "
                         "the mark's path lookup included)")
    args = ap.parse_args(argv)
    extra = f",{args.options}" if args.options else ""
    if args.fusermount:
        dev = mount_as_user(args.mountpoint, extra)
    else:
        dev = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        mount(dev, args.mountpoint, extra)
    if args.ready:
        Path(args.ready).write_text("mounted\n")
    ops = {"read": {READ}, "none": set()}.get(args.stall, set(range(1, 64)) - {INIT})
    Daemon(dev, Path(args.file).read_bytes(), args.stall_pid, ops).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
