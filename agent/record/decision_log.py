"""The decision-log schema (docs/records.md): one JSON object per Decision, and back.

This module is the only place a Decision becomes a dict and a dict becomes a Decision again,
so the log, `execguard denials` and any export share one schema. Parsing never guesses: a
line that does not match the schema raises LogFormatError naming the file, line and field.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from agent import __version__
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import MalformedInput, Reason
from agent.hostid import record_host
from agent.verify.model import Evidence, SignatureKind

SCHEMA_VERSION = 1
LOG_NAME = "decisions.jsonl"

_id_lock = threading.Lock()
_id_last = 0


def new_record_id() -> str:
    """A unique, time-ordered id: 13 hex digits of microseconds, then 6 random hex digits.

    Unique within a process (the microsecond part never repeats) and, through the random
    part, across restarts and hosts. It never changes once written: `denials explain ID`.
    """
    global _id_last
    with _id_lock:
        now = max(time.time_ns() // 1000, _id_last + 1)
        _id_last = now
    return f"{now:013x}{secrets.token_hex(3)}"


class LogFormatError(MalformedInput):
    """A decision-log line that is not a record of this schema."""


@dataclass(frozen=True)
class LoggedDecision:
    """One decision-log record: its id and the Decision it was made from."""

    id: str
    decision: Decision
    # the host and agent version that wrote it; None in records from before they existed
    host: Optional[Dict[str, Optional[str]]] = None
    agent_version: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        """The record as it was written: its own host and agent version, not the reader's."""
        obj = to_json(self.id, self.decision)
        obj["host"], obj["agent_version"] = self.host, self.agent_version
        return obj


def _iso(ns: int) -> str:
    ts = datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc)
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns % 1_000_000_000) // 1000:06d}Z"


def to_json(record_id: str, d: Decision,
            host: Optional[Dict[str, Optional[str]]] = None) -> Dict[str, Any]:
    """The schema-v1 object for one Decision as this agent writes it (field order is the
    documented order): ``host`` is this host (agent/hostid.py) unless given, the version is
    this agent's. A record read back re-serializes with ``LoggedDecision.to_json``."""
    ev = d.event
    ident = ev.identity
    return {
        "v": SCHEMA_VERSION,
        "id": record_id,
        "time": _iso(ev.timestamp_ns),
        "time_ns": ev.timestamp_ns,
        "host": host if host is not None else record_host(),
        "agent_version": __version__,
        "decision": "allow" if d.allow else "deny",
        "reason": d.reason.value,
        "detail": d.detail,
        "enforcement": d.enforcement.value,
        "source": d.source.value,
        "event": {
            "pid": ev.pid,
            "ppid": ev.ppid,
            "uid": ev.uid,
            "gid": ev.gid,
            "auid": ev.auid,
            "comm": ev.comm,
            "path": ev.path,
            "dev": ident.dev,
            "ino": ident.ino,
            "ctime_ns": ident.ctime_ns,
            "size": ident.size,
            "backend": ev.backend,
        },
        "sha256": d.sha256,
        "evidence": d.evidence.to_json() if d.evidence is not None else None,
        "rule_id": d.rule_id,
        "policy_version": d.policy_version,
        "policy_digest": d.policy_digest,
        "go": d.go,
        "latency_us": d.latency_us,
        "extra": d.extra,
    }


def to_line(record_id: str, d: Decision) -> bytes:
    """One JSON line (UTF-8, newline-terminated). Non-JSON values in go/extra become strings."""
    text = json.dumps(to_json(record_id, d), ensure_ascii=False, separators=(",", ":"),
                      default=str)
    # a path can hold bytes that are not UTF-8 (surrogate escapes): keep them visible
    return (text + "\n").encode("utf-8", "backslashreplace")


class _Reader:
    """Typed field access that names the field when the record is wrong."""

    def __init__(self, path: str, line: int) -> None:
        self.path = path
        self.line = line

    def fail(self, problem: str) -> LogFormatError:
        return LogFormatError(self.path, f"line {self.line}: {problem}")

    def obj(self, src: Dict[str, Any], key: str, optional: bool = False) -> Any:
        if key not in src:
            if optional:
                return None
            raise self.fail(f"missing field {key!r}")
        return src[key]

    def typed(self, src: Dict[str, Any], key: str, kind: type, optional: bool = False) -> Any:
        val = self.obj(src, key, optional)
        if val is None and optional:
            return None
        if not isinstance(val, kind) or (kind is int and isinstance(val, bool)):
            raise self.fail(f"field {key!r} must be {kind.__name__}, not {type(val).__name__}")
        return val

    def enum(self, src: Dict[str, Any], key: str, kind: Any) -> Any:
        val = self.typed(src, key, str)
        try:
            return kind(val)
        except ValueError:
            raise self.fail(f"field {key!r}: unknown value {val!r}") from None


def _evidence(r: _Reader, src: Any) -> Optional[Evidence]:
    if src is None:
        return None
    if not isinstance(src, dict):
        raise r.fail("field 'evidence' must be an object")
    return Evidence(
        kind=r.enum(src, "kind", SignatureKind),
        source=r.typed(src, "source", str),
        key_fingerprint=r.typed(src, "key_fingerprint", str, True),
        identity=r.typed(src, "identity", str, True),
        issuer=r.typed(src, "issuer", str, True),
        log_index=r.typed(src, "log_index", int, True),
        integrated_time=r.typed(src, "integrated_time", int, True),
        bundle_media_type=r.typed(src, "bundle_media_type", str, True),
        extensions=_extensions(r, r.typed(src, "extensions", dict, True) or {}),
    )


def _extensions(r: _Reader, src: Dict[str, Any]) -> Tuple[Tuple[str, str], ...]:
    """A keyless signer's Fulcio extensions (OID -> text), sorted by OID as the verifier
    makes them: a candidate policy that requires them (``policy whatif``) must see them."""
    out = []
    for oid, text in src.items():
        parts = oid.split(".")
        if not isinstance(text, str) or not all(p.isdigit() for p in parts):
            raise r.fail(f"field 'evidence.extensions': {oid!r} is not an OID with a text value")
        out.append((oid, text))
    return tuple(sorted(out, key=lambda kv: [int(p) for p in kv[0].split(".")]))


def from_json(obj: Any, path: str = "<record>", line: int = 0) -> LoggedDecision:
    """Parse one schema-v1 object; ``path`` and ``line`` name it in an error."""
    r = _Reader(path, line)
    if not isinstance(obj, dict):
        raise r.fail("a record must be a JSON object")
    version = r.typed(obj, "v", int)
    if version != SCHEMA_VERSION:
        raise r.fail(f"schema version {version} is not supported (this reads {SCHEMA_VERSION})")
    ev = r.typed(obj, "event", dict)
    verdict = r.typed(obj, "decision", str)
    if verdict not in ("allow", "deny"):
        raise r.fail(f"field 'decision' must be 'allow' or 'deny', not {verdict!r}")
    event = ExecEvent(
        pid=r.typed(ev, "pid", int),
        ppid=r.typed(ev, "ppid", int),
        uid=r.typed(ev, "uid", int),
        auid=r.typed(ev, "auid", int),
        comm=r.typed(ev, "comm", str),
        path=r.typed(ev, "path", str),
        identity=FileIdentity(
            dev=r.typed(ev, "dev", int),
            ino=r.typed(ev, "ino", int),
            ctime_ns=r.typed(ev, "ctime_ns", int),
            size=r.typed(ev, "size", int),
        ),
        timestamp_ns=r.typed(obj, "time_ns", int),
        backend=r.typed(ev, "backend", str),
        gid=r.typed(ev, "gid", int, optional=True),  # absent in records before gid existed
    )
    decision = Decision(
        event=event,
        allow=verdict == "allow",
        reason=r.enum(obj, "reason", Reason),
        detail=r.typed(obj, "detail", str),
        enforcement=r.enum(obj, "enforcement", Enforcement),
        source=r.enum(obj, "source", Source),
        sha256=r.typed(obj, "sha256", str, True),
        evidence=_evidence(r, r.obj(obj, "evidence", True)),
        rule_id=r.typed(obj, "rule_id", str, True),
        policy_version=r.typed(obj, "policy_version", int, True),
        policy_digest=r.typed(obj, "policy_digest", str, True),
        go=r.typed(obj, "go", dict, True),
        latency_us=r.typed(obj, "latency_us", int, True),
        extra=r.typed(obj, "extra", dict, True) or {},
    )
    return LoggedDecision(r.typed(obj, "id", str), decision, _host(r, obj),
                          r.typed(obj, "agent_version", str, True))


def _host(r: _Reader, obj: Dict[str, Any]) -> Optional[Dict[str, Optional[str]]]:
    host = r.typed(obj, "host", dict, True)  # absent in records before it existed
    if host is None:
        return None
    return {"hostname": r.typed(host, "hostname", str),
            "machine_id": r.typed(host, "machine_id", str, True),
            "boot_id": r.typed(host, "boot_id", str, True)}


def from_line(text: bytes, path: str = "<record>", line: int = 0) -> LoggedDecision:
    """Parse one log line."""
    try:
        obj = json.loads(text.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise _Reader(path, line).fail(f"not JSON ({exc})") from None
    return from_json(obj, path, line)


def rotation_index(name: str, base: str = LOG_NAME) -> Optional[int]:
    """N when ``name`` is ``base.N``, or ``base.N.gz`` (a rotated file logrotate compressed)."""
    suffix = name[len(base) + 1:]
    if suffix.endswith(".gz"):
        suffix = suffix[:-3]
    return int(suffix) if name.startswith(base + ".") and suffix.isdigit() else None


def log_files(log_dir: str, base: str = LOG_NAME) -> List[str]:
    """The decision-log files in a directory, oldest first (base.N … base.1, base); a
    rotated file compressed by logrotate (base.N.gz) counts as base.N."""
    try:
        names = os.listdir(log_dir)
    except OSError as exc:
        raise MalformedInput(log_dir, f"cannot list the log directory: {exc.strerror}") from None
    rotated = [(n, name) for name in names
               if (n := rotation_index(name, base)) is not None]
    out = [os.path.join(log_dir, n) for _, n in sorted(rotated, reverse=True)]
    if base in names:
        out.append(os.path.join(log_dir, base))
    return out
