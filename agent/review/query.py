"""Which decision-log records a reviewer asked for: time window, reason, path, uid, module.

Filters are parsed once (a bad one is a ``FilterError`` naming the flag) and then applied to
``LoggedDecision`` objects that ``agent.review.sources.read_records`` produced; nothing here
reads JSON.
"""

from __future__ import annotations

import json
import pwd
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Optional, Tuple

from agent.decision import Decision, Enforcement
from agent.errors import Reason
from agent.policy.globs import Glob, GlobError
from agent.record import LoggedDecision

_RELATIVE = re.compile(r"([0-9]+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# the exec ran although the verdict was deny: only recorded, not enforced
NOT_ENFORCED = (Enforcement.MONITOR, Enforcement.AUDIT_ONLY)


class FilterError(ValueError):
    """A filter flag that cannot be understood; the message names the flag and the value."""


def parse_time(flag: str, value: str, now_ns: Optional[int] = None) -> int:
    """Nanoseconds since the epoch for ``--since``/``--until``.

    Relative (``90s``, ``30m``, ``1h``, ``2d``, ``1w``: that long before now) or ISO 8601
    (``2026-11-26``, ``2026-11-26T15:21``, with ``Z`` or an offset). A time without an
    offset is UTC, like every time the log and this tool print.
    """
    text = value.strip()
    now = time.time_ns() if now_ns is None else now_ns
    m = _RELATIVE.fullmatch(text)
    if m:
        return now - int(m.group(1)) * _UNIT_S[m.group(2)] * 1_000_000_000
    iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        ts = datetime.fromisoformat(iso)
    except ValueError:
        raise FilterError(f"{flag} {value!r}: not a time; use ISO 8601 "
                          f"(2026-11-26T15:00:00Z) or a duration ago (30m, 1h, 2d)") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    seconds = int(ts.timestamp())  # whole seconds exactly, then the microseconds
    return seconds * 1_000_000_000 + ts.microsecond * 1000


def parse_reason(value: str) -> Reason:
    try:
        return Reason(value)
    except ValueError:
        known = ", ".join(r.value for r in Reason)
        raise FilterError(f"--reason {value!r}: unknown reason code (one of {known})") from None


def parse_uid(value: str) -> int:
    """A number, or a user name looked up in the passwd database now."""
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise FilterError(f"--uid {value!r}: neither a number nor a known user") from None


def parse_glob(flag: str, value: str, absolute: bool) -> Glob:
    try:
        return Glob.compile(value, absolute=absolute)
    except GlobError as exc:
        raise FilterError(f"{flag} {value!r}: {exc}") from None


def verdict_label(d: Decision) -> str:
    """``allow``, ``deny`` (enforced) or ``would-deny`` (monitor, audit-only: the exec ran)."""
    if d.allow:
        return "allow"
    return "would-deny" if d.enforcement in NOT_ENFORCED else "deny"


def go_module(d: Decision) -> Optional[str]:
    """The main module path from the record's Go summary, when it names one."""
    if not d.go:
        return None
    mod = d.go.get("module") or d.go.get("path")
    return mod if isinstance(mod, str) and mod else None


def module_label(d: Decision) -> str:
    mod = go_module(d)
    if mod is None:
        return ""
    version = d.go.get("version") if d.go else None
    return f"{mod}@{version}" if isinstance(version, str) and version else mod


def signer_label(d: Decision, short: bool = True) -> str:
    """Who signed, as the record says: keyless identity, key fingerprint, or ``unsigned``.

    For an untrusted verdict this is what the signature *claimed*; the reason says why it
    was not accepted.
    """
    ev = d.evidence
    if ev is None:
        return "unsigned"
    if ev.identity:  # the issuer only in the long form: the table stays readable
        return f"{ev.identity} ({ev.issuer})" if ev.issuer and not short else ev.identity
    if ev.key_fingerprint:
        fp = ev.key_fingerprint
        return f"key {fp[:23]}…" if short and len(fp) > 24 else f"key {fp}"
    return ev.kind.value


@dataclass(frozen=True)
class Query:
    """Every condition given must hold; a repeated flag matches any of its values."""

    since_ns: Optional[int] = None
    until_ns: Optional[int] = None
    reasons: Tuple[Reason, ...] = ()
    paths: Tuple[Glob, ...] = ()
    uids: Tuple[int, ...] = ()
    modules: Tuple[Glob, ...] = ()
    include_allowed: bool = False
    hosts: Tuple[str, ...] = ()  # hostnames or machine-ids of the hosts that wrote them

    def needles(self) -> Tuple[bytes, ...]:
        """Bytes one of which every matching record's JSON line holds (``--host``: hostnames
        and machine-ids are plain ASCII, written unescaped), for a prefilter that skips
        parsing the others; empty when the query has no such condition."""
        return tuple(json.dumps(h).encode() for h in self.hosts)

    def matches(self, rec: LoggedDecision) -> bool:
        d = rec.decision
        if d.allow and not self.include_allowed:
            return False
        ts = d.event.timestamp_ns
        if self.since_ns is not None and ts < self.since_ns:
            return False
        if self.until_ns is not None and ts > self.until_ns:
            return False
        if self.reasons and d.reason not in self.reasons:
            return False
        if self.uids and d.event.uid not in self.uids:
            return False
        if self.paths and not any(g.matches(d.event.path) for g in self.paths):
            return False
        if self.hosts:
            host = rec.host or {}
            if host.get("hostname") not in self.hosts and host.get("machine_id") not in \
                    self.hosts:
                return False
        if self.modules:
            mod = go_module(d)
            if mod is None or not any(g.matches(mod) for g in self.modules):
                return False
        return True


def build_query(since: Optional[str] = None, until: Optional[str] = None,
                reasons: Iterable[str] = (), paths: Iterable[str] = (),
                uids: Iterable[str] = (), modules: Iterable[str] = (),
                include_allowed: bool = False, now_ns: Optional[int] = None,
                hosts: Iterable[str] = ()) -> Query:
    """A Query from the CLI's strings; raises FilterError on the first bad one."""
    now = time.time_ns() if now_ns is None else now_ns
    q = Query(
        since_ns=parse_time("--since", since, now) if since else None,
        until_ns=parse_time("--until", until, now) if until else None,
        reasons=tuple(parse_reason(r) for r in reasons),
        paths=tuple(parse_glob("--path", p, True) for p in paths),
        uids=tuple(parse_uid(u) for u in uids),
        modules=tuple(parse_glob("--module", m, False) for m in modules),
        include_allowed=include_allowed,
        hosts=tuple(h.strip().lower() if len(h.strip()) == 32 else h.strip() for h in hosts),
    )
    if q.since_ns is not None and q.until_ns is not None and q.since_ns > q.until_ns:
        raise FilterError(f"--since {since!r} is after --until {until!r}")
    return q
