"""``execguard denials`` as a subprocess over real, rotated logs written by the Recorder:
filters, table, JSON lines, CSV, summary, exit codes, corrupt lines, where the log is found."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import pytest

from agent.control import ControlServer
from agent.decision import Decision, Enforcement
from agent.errors import Reason
from agent.record.decision_log import log_files
from agent.review.output import CSV_COLUMNS
from agent.verify.model import Evidence, SignatureKind
from tests.record_fixtures import make_decision
from tests.review_fixtures import denials, write_log

T0 = 1_795_000_000 * 10**9  # 2026-11-18T11:06:40Z
HOUR = 3600 * 10**9
KEY_EVIDENCE = Evidence(SignatureKind.COSIGN_SIG, "/opt/x/run.sig", "SHA256:" + "k" * 43)


def at(d: Decision, ns: int, uid: int = 1000) -> Decision:
    return replace(d, event=replace(d.event, timestamp_ns=ns, uid=uid))


def dataset() -> List[Decision]:
    """8 records, times T0 .. T0+7h; the notes say what each filter should pick."""
    return [
        at(make_decision(0), T0),  # deny, no-signature, keyless, acme/tool, uid 1000
        at(make_decision(1, allow=True, path="/usr/local/bin/ok", go=None), T0 + HOUR, 0),
        at(make_decision(2, path="/opt/x/run", reason=Reason.BAD_SIGNATURE,
                         enforcement=Enforcement.MONITOR, evidence=KEY_EVIDENCE,
                         go={"module": "example.com/x", "version": "v0.1.0"}),
           T0 + 2 * HOUR, 1001),
        at(make_decision(3, path="/srv/app/bin/other", reason=Reason.UNTRUSTED_KEY,
                         enforcement=Enforcement.POST_EXEC_KILL, go=None, evidence=None),
           T0 + 3 * HOUR),
        at(make_decision(4, path="/srv/app/bin/tool"), T0 + 4 * HOUR),
        at(make_decision(5, path="/opt/x/run", reason=Reason.BAD_SIGNATURE,
                         enforcement=Enforcement.AUDIT_ONLY, evidence=KEY_EVIDENCE,
                         go={"module": "example.com/x", "version": "v0.1.0"}),
           T0 + 5 * HOUR, 1001),
        at(make_decision(6, allow=True, path="/srv/app/bin/tool"), T0 + 6 * HOUR),
        at(make_decision(7, path="/srv/app/bin/=cmd|calc", comm="=cmd|' /C calc'!A0"),
           T0 + 7 * HOUR, 2000),
    ]


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """The dataset, rotated over several files (about two records per file)."""
    d = tmp_path_factory.mktemp("log")
    ids = write_log(d, dataset(), max_bytes=2000, keep=10)
    assert len(log_files(str(d))) >= 3, "the dataset must span rotated files"
    return {"dir": str(d), "ids": ids}


def ids_of(stdout: str) -> List[str]:
    return [json.loads(line)["id"] for line in stdout.splitlines()]


def json_ids(log: Dict[str, Any], *args: str) -> List[str]:
    proc = denials("--log-dir", log["dir"], "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return ids_of(proc.stdout)


def test_default_lists_denials_only_from_every_rotated_file(log: Dict[str, Any]) -> None:
    ids = log["ids"]
    assert json_ids(log) == [ids[i] for i in (0, 2, 3, 4, 5, 7)]
    assert json_ids(log, "--all") == ids


def test_filters(log: Dict[str, Any]) -> None:
    ids = log["ids"]
    assert json_ids(log, "--reason", "bad-signature") == [ids[2], ids[5]]
    assert json_ids(log, "--reason", "bad-signature", "--reason", "untrusted-key") == [
        ids[2], ids[3], ids[5]]
    assert json_ids(log, "--path", "/srv/app/bin/*") == [ids[0], ids[3], ids[4], ids[7]]
    assert json_ids(log, "--path", "/srv/app/bin/tool", "--all") == [ids[0], ids[4], ids[6]]
    assert json_ids(log, "--uid", "1001") == [ids[2], ids[5]]
    assert json_ids(log, "--uid", "root", "--all") == [ids[1]]
    assert json_ids(log, "--module", "example.com/*") == [ids[2], ids[5]]
    assert json_ids(log, "--module", "github.com/acme/**") == [ids[0], ids[4], ids[7]]
    assert json_ids(log, "--since", "2026-11-18T13:06:40Z") == [ids[i] for i in (2, 3, 4, 5, 7)]
    assert json_ids(log, "--since", "2026-11-18T14:06:40+01:00",
                    "--until", "2026-11-18T14:06:40") == [ids[2], ids[3]]
    assert json_ids(log, "--since", "1h") == []  # the dataset lies in the past
    # filters combine
    assert json_ids(log, "--path", "/opt/**", "--uid", "1001", "--until",
                    "2026-11-18T14:00:00Z") == [ids[2]]


def test_exit_codes(log: Dict[str, Any], tmp_path: Path) -> None:
    assert denials("--log-dir", log["dir"]).returncode == 0
    none = denials("--log-dir", log["dir"], "--uid", "4242")
    assert none.returncode == 1 and none.stdout == ""
    for bad in (["--since", "yesterday-ish"], ["--reason", "no-such-reason"],
                ["--path", "relative/*"], ["--uid", "no-such-user-xyz"],
                ["--since", "2d", "--until", "3d"], ["--json", "--csv"],
                ["--follow", "--summary"]):
        proc = denials("--log-dir", log["dir"], *bad)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert "error:" in proc.stderr and bad[0] in proc.stderr, proc.stderr
    missing = denials("--log-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such log directory" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = denials("--log-dir", str(empty))
    assert proc.returncode == 1 and "no decision log yet" in proc.stderr


def test_unreadable_log_file_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "log"
    ids = write_log(d, [make_decision(0)])
    not_a_log = tmp_path / "notalog"  # a file is read as one log file: its bad line is named
    not_a_log.write_text("not a record\n")
    proc = denials("--log-dir", str(not_a_log))
    assert proc.returncode == 1 and f"{not_a_log}: line 1" in proc.stderr, proc.stderr
    # root reads any file, so make a rotated "file" that cannot be read at all
    (d / "decisions.jsonl.1").mkdir()
    proc = denials("--log-dir", str(d), "--json")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"{d}/decisions.jsonl.1: cannot read" in proc.stderr
    assert ids_of(proc.stdout) == ids  # what could be read is still shown


def test_table_newest_last_with_the_columns(log: Dict[str, Any]) -> None:
    proc = denials("--log-dir", log["dir"], "--all")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["ID", "TIME", "DECISION", "ENFORCEMENT", "REASON", "UID",
                                "SIGNER/MODULE", "PATH"]
    rows = lines[1:]
    assert [r.split()[0] for r in rows] == log["ids"]
    times = [r.split()[1] for r in rows]
    assert times == sorted(times) and times[0] == "2026-11-18T11:06:40.000000Z"
    by_id = {r.split()[0]: r for r in rows}
    ids = log["ids"]
    assert by_id[ids[0]].split()[2:6] == ["deny", "fanotify-deny", "no-signature", "1000"]
    assert by_id[ids[2]].split()[2:4] == ["would-deny", "monitor"]
    assert by_id[ids[5]].split()[2:4] == ["would-deny", "audit-only"]
    assert by_id[ids[3]].split()[2:4] == ["deny", "post-exec-kill"]
    assert by_id[ids[1]].split()[2:4] == ["allow", "none"]
    assert "github.com/acme/tool@v1.2.3" in by_id[ids[0]]
    assert "key SHA256:kkkk" in by_id[ids[2]] and "example.com/x@v0.1.0" in by_id[ids[2]]
    assert by_id[ids[3]].split()[6] == "unsigned"
    assert by_id[ids[0]].endswith("/srv/app/bin/tool")
    assert "reading " + log["dir"] + " (from --log-dir)" in proc.stderr


def test_json_lines_are_the_log_schema(log: Dict[str, Any]) -> None:
    proc = denials("--log-dir", log["dir"], "--json", "--reason", "bad-signature")
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(objs) == 2
    with open(log_files(log["dir"])[0], encoding="utf-8") as fh:
        on_disk = {json.loads(line)["id"]: json.loads(line) for line in fh}
    for obj in objs:
        assert obj["v"] == 1 and obj["reason"] == "bad-signature"
        assert obj["evidence"]["key_fingerprint"] == KEY_EVIDENCE.key_fingerprint
        if obj["id"] in on_disk:
            assert obj == on_disk[obj["id"]]


def test_csv_columns_and_formula_cells(log: Dict[str, Any]) -> None:
    proc = denials("--log-dir", log["dir"], "--csv", "--all")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout, newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert [r["id"] for r in body] == log["ids"]
    first = body[0]
    assert first["decision"] == "deny" and first["reason"] == "no-signature"
    assert first["uid"] == "1000" and first["path"] == "/srv/app/bin/tool"
    assert first["module"] == "github.com/acme/tool" and first["module_version"] == "v1.2.3"
    assert first["identity"].startswith("https://github.com/acme/tool/")
    assert first["sha256"] == f"{0:064x}" and first["policy_version"] == "7"
    assert body[1]["decision"] == "allow" and body[1]["enforcement"] == "none"
    assert body[2]["decision"] == "would-deny" and body[2]["key_fingerprint"].startswith("SHA")
    assert body[3]["signature_kind"] == "" and body[3]["module"] == ""
    # comm is attacker-chosen: it must not become a spreadsheet formula
    assert body[7]["path"] == "/srv/app/bin/=cmd|calc"
    assert body[7]["comm"] == "'=cmd|' /C calc'!A0"


def test_summary_counts(log: Dict[str, Any]) -> None:
    proc = denials("--log-dir", log["dir"], "--summary", "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["total"] == 6
    assert s["decision"] == {"deny": 4, "would-deny": 2}
    assert s["reason"] == {"bad-signature": 2, "no-signature": 3, "untrusted-key": 1}
    assert s["binary"] == {"/opt/x/run": 2, "/srv/app/bin/tool": 2,
                           "/srv/app/bin/=cmd|calc": 1, "/srv/app/bin/other": 1}
    keyless = ("https://github.com/acme/tool/.github/workflows/release.yml@refs/tags/v1 "
               "(https://token.actions.githubusercontent.com)")
    assert s["signer"] == {keyless: 3, "key " + KEY_EVIDENCE.key_fingerprint: 2, "unsigned": 1}
    text = denials("--log-dir", log["dir"], "--summary", "--all").stdout
    assert text.startswith("8 record(s)")
    assert "by binary:" in text and "by signer:" in text and "by reason:" in text
    assert "      3  /srv/app/bin/tool" in text
    rows = list(csv.reader(io.StringIO(
        denials("--log-dir", log["dir"], "--summary", "--csv").stdout, newline="")))
    assert rows[0] == ["dimension", "value", "count"] and ["reason", "untrusted-key", "1"] in rows


def test_corrupt_lines_are_reported_and_skipped(tmp_path: Path) -> None:
    ids = write_log(tmp_path, [make_decision(i) for i in range(3)])
    path = tmp_path / "decisions.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    bad = b'{"v":1,"id":"x"}\n'
    path.write_bytes(lines[0] + b"not json at all\n" + lines[1] + bad + lines[2] +
                     lines[2][:40])  # a line cut short by a crash, last
    proc = denials("--log-dir", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert ids_of(proc.stdout) == ids
    assert f"{path}: line 2: not JSON" in proc.stderr
    assert f"{path}: line 4: missing field" in proc.stderr
    assert f"{path}: line 6:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_terminal_escapes_in_paths_are_neutralised(tmp_path: Path) -> None:
    write_log(tmp_path, [make_decision(0, path="/tmp/evil\x1b]0;pwned\x07\n/bin/ok")])
    proc = denials("--log-dir", str(tmp_path))
    assert proc.returncode == 0
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "/tmp/evil\\x1b]0;pwned\\x07\\n/bin/ok" in proc.stdout
    assert len(proc.stdout.splitlines()) == 2


def test_log_dir_comes_from_the_running_agent(tmp_path: Path) -> None:
    log_dir = tmp_path / "agent-log"
    ids = write_log(log_dir, [make_decision(0)])
    asked: List[Dict[str, Any]] = []
    state = tmp_path / "state"

    def handler(request: Dict[str, Any]) -> Dict[str, Any]:
        asked.append(request)
        return {"state": "ready", "log_dir": str(log_dir)}

    server = ControlServer(str(state / "control.sock"), handler)
    server.start()
    try:
        proc = denials("--state-dir", str(state), "--json")
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert ids_of(proc.stdout) == ids
    assert asked and asked[0]["cmd"] == "status"
    assert f"reading {log_dir} (from the running agent on {state}/control.sock)" in proc.stderr


def test_without_an_agent_the_configured_policy_names_the_log(tmp_path: Path) -> None:
    proc = denials("--state-dir", str(tmp_path / "nobody"))
    if os.path.exists("/etc/execguard/policy.toml"):
        assert "(from /etc/execguard/policy.toml (no agent answered" in proc.stderr
    else:
        assert "reading /var/log/execguard (from the embedded default policy" in proc.stderr
    assert proc.returncode in (0, 1, 2)


def test_a_stalled_agent_does_not_stall_the_review(tmp_path: Path) -> None:
    """An agent that accepts but never answers: the tool falls back within its deadline."""
    import socket as so

    state = tmp_path / "state"
    state.mkdir()
    srv = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    srv.bind(str(state / "control.sock"))
    srv.listen(1)
    try:
        proc = denials("--state-dir", str(state), timeout=30)
    finally:
        srv.close()
    assert "no agent answered" in proc.stderr or "embedded default" in proc.stderr


def test_a_path_that_is_not_utf8_never_crashes_any_output(tmp_path: Path) -> None:
    raw = os.fsdecode(b"/srv/\xff\xfebin")  # how a sensor hands over undecodable bytes
    ids = write_log(tmp_path, [make_decision(0, path=raw, comm=os.fsdecode(b"c\xff"))])
    for fmt in ([], ["--json"], ["--csv"], ["--summary"], ["--summary", "--json"]):
        proc = denials("--log-dir", str(tmp_path), *fmt)
        assert proc.returncode == 0, (fmt, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "\\udcff\\udcfebin" in proc.stdout or "\\\\udcff" in proc.stdout, fmt
    line = denials("--log-dir", str(tmp_path), "--json").stdout
    assert json.loads(line)["event"]["path"] == raw  # the same escape as in the log
    for fmt in ([], ["--json"]):
        proc = denials("explain", ids[0], "--log-dir", str(tmp_path), *fmt)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
