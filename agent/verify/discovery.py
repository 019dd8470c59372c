"""Find the signatures that may cover a file: beside it, or in stores keyed by its sha256.

Reads are bounded (``MAX_SIGNATURE_FILE``) and never block on a FIFO or device. Store
entries are opened with O_NOFOLLOW relative to the store directory, so a symlink planted
in a store is refused rather than followed. A discovered file that cannot be read becomes
a failed candidate, not an exception: one bad file must not hide another good one. The
exception: the host itself is short of something (no fd left, no memory). That says nothing
about the file, so it is raised (``HostShortage``) and the decision fails as an I/O error,
never cached as "no signature" or "malformed" for a file that is signed.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import List, Tuple

from agent.digest import Artifact
from agent.errors import InputError
from agent.verify.model import TrustConfig

MAX_SIGNATURE_FILE = 1 << 20  # 1 MiB: bundles with long chains are ~10 KiB
# the host is short of a resource: not a property of the signature file
SHORTAGES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN,
             errno.EINTR)
SIG_SUFFIX = ".sig"
BUNDLE_SUFFIXES = (".sigstore.json", ".bundle")
SUFFIXES = (SIG_SUFFIX, *BUNDLE_SUFFIXES)


@dataclass(frozen=True)
class Candidate:
    """One signature file found for an artifact; ``error`` is set when it could not be read."""

    source: str
    kind: str  # "sig" | "bundle"
    data: bytes = b""
    error: str | None = None
    oversized: bool = False


class HostShortage(InputError):
    """A signature file could not be opened or read for want of fds or memory."""


def _shortage(path: str, exc: OSError) -> None:
    if exc.errno in SHORTAGES:
        raise HostShortage(path, f"the host is short of resources: {exc.strerror or exc}"
                           ) from None


def kind_for(path: str) -> str:
    return "sig" if path.endswith(SIG_SUFFIX) else "bundle"


def _read_fd(fd: int, path: str) -> Tuple[bytes, bool]:
    """Read at most MAX_SIGNATURE_FILE bytes from a regular file; (data, oversized)."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise InputError(path, "is a directory, not a signature file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, "is not a regular file")
    if st.st_size > MAX_SIGNATURE_FILE:
        return b"", True
    chunks = []
    total = 0
    while total <= MAX_SIGNATURE_FILE:
        chunk = os.read(fd, MAX_SIGNATURE_FILE + 1 - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > MAX_SIGNATURE_FILE:  # grew after fstat
        return b"", True
    return b"".join(chunks), False


def read_signature_file(path: str, dir_fd: int | None = None,
                        nofollow: bool = False) -> Tuple[bytes, bool]:
    """Open and read a signature file. Raises FileNotFoundError (absent) or InputError."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    if nofollow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        _shortage(path, exc)
        if exc.errno == errno.ELOOP and nofollow:
            raise InputError(path, "is a symlink; store entries must be regular files") from None
        if exc.errno == errno.EISDIR:
            raise InputError(path, "is a directory, not a signature file") from None
        raise InputError(path, exc.strerror or str(exc)) from None
    try:
        return _read_fd(fd, path)
    except OSError as exc:
        _shortage(path, exc)
        raise InputError(path, f"read failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _candidate(shown: str, name: str, dir_fd: int | None, nofollow: bool
               ) -> Candidate | None:
    try:
        data, oversized = read_signature_file(name, dir_fd, nofollow)
    except FileNotFoundError:
        return None
    except HostShortage:
        raise
    except InputError as exc:
        return Candidate(shown, kind_for(shown), error=exc.problem)
    return Candidate(shown, kind_for(shown), data, oversized=oversized)


def explicit(path: str, kind: str) -> Candidate:
    """A file the operator named: unreadable means an InputError (exit 2), not a verdict."""
    try:
        data, oversized = read_signature_file(path)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    return Candidate(path, kind, data, oversized=oversized)


def locations(artifact: Artifact, trust: TrustConfig) -> List[str]:
    """Every place discovery looks, for the ``no-signature`` explanation."""
    hexd = artifact.sha256.hex()
    out = [artifact.path + s for s in SUFFIXES]
    out += [os.path.join(d, hexd + s) for d in trust.store_dirs for s in SUFFIXES]
    return out


def discover(artifact: Artifact, trust: TrustConfig) -> List[Candidate]:
    """Signatures beside the file, then in each store (``<sha256 hex><suffix>``)."""
    found: List[Candidate] = []
    for suffix in SUFFIXES:
        path = artifact.path + suffix
        cand = _candidate(path, path, None, False)
        if cand is not None:
            found.append(cand)
    hexd = artifact.sha256.hex()
    for store in trust.store_dirs:
        try:
            dfd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            _shortage(store, exc)
            continue  # a missing store is an empty store; the CLI checks the ones it is given
        try:
            for suffix in SUFFIXES:
                name = hexd + suffix
                cand = _candidate(os.path.join(store, name), name, dfd, True)
                if cand is not None:
                    found.append(cand)
        finally:
            os.close(dfd)
    return found
