"""Reading the small files an operator names (policies, keys, bundles, tokens) safely.

O_NONBLOCK plus a regular-file check: a FIFO or a device given as a path must not hang the
agent or the CLI. The size cap is checked by reading one byte more than allowed, so a file
that grows while it is read is still bounded.
"""

from __future__ import annotations

import os
import stat

from agent.errors import InputError, MalformedInput


def read_small_file(path: str, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    ``what`` names the expected content ("a policy", "a public key") for the messages:
    InputError when the file cannot be read or is not a regular file, MalformedInput when
    it is too large to be ``what``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise InputError(path, exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(path, f"is a directory, not {what}")
        if not stat.S_ISREG(mode):
            raise InputError(path, "is not a regular file")
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
