"""Hash a file from the descriptor the verifier opened, never from a path re-opened later."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import Dict

from agent.errors import InputError

CHUNK = 1 << 20  # 1 MiB: large enough that hashlib (OpenSSL) runs at full speed.
DEFAULT_MAX_SIZE = 2 << 30  # refuse files over 2 GiB rather than read without bound


def hash_fd(fd: int, algorithm: str = "sha256", expect_size: int | None = None) -> bytes:
    """Digest everything readable from ``fd`` with positional reads (the fd offset is untouched).

    Raises ``OSError`` on I/O errors and ``ValueError`` when the size differs from
    ``expect_size``: a file that changes while it is hashed must not be trusted.
    """
    h = hashlib.new(algorithm)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while True:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            break
        h.update(view[:n])
        offset += n
    if expect_size is not None and offset != expect_size:
        raise ValueError(
            f"file changed while hashing ({offset} bytes read, {expect_size} expected)")
    return h.digest()


@dataclass
class Artifact:
    """An opened regular file plus its identity; every later read uses the same fd."""

    path: str
    fd: int
    size: int
    dev: int
    ino: int
    ctime_ns: int
    mtime_ns: int
    _digests: Dict[str, bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str, max_size: int = DEFAULT_MAX_SIZE) -> Artifact:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except IsADirectoryError:
            raise InputError(path, "is a directory, not a file") from None
        except OSError as exc:
            raise InputError(path, exc.strerror or str(exc)) from None
        try:
            return cls.from_fd(path, fd, max_size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, path: str, fd: int, max_size: int = DEFAULT_MAX_SIZE) -> Artifact:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(path, "is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(path, "is not a regular file")
        if st.st_size > max_size:
            raise InputError(path, f"is {st.st_size} bytes, over the {max_size}-byte limit")
        return cls(path, fd, st.st_size, st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns)

    def digest(self, algorithm: str = "sha256") -> bytes:
        """The file's digest under ``algorithm``, computed once per artifact."""
        if algorithm not in self._digests:
            try:
                self._digests[algorithm] = hash_fd(self.fd, algorithm, self.size)
            except OSError as exc:
                raise InputError(self.path, f"read failed: {exc.strerror or exc}") from None
            except ValueError as exc:
                raise InputError(self.path, str(exc)) from None
        return self._digests[algorithm]

    def known_digest(self, algorithm: str, digest: bytes) -> None:
        """Record a digest known for this exact identity (the verdict cache): no re-hash."""
        self._digests.setdefault(algorithm, digest)

    @property
    def sha256(self) -> bytes:
        return self.digest("sha256")

    def read_all(self) -> bytes:
        """The whole content (for schemes that sign the message itself, such as pure Ed25519)."""
        chunks = []
        offset = 0
        while offset < self.size:
            try:
                data = os.pread(self.fd, min(CHUNK, self.size - offset), offset)
            except OSError as exc:
                raise InputError(self.path, f"read failed: {exc.strerror or exc}") from None
            if not data:
                break
            chunks.append(data)
            offset += len(data)
        if offset != self.size:
            raise InputError(self.path, "file changed while reading")
        return b"".join(chunks)

    def pread(self, size: int, offset: int) -> bytes:
        try:
            return os.pread(self.fd, size, offset)
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise InputError(self.path, "is a directory, not a file") from None
            raise InputError(self.path, f"read failed: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
