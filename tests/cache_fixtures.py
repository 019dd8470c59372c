"""Helpers for the trusted-cache tests: verdicts, and identities read from real files."""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Tuple

from agent.cache import identity_from_stat
from agent.decision import FileIdentity
from agent.errors import Reason
from agent.verify.model import Evidence, SignatureKind, Verdict

BINDING = "a" * 64
OTHER_BINDING = "b" * 64


def evidence(source: str = "/opt/app/bin.sig") -> Evidence:
    return Evidence(SignatureKind.COSIGN_SIG, source, key_fingerprint="sha256:" + "c" * 64)


def trusted(detail: str = "signed by sha256:cc..") -> Verdict:
    return Verdict.ok(evidence(), detail)


def denied(reason: Reason = Reason.NO_SIGNATURE, detail: str = "no signature found") -> Verdict:
    return Verdict.fail(reason, detail)


def rich_verdict() -> Verdict:
    """Every field set, attempts included: the round trip must keep all of it."""
    keyless = Evidence(SignatureKind.BUNDLE_KEYLESS, "/opt/app/bin.sigstore.json",
                       identity="https://github.com/o/r/.github/workflows/rel.yml@refs/tags/v1",
                       issuer="https://token.actions.githubusercontent.com", log_index=12345678,
                       integrated_time=1_700_000_000,
                       bundle_media_type="application/vnd.dev.sigstore.bundle.v0.3+json")
    bad = Verdict.fail(Reason.UNTRUSTED_KEY, "key not trusted", evidence("/opt/app/bin.sig"))
    return Verdict(True, Reason.OK, "keyless signer matched", keyless, (bad,))


def fake_identity(n: int, ctime_ns: int = 1_000, size: int = 10) -> FileIdentity:
    return FileIdentity(dev=2049, ino=n, ctime_ns=ctime_ns, size=size)


def sha_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_identity(path: str) -> Tuple[FileIdentity, str]:
    """What the agent does at exec time: open, fstat the fd, hash from that fd."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ident = identity_from_stat(os.fstat(fd))
        h = hashlib.sha256()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            h.update(chunk)
        return ident, h.hexdigest()
    finally:
        os.close(fd)


def identity_of(path: str) -> FileIdentity:
    return open_identity(path)[0]


def write_file(path: str, data: bytes, mode: Optional[int] = 0o755) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
    if mode is not None:
        os.chmod(path, mode)
