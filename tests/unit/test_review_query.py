"""Filters, labels and output helpers of ``execguard denials`` (pure functions)."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.decision import Decision, Enforcement
from agent.errors import Reason
from agent.record import LoggedDecision
from agent.review import FilterError, build_query, find_record, verdict_label
from agent.review.locate import agent_policy_path, locate_log_dir
from agent.review.output import CsvWriter, printable, summarize
from agent.review.query import parse_time, signer_label
from tests.record_fixtures import make_decision

NOW = 1_800_000_000 * 10**9


def rec(d: Decision, rid: str = "0" * 19) -> LoggedDecision:
    return LoggedDecision(rid, d)


def test_parse_time_relative_and_iso() -> None:
    assert parse_time("--since", "30m", NOW) == NOW - 1800 * 10**9
    assert parse_time("--since", "2d", NOW) == NOW - 2 * 86400 * 10**9
    assert parse_time("--since", "1w", NOW) == NOW - 7 * 86400 * 10**9
    assert parse_time("--since", "90s", NOW) == NOW - 90 * 10**9
    utc = int(datetime(2026, 11, 26, 15, 0, tzinfo=timezone.utc).timestamp()) * 10**9
    assert parse_time("--since", "2026-11-26T15:00:00Z", NOW) == utc
    assert parse_time("--since", "2026-11-26T15:00", NOW) == utc  # no offset: UTC
    assert parse_time("--since", "2026-11-26T16:00:00+01:00", NOW) == utc
    assert parse_time("--since", "2026-11-26T15:00:00.000001Z", NOW) == utc + 1000
    assert parse_time("--since", "2026-11-26", NOW) == utc - 15 * 3600 * 10**9
    for bad in ("", "5x", "-1h", "yesterday", "2026-13-01", "1.5h"):
        with pytest.raises(FilterError, match="--since"):
            parse_time("--since", bad, NOW)


def test_build_query_rejects_bad_filters_by_flag() -> None:
    cases = [({"reasons": ["nope"]}, "--reason 'nope'"),
             ({"paths": ["rel/*"]}, "--path"), ({"paths": ["/a/**b"]}, "--path"),
             ({"modules": ["/abs"]}, "--module"), ({"uids": ["no-such-user-q"]}, "--uid"),
             ({"since": "1h", "until": "2h"}, "is after --until")]
    for kwargs, needle in cases:
        with pytest.raises(FilterError, match=needle.replace("*", r"\*")):
            build_query(now_ns=NOW, **kwargs)  # type: ignore[arg-type]


def test_query_matches() -> None:
    deny = make_decision(0, path="/srv/app/bin/tool")
    allow = make_decision(1, allow=True)
    nogo = make_decision(2, go=None, path="/usr/bin/x")
    q = build_query(now_ns=NOW)
    assert q.matches(rec(deny)) and not q.matches(rec(allow))
    assert build_query(include_allowed=True).matches(rec(allow))
    assert build_query(reasons=["no-signature"]).matches(rec(deny))
    assert not build_query(reasons=["bad-signature"]).matches(rec(deny))
    assert build_query(paths=["/srv/app"]).matches(rec(deny))  # a directory: all below it
    assert build_query(paths=["/srv/*/bin/t?ol"]).matches(rec(deny))
    assert not build_query(paths=["/srv/*/tool"]).matches(rec(deny))  # * is one segment
    assert build_query(uids=["1000"]).matches(rec(deny))
    assert build_query(uids=["root", "1000"]).matches(rec(deny))
    assert not build_query(uids=["0"]).matches(rec(deny))
    assert build_query(modules=["github.com/acme/*"]).matches(rec(deny))
    assert not build_query(modules=["github.com/acme/*"]).matches(rec(nogo))
    ts = deny.event.timestamp_ns
    at = replace(deny, event=replace(deny.event, timestamp_ns=ts + 123_000))
    iso = datetime.fromtimestamp(ts // 10**9, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    assert build_query(since=iso).matches(rec(at))
    assert not build_query(until=iso).matches(rec(at))  # 123 µs later than the whole second


def test_verdict_and_signer_labels() -> None:
    assert verdict_label(make_decision(0)) == "deny"
    assert verdict_label(make_decision(0, allow=True)) == "allow"
    assert verdict_label(make_decision(0, enforcement=Enforcement.MONITOR)) == "would-deny"
    assert verdict_label(make_decision(0, enforcement=Enforcement.AUDIT_ONLY)) == "would-deny"
    assert verdict_label(make_decision(0, enforcement=Enforcement.POST_EXEC_KILL)) == "deny"
    assert signer_label(make_decision(0, full=False)) == "unsigned"
    long = signer_label(make_decision(0), short=False)
    assert long.endswith("(https://token.actions.githubusercontent.com)")
    assert "(" not in signer_label(make_decision(0))


def test_printable_escapes_control_characters() -> None:
    assert printable("/usr/bin/ok") == "/usr/bin/ok"
    assert printable("/tmp/a\x1b[2Jb\n") == "/tmp/a\\x1b[2Jb\\n"
    assert printable("/tmp/\udcff") == "/tmp/\\udcff"
    assert printable("/tmp/é") == "/tmp/é"


def test_csv_defuses_formula_cells() -> None:
    out = io.StringIO()
    w = CsvWriter(out)
    w.write(rec(make_decision(0, comm="=HYPERLINK(\"x\")", detail="+1", path="/p,\"q\"")))
    rows = list(csv.reader(io.StringIO(out.getvalue(), newline="")))
    row = dict(zip(rows[0], rows[1]))
    assert row["comm"] == "'=HYPERLINK(\"x\")" and row["detail"] == "'+1"
    assert row["path"] == "/p,\"q\""  # quoted by the CSV rules, not altered


def test_summary_orders_by_count() -> None:
    records = [rec(make_decision(i, path="/a" if i % 3 else "/b",
                                 reason=Reason.BAD_SIGNATURE if i == 0 else Reason.NO_SIGNATURE))
               for i in range(6)]
    s = summarize(records)
    assert s["total"] == 6
    assert list(s["binary"].items()) == [("/a", 4), ("/b", 2)]
    assert list(s["reason"].items()) == [("no-signature", 5), ("bad-signature", 1)]


def test_find_record_by_id_or_unique_prefix() -> None:
    a = rec(make_decision(0), "6612fa6bf526d41dc28")
    b = rec(make_decision(1), "6612fa6bf5281f6330e")
    assert find_record([a, b], "6612fa6bf5281f6330e") is b
    assert find_record([a, b], "6612fa6bf52") is None  # ambiguous
    assert find_record([a, b], "6612fa6bf528") is b
    assert find_record([a, b], "6612fa6") is None  # too short for a prefix


def test_locate_order(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    assert locate_log_dir("/x", sock).how == "from --log-dir"
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\nlog_dir = "/var/log/eg-test"\n')
    found = locate_log_dir(None, sock, str(policy))
    assert found.log_dir == "/var/log/eg-test" and str(policy) in found.how
    default = locate_log_dir(None, sock, str(tmp_path / "missing.toml"))
    assert default.log_dir == "/var/log/execguard" and "embedded default" in default.how
    answered = locate_log_dir(None, sock, str(policy), asked=True,
                              reply={"log_dir": "/srv/log"})
    assert answered.log_dir == "/srv/log" and "running agent" in answered.how
    policy.write_text("version = [")
    with pytest.raises(Exception, match=str(policy)):
        locate_log_dir(None, sock, str(policy))
    assert agent_policy_path({"policy": {"source": "/etc/p.toml"}}) == "/etc/p.toml"
    assert agent_policy_path({"policy_file": "relative"}) is None
