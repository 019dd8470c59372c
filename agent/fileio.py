"""Reading the small files an operator names (policies, keys, bundles, tokens) safely.

O_NONBLOCK plus a regular-file check: a FIFO or a device given as a path must not hang the
agent or the CLI. The size cap is checked by reading one byte more than allowed, so a file
that grows while it is read is still bounded.
"""

from __future__ import annotations

import errno
import os
import stat

from agent.errors import InputError, MalformedInput


def read_small_file(path: str, limit: int, what: str, root_only: bool = False) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    ``what`` names the expected content ("a policy", "a public key") for the messages:
    InputError when the file cannot be read or is not a regular file, MalformedInput when
    it is too large to be ``what``. ``root_only`` (files the agent picks up by itself, such
    as the policy drop directory's): a symlink is not followed, and a file owned by another
    user or writable by group or others is InputError."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags | (os.O_NOFOLLOW if root_only else 0))
    except OSError as exc:
        if root_only and exc.errno == errno.ELOOP:
            raise InputError(path, "is a symbolic link (not followed here)") from None
        raise InputError(path, exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            raise InputError(path, f"is a directory, not {what}")
        if not stat.S_ISREG(mode):
            raise InputError(path, "is not a regular file")
        if root_only:
            check_root_owned(path, st)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise InputError(path, f"read failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise MalformedInput(path, f"larger than {limit} bytes, not {what}")
    return b"".join(chunks)


def check_root_owned(path: str, st: os.stat_result) -> None:
    """InputError unless ``st`` is owned by root (or this process's user) and writable by
    its owner alone: what others can write is not root's input."""
    if st.st_uid not in (0, os.geteuid()):
        raise InputError(path, f"is owned by uid {st.st_uid}, not by root")
    if st.st_mode & 0o022:
        raise InputError(path, f"is writable by group or others (mode "
                               f"{stat.S_IMODE(st.st_mode):o})")
