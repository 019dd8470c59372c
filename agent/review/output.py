"""Ways to show matching records: a table, JSON lines, CSV, and a summary.

Paths, command names and signer identities come from whoever ran the exec or signed the
file. They reach a reviewer's terminal or spreadsheet, so the table escapes control
characters (no terminal escape sequences) and CSV defuses cells that a spreadsheet would
read as a formula.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Sequence, TextIO

from agent.record import LoggedDecision
from agent.review.query import module_label, signer_label, verdict_label

TABLE_COLUMNS = ("ID", "TIME", "DECISION", "ENFORCEMENT", "REASON", "UID", "SIGNER/MODULE",
                 "PATH")
# widths used when rows stream in (--follow) and cannot be measured first
_STREAM_WIDTHS = (19, 27, 10, 14, 17, 6, 30)

CSV_COLUMNS = ("id", "time", "decision", "enforcement", "reason", "detail", "uid", "auid",
               "pid", "ppid", "comm", "path", "dev", "ino", "size", "sha256", "signature_kind",
               "signature_source", "key_fingerprint", "identity", "issuer", "log_index",
               "module", "module_version", "go_version", "rule_id", "policy_version",
               "policy_digest", "source", "backend", "latency_us")


def printable(text: str) -> str:
    """``text`` with control and non-printable characters escaped (\\n, \\x1b, \\udcff…)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape",
                                                      "backslashreplace").decode("ascii")
                   for c in text)


def iso_time(ns: int) -> str:
    ts = datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc)
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns % 1_000_000_000) // 1000:06d}Z"


def table_row(rec: LoggedDecision) -> List[str]:
    d = rec.decision
    who = signer_label(d)
    mod = module_label(d)
    return [rec.id, iso_time(d.event.timestamp_ns), verdict_label(d), d.enforcement.value,
            d.reason.value, str(d.event.uid), printable(f"{who} / {mod}" if mod else who),
            printable(d.event.path)]


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = [c.ljust(w) for c, w in zip(cells, widths)]
    return "  ".join([*padded, *cells[len(widths):]]).rstrip()


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """The whole table from ``table_row`` rows, columns as wide as their widest cell (the
    path column last, unpadded)."""
    widths = [max([len(TABLE_COLUMNS[i])] + [len(r[i]) for r in rows])
              for i in range(len(TABLE_COLUMNS) - 1)]
    return "\n".join(_line(r, widths) for r in [list(TABLE_COLUMNS), *rows])


def table_header_stream() -> str:
    return _line(TABLE_COLUMNS, _STREAM_WIDTHS)


def table_line_stream(rec: LoggedDecision) -> str:
    return _line(table_row(rec), _STREAM_WIDTHS)


def json_line(rec: LoggedDecision) -> str:
    """One record as the log's own schema-v1 object, on one line."""
    return json.dumps(rec.to_json(), ensure_ascii=False,
                      separators=(",", ":"), default=str)


def _defuse(cell: Any) -> Any:
    # a cell that starts like a formula would run in a spreadsheet (CSV injection)
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + cell
    return cell


def csv_row(rec: LoggedDecision) -> List[Any]:
    d = rec.decision
    ev, ident, evid, go = d.event, d.event.identity, d.evidence, d.go or {}
    row = [rec.id, iso_time(ev.timestamp_ns), verdict_label(d), d.enforcement.value,
           d.reason.value, d.detail, ev.uid, ev.auid, ev.pid, ev.ppid, ev.comm, ev.path,
           ident.dev, ident.ino, ident.size, d.sha256,
           evid.kind.value if evid else None, evid.source if evid else None,
           evid.key_fingerprint if evid else None, evid.identity if evid else None,
           evid.issuer if evid else None, evid.log_index if evid else None,
           go.get("module") or go.get("path"), go.get("version"),
           go.get("go_version") or go.get("go"), d.rule_id, d.policy_version,
           d.policy_digest, d.source.value, ev.backend, d.latency_us]
    return ["" if c is None else _defuse(c) for c in row]


class CsvWriter:
    """CSV (RFC 4180, header first) written row by row, so it can follow the log too."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._buf = io.StringIO()
        self._csv = csv.writer(self._buf, lineterminator="\r\n")
        self._emit(list(CSV_COLUMNS))

    def _emit(self, row: List[Any]) -> None:
        self._csv.writerow(row)
        self.out.write(self._buf.getvalue())
        self._buf.seek(0)
        self._buf.truncate()

    def write(self, rec: LoggedDecision) -> None:
        self._emit(csv_row(rec))


def summarize(records: Iterable[LoggedDecision]) -> Dict[str, Any]:
    """Counts by decision, binary (path), reason and signer, most frequent first."""
    by: Dict[str, Counter[str]] = {k: Counter() for k in ("decision", "binary", "reason",
                                                           "signer")}
    total = 0
    for rec in records:
        d = rec.decision
        total += 1
        by["decision"][verdict_label(d)] += 1
        by["binary"][d.event.path] += 1
        by["reason"][d.reason.value] += 1
        by["signer"][signer_label(d, short=False)] += 1
    out: Dict[str, Any] = {"total": total}
    for key, counts in by.items():
        out[key] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def format_summary(summary: Dict[str, Any]) -> str:
    lines = [f"{summary['total']} record(s)"]
    for key, title in (("decision", "by decision"), ("reason", "by reason"),
                       ("signer", "by signer"), ("binary", "by binary")):
        counts: Dict[str, int] = summary[key]
        lines.append("")
        lines.append(title + ":")
        for name, n in counts.items():
            lines.append(f"  {n:>7}  {printable(name)}")
    return "\n".join(lines)
