"""The what-if report: read the logs, replay every record, count and group the changes.

Groups are keyed by (change, binary, new verdict, new reason): "these 40 execs of
/opt/app/server would now be denied with untrusted-key". A binary is its path, or its
sha256 with ``by_sha256`` (records without a sha256 then fall back to the path).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from agent.record import LoggedDecision
from agent.review.output import iso_time, printable
from agent.review.query import verdict_label
from agent.review.whatif import Change, Replayed, Replayer, change_of

MAX_SHA256 = 8  # distinct file versions listed per group
MAX_UIDS = 8


@dataclass
class Group:
    change: Change
    binary: str
    verdict: str  # allow | deny | unknown
    reason: str  # reason code, or the unknown's gap code
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    uids: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    sha256: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    paths: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    rules: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    recorded: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    methods: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    notes: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    blocks: int = 0  # denials the candidate would enforce (not a monitor mode or rule)
    example_id: str = ""
    example_uid: int = 0
    detail: str = ""

    def add(self, rec: LoggedDecision, new: Replayed) -> None:
        d = rec.decision
        ts = d.event.timestamp_ns
        if self.count == 0:
            self.first_ns = self.last_ns = ts
            self.example_id, self.example_uid, self.detail = rec.id, d.event.uid, new.detail
        self.count += 1
        self.first_ns, self.last_ns = min(self.first_ns, ts), max(self.last_ns, ts)
        self.uids[d.event.uid] += 1
        if d.sha256:
            self.sha256[d.sha256] += 1
        self.paths[d.event.path] += 1
        self.rules[new.rule_id or "-"] += 1
        self.recorded[f"{verdict_label(d)} ({d.reason.value}, rule {d.rule_id or '-'})"] += 1
        self.methods[new.method.value] += 1
        self.blocks += 1 if new.blocks else 0
        if new.note:
            self.notes[new.note] += 1

    def to_json(self) -> Dict[str, Any]:
        return {
            "change": self.change.value, "binary": self.binary, "verdict": self.verdict,
            "reason": self.reason, "count": self.count,
            "first_seen": iso_time(self.first_ns), "last_seen": iso_time(self.last_ns),
            "uids": {str(k): v for k, v in self.uids.most_common()},
            "sha256": dict(self.sha256.most_common()),
            "paths": dict(self.paths.most_common()),
            "rules": dict(self.rules.most_common()),
            "recorded": dict(self.recorded.most_common()),
            "methods": dict(self.methods.most_common()),
            "blocks": self.blocks,
            "notes": dict(self.notes.most_common()),
            "example": {"id": self.example_id, "uid": self.example_uid, "detail": self.detail},
        }


ORDER = (Change.NEWLY_DENIED, Change.UNKNOWN, Change.NEWLY_ALLOWED, Change.SAME)


@dataclass
class Report:
    by_sha256: bool = False
    records: int = 0
    counts: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    methods: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    groups: Dict[Tuple[str, str, str, str], Group] = field(default_factory=dict)
    first_ns: Optional[int] = None
    last_ns: Optional[int] = None

    def add(self, rec: LoggedDecision, new: Replayed) -> None:
        d = rec.decision
        change = change_of(d.allow, new)
        self.records += 1
        self.counts[change.value] += 1
        self.methods[new.method.value] += 1
        ts = d.event.timestamp_ns
        self.first_ns = ts if self.first_ns is None else min(self.first_ns, ts)
        self.last_ns = ts if self.last_ns is None else max(self.last_ns, ts)
        binary = (d.sha256 or f"(no sha256) {d.event.path}") if self.by_sha256 \
            else d.event.path
        key = (change.value, binary, new.verdict, new.reason)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(change, binary, new.verdict, new.reason)
        group.add(rec, new)

    def sorted_groups(self, include_same: bool) -> List[Group]:
        rank = {c: i for i, c in enumerate(ORDER)}
        chosen = [g for g in self.groups.values() if include_same or g.change is not Change.SAME]
        return sorted(chosen, key=lambda g: (rank[g.change], -g.count, g.binary, g.reason))

    @property
    def newly_denied(self) -> int:
        return int(self.counts[Change.NEWLY_DENIED.value])

    @property
    def unknown(self) -> int:
        return int(self.counts[Change.UNKNOWN.value])

    def summary(self) -> Dict[str, int]:
        return {c.value: int(self.counts[c.value]) for c in
                (Change.SAME, Change.NEWLY_DENIED, Change.NEWLY_ALLOWED, Change.UNKNOWN)}


def replay_all(records: Iterator[LoggedDecision], replayer: Replayer, report: Report,
               keep: Callable[[LoggedDecision], bool] = lambda _: True) -> None:
    for rec in records:
        if keep(rec):
            report.add(rec, replayer.replay(rec.decision))


# --- text ------------------------------------------------------------------------------------

_TITLES = {Change.NEWLY_DENIED: "NEWLY DENIED", Change.UNKNOWN: "UNKNOWN (the log cannot tell)",
           Change.NEWLY_ALLOWED: "NEWLY ALLOWED", Change.SAME: "SAME"}


def _counts(counter: Counter, limit: int) -> str:  # type: ignore[type-arg]
    items = counter.most_common()
    shown = ", ".join(f"{printable(str(k))} ({v})" if len(items) > 1 else printable(str(k))
                      for k, v in items[:limit])
    return shown + (f", … {len(items) - limit} more" if len(items) > limit else "")


def format_groups(groups: List[Group]) -> List[str]:
    lines: List[str] = []
    current: Optional[Change] = None
    for g in groups:
        if g.change is not current:
            current = g.change
            lines += ["", f"{_TITLES[g.change]}:"]
        now = f"unknown: {g.reason}" if g.verdict == "unknown" else f"{g.verdict} ({g.reason})"
        lines.append(f"  {g.count:>6}  {printable(g.binary)}")
        lines.append(f"          now: {now}, candidate rule {_counts(g.rules, 3)}; "
                     f"method {_counts(g.methods, 3)}")
        if g.verdict == "deny":
            lines.append(f"          enforced: {g.blocks} of {g.count} (the rest only recorded: "
                         f"monitor mode or a monitor rule)" if g.blocks < g.count
                         else "          enforced: all (enforce mode)")
        lines.append(f"          was: {_counts(g.recorded, 3)}")
        lines.append(f"          seen {iso_time(g.first_ns)} .. {iso_time(g.last_ns)}; "
                     f"uid {_counts(g.uids, MAX_UIDS)}; example record {g.example_id} "
                     f"(uid {g.example_uid})")
        if g.sha256 and (len(g.sha256) > 1 or g.binary not in g.sha256):
            lines.append(f"          sha256 {_counts(g.sha256, 2)}")
        if len(g.paths) > 1 or g.binary not in g.paths:
            lines.append(f"          paths {_counts(g.paths, 3)}")
        lines.append(f"          why: {printable(g.detail)}")
        for note, n in g.notes.most_common(2):
            lines.append(f"          note: {printable(note)} ({n})")
    return lines
