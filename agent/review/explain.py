"""``execguard denials explain ID``: one record in full, and how to check it again.

Shows every field of the record, whether the file on disk is still the one that was decided
(its identity and change stamp), the ``execguard verify`` command that reproduces the
signature verdict, and the ``ausearch`` command that finds the audit record of a denial.
"""

from __future__ import annotations

import os
import pwd
import shlex
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Optional

from agent.decision import Decision
from agent.record import LoggedDecision
from agent.review.output import iso_time, printable
from agent.review.query import verdict_label
from agent.review.reproduce import Reproduction

UNSET_UID = 4294967295


def _user(uid: int) -> str:
    if uid == UNSET_UID:
        return f"{uid} (unset)"
    try:
        return f"{uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return str(uid)


def ausearch_command(record_id: str) -> str:
    """Finds the ANOM_EXEC record: ausearch has no filter on a message field, so grep it."""
    return f"ausearch -m ANOM_EXEC -i | grep -F 'decision_id={record_id} '"


def file_now(d: Decision) -> str:
    """Is the file at the path still the one decided? (identity and change stamp)"""
    ident = d.event.identity
    try:
        st = os.stat(d.event.path)
    except OSError as exc:
        return f"cannot stat it now: {exc.strerror}"
    if (st.st_dev, st.st_ino) != (ident.dev, ident.ino):
        return "a different file is at this path now (device or inode differs)"
    if (st.st_ctime_ns, st.st_size) != (ident.ctime_ns, ident.size):
        return "same file, but changed since the decision (ctime or size differs)"
    return "unchanged since the decision (same device, inode, ctime and size)"


def _pairs(d: Decision, rec_id: str) -> List[tuple[str, List[tuple[str, Any]]]]:
    ev, ident = d.event, d.event.identity
    sections: List[tuple[str, List[tuple[str, Any]]]] = [
        ("Decision", [("id", rec_id), ("time", iso_time(ev.timestamp_ns)),
                      ("decision", verdict_label(d)), ("enforcement", d.enforcement.value),
                      ("reason", d.reason.value), ("detail", d.detail),
                      ("source", d.source.value), ("latency_us", d.latency_us)]),
        ("Exec", [("path", ev.path), ("comm", ev.comm), ("pid", ev.pid), ("ppid", ev.ppid),
                  ("uid", _user(ev.uid)), ("auid", _user(ev.auid)),
                  ("dev", f"{os.major(ident.dev)}:{os.minor(ident.dev)} ({ident.dev})"),
                  ("ino", ident.ino), ("ctime_ns", ident.ctime_ns), ("size", ident.size),
                  ("backend", ev.backend)]),
        ("File", [("sha256", d.sha256), ("on disk now", file_now(d))]),
    ]
    evid = d.evidence
    if evid is None:
        sections.append(("Signature", [("signature", "none recorded")]))
    else:
        when = (datetime.fromtimestamp(evid.integrated_time, tz=timezone.utc).isoformat()
                if evid.integrated_time is not None else None)
        sections.append(("Signature", [
            ("kind", evid.kind.value), ("file", evid.source),
            ("key fingerprint", evid.key_fingerprint), ("identity", evid.identity),
            ("issuer", evid.issuer), ("rekor log index", evid.log_index),
            ("integrated time", when), ("bundle media type", evid.bundle_media_type)]))
    sections.append(("Go build", sorted((d.go or {}).items()) or [("go", "not a Go binary "
                                                                          "(or not recorded)")]))
    sections.append(("Policy", [("rule", d.rule_id), ("version", d.policy_version),
                                ("digest", d.policy_digest)]))
    if d.extra:
        sections.append(("Extra", sorted(d.extra.items())))
    return sections


def explain_text(rec: LoggedDecision, repro: Reproduction) -> str:
    d = rec.decision
    lines: List[str] = []
    for title, pairs in _pairs(d, rec.id):
        lines.append(f"{title}:")
        for key, value in pairs:
            shown = "-" if value is None else printable(str(value))
            lines.append(f"  {key + ':':<19} {shown}")
        lines.append("")
    lines.append("Reproduce the signature verdict:")
    lines.append(f"  {shlex.join(repro.argv)}")
    if repro.expected_exit is not None:
        word = "trusted" if repro.expected_exit == 0 else f"untrusted ({d.reason.value})"
        lines.append(f"  expected: exit {repro.expected_exit}, {word}, "
                     f"if the file and the keys are unchanged")
    else:
        lines.append("  expected: the decision did not come from a signature check alone")
    if repro.policy_source:
        lines.append(f"  trust taken from the policy that decided: {repro.policy_source}")
    for ph in repro.placeholders:
        lines.append(f"  PLACEHOLDER {ph}")
    for note in repro.notes:
        lines.append(f"  note: {note}")
    lines.append("")
    lines.append("Audit record:")
    if d.allow:
        lines.append("  none: only denials (enforced or would-deny) are sent to auditd")
    else:
        lines.append(f"  {ausearch_command(rec.id)}")
    return "\n".join(lines)


def explain_json(rec: LoggedDecision, repro: Reproduction) -> Dict[str, Any]:
    return {
        "record": rec.to_json(),
        "decision": verdict_label(rec.decision),
        "file_now": file_now(rec.decision),
        "verify": {"argv": repro.argv, "command": shlex.join(repro.argv),
                   "expected_exit": repro.expected_exit, "policy": repro.policy_source,
                   "placeholders": repro.placeholders, "notes": repro.notes},
        "ausearch": None if rec.decision.allow else ausearch_command(rec.id),
    }


def find_record(records: Iterable[LoggedDecision], record_id: str) -> Optional[LoggedDecision]:
    """The record with this id; a unique prefix of at least 8 characters also works."""
    prefix_hits: List[LoggedDecision] = []
    for rec in records:
        if rec.id == record_id:
            return rec
        if len(record_id) >= 8 and rec.id.startswith(record_id):
            prefix_hits.append(rec)
    return prefix_hits[0] if len(prefix_hits) == 1 else None
