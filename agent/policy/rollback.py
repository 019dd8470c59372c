"""The applied policy bundle, kept in the state directory across restarts (anti-rollback).

``<state_dir>/policy-bundle/applied.json`` holds the version and payload digest in force,
``current.bundle`` the envelope itself, so a restarted agent comes back on it (re-verified).
Both are written to a temporary file, fsync'd, renamed over the old one, and the directory
fsync'd: a crash leaves the old state or the new one, never a torn file. The bundle is
written first; ``applied.json`` last is the commit point.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from agent.errors import InputError, MalformedInput

SUBDIR = "policy-bundle"
STATE_FILE = "applied.json"
BUNDLE_FILE = "current.bundle"
MAX_STATE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Applied:
    version: int
    digest: str  # sha256: of the bundle payload
    applied_at: float  # time.time()

    def to_json(self) -> Dict[str, Any]:
        return {"version": self.version, "digest": self.digest, "applied_at": self.applied_at}


def bundle_dir(state_dir: str) -> str:
    return os.path.join(state_dir, SUBDIR)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Temporary file, fsync, rename, fsync of the directory."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class AppliedStore:
    """Reads and commits the applied bundle under ``state_dir``."""

    def __init__(self, state_dir: str) -> None:
        self.directory = bundle_dir(state_dir)
        self.state_path = os.path.join(self.directory, STATE_FILE)
        self.bundle_path = os.path.join(self.directory, BUNDLE_FILE)

    def load(self) -> Optional[Applied]:
        """The committed state, None when no bundle was ever applied; a damaged state file
        is MalformedInput (the caller must not treat it as "nothing applied")."""
        try:
            with open(self.state_path, "rb") as fh:
                data = fh.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(self.state_path, exc.strerror or str(exc)) from None
        try:
            doc = json.loads(data)
            version, digest = doc["version"], doc["digest"]
            if type(version) is not int or not isinstance(digest, str):
                raise ValueError("bad field types")
            return Applied(version, digest, float(doc.get("applied_at", 0.0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedInput(self.state_path, f"applied-bundle state is damaged ({exc})"
                                 ) from None

    def load_bundle(self) -> Optional[bytes]:
        try:
            with open(self.bundle_path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(self.bundle_path, exc.strerror or str(exc)) from None

    def commit(self, envelope_bytes: bytes, version: int, digest: str) -> Applied:
        """Keep the bundle, then record its version: the anti-rollback high-water mark."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        applied = Applied(version, digest, time.time())
        write_atomic(self.bundle_path, envelope_bytes)
        write_atomic(self.state_path,
                     json.dumps(applied.to_json(), sort_keys=True).encode() + b"\n")
        return applied
