"""Denials and agent events reach a real auditd through both transports; ausearch and
aureport show them with the right fields. A dead auditd drops and counts, never blocks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest

from agent.decision import Enforcement
from agent.errors import Reason
from agent.hostid import record_host
from agent.record import (
    Recorder,
    RecorderConfig,
    agent_start,
    agent_stop,
    backend_selected,
    policy_loaded,
)
from agent.record.audit import LibauditTransport, NetlinkTransport, open_transport
from tests.record_fixtures import (
    Auditd,
    audit_status,
    auditd_running,
    make_decision,
    run_tool,
    wait_in_log,
)

TRANSPORTS = ["libaudit", "netlink"]


@pytest.fixture()
def auditd() -> Iterator[Auditd]:
    with auditd_running() as handle:
        yield handle


def _fields(interpreted: str, decision_id: str) -> Dict[str, str]:
    """The msg='…' fields of the interpreted ANOM_EXEC record carrying ``decision_id``."""
    for line in interpreted.splitlines():
        if f"decision_id={decision_id}" in line and "type=ANOM_EXEC" in line:
            body = line.split("msg='", 1)[1].rsplit("'", 1)[0]
            # values may hold spaces once decoded: split on " name=" boundaries
            parts = re.split(r" (?=[a-z_0-9]+=)", body)
            out: Dict[str, str] = {}
            for p in parts:
                k, _, v = p.partition("=")
                out.setdefault(k, v)  # the first comm/exe are the subject's
            return out
    raise AssertionError(f"no ANOM_EXEC record with decision_id={decision_id}")


def test_auto_prefers_the_binding() -> None:
    t = open_transport("auto")
    try:
        assert isinstance(t, LibauditTransport)
    finally:
        t.close()
    n = open_transport("netlink")
    try:
        assert isinstance(n, NetlinkTransport)
    finally:
        n.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_denial_shows_in_ausearch_and_aureport(auditd: Auditd, transport: str,
                                               tmp_path: Path) -> None:
    # a verified signer the policy does not accept: the record names it (signer=)
    d = make_decision(1, comm="my tool", path="/srv/app dir/bin/wé'rd",
                      reason=Reason.IDENTITY_MISMATCH)
    monitor = make_decision(2, path="/srv/app/bin/plain", enforcement=Enforcement.MONITOR)
    rec = Recorder(RecorderConfig(str(tmp_path), audit=transport))
    rec.start()
    try:
        rid = rec.decision(d, exe="/usr/bin/bash")
        mid = rec.decision(monitor)
        allowed = rec.decision(make_decision(3, allow=True))
    finally:
        assert rec.close(10)
    stats = rec.stats()["audit"]
    assert stats["transport"] == transport
    assert (stats["written"], stats["dropped"]) == (2, 0)  # the allow is not an audit record
    assert stats["auditd_pid"] == auditd.pid and stats["kernel_enabled"] in (1, 2)
    wait_in_log(auditd.log_file, f"decision_id={mid}")

    text = run_tool("ausearch", "-if", auditd.log_file, "-m", "ANOM_EXEC", "-i")
    f = _fields(text, rid)
    assert f["op"] == "exec-deny"
    assert f["comm"] == "my tool"
    assert f["exe"] == "/usr/bin/bash"
    assert f["path"] == f["cmd"] == "/srv/app dir/bin/wé'rd"
    assert (f["opid"], f["oppid"]) == (str(d.event.pid), str(d.event.ppid))
    assert f["dev"] == "fe:01" and f["inode"] == str(d.event.identity.ino)
    assert f["sha256"] == d.sha256
    assert (f["reason"], f["enforcement"]) == ("identity-mismatch", "fanotify-deny")
    assert (f["policy_version"], f["rule_id"]) == ("7", "go-release")
    # fields auparse does not know stay as sent (quoted), which is what a collector parses
    assert d.evidence is not None and f["signer"] == f'"{d.evidence.identity}"'
    host = record_host()
    assert f["host"] == f'"{host["hostname"]}:{host["machine_id"] or "?"}"'
    assert f["res"] == "failed"
    assert _fields(text, mid)["res"] == "success"  # monitor: the exec ran
    assert allowed not in text
    # ouid/oauid are interpreted as users: compare with the raw numbers
    raw = run_tool("ausearch", "-if", auditd.log_file, "-m", "ANOM_EXEC", "--raw")
    line = next(x for x in raw.splitlines() if f"decision_id={rid}" in x)
    assert " ouid=1000 oauid=1001 " in line

    # ausearch's own subject filters match the exec's comm and the failed result
    by_comm = run_tool("ausearch", "-if", auditd.log_file, "-m", "ANOM_EXEC", "-c", "my tool",
                       "--success", "no")
    assert rid in by_comm and mid not in by_comm

    report = run_tool("aureport", "-if", auditd.log_file, "--anomaly", "-i")
    serial = re.search(r"msg=audit\([0-9.]+:(\d+)\)", line)
    assert serial is not None
    rows = [r.split() for r in report.splitlines() if re.match(r"\d+\. ", r)]
    row = next(r for r in rows if r[-1] == serial.group(1))
    assert row[3:5] == ["ANOM_EXEC", "/usr/bin/bash"]

    normalized = run_tool("ausearch", "-if", auditd.log_file, "-m", "ANOM_EXEC",
                          "--format", "csv")
    assert "attempted-execution-of-forbidden-program,failed,/srv/app dir/bin/wé'rd" in normalized


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_agent_events_have_their_own_types(auditd: Auditd, transport: str) -> None:
    tag = f"t{os.getpid()}x{transport}"
    rec = Recorder(RecorderConfig(None, audit=transport))
    rec.start()
    try:
        assert rec.agent_event(agent_start("0.1.0", "enforce", os.getpid()))
        assert rec.agent_event(backend_selected("fanotify-exec", "fanotify-deny",
                                                f"self-test passed {tag}"))
        assert rec.agent_event(policy_loaded(None, None, f"/etc/eg/{tag} policy.toml", "enforce",
                                             ok=False, why="signature by an unknown key"))
        assert rec.agent_event(agent_stop(f"SIGTERM {tag}"))
    finally:
        assert rec.close(10)
    assert rec.stats()["audit"]["written"] == 4
    wait_in_log(auditd.log_file, "op=stop")
    wait_in_log(auditd.log_file, tag.encode().hex().upper()[:8], 1)

    starts = run_tool("ausearch", "-if", auditd.log_file, "-m", "SERVICE_START", "-i")
    assert f"agent_pid={os.getpid()}" in starts and "unit=execguard" in starts
    stops = run_tool("ausearch", "-if", auditd.log_file, "-m", "SERVICE_STOP", "-i")
    assert f"info=SIGTERM {tag}" in stops
    config = run_tool("ausearch", "-if", auditd.log_file, "-m", "USYS_CONFIG", "-i")
    assert f"op=backend-select unit=execguard backend=fanotify-exec enforcement=fanotify-deny " \
           f"info=self-test passed {tag}" in config
    load = next(x for x in config.splitlines() if f"/etc/eg/{tag} policy.toml" in x)
    assert "op=policy-load" in load and "res=failed" in load
    assert "info=signature by an unknown key" in load
    assert "policy_mode=enforce" in load


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dead_auditd_drops_and_counts_without_blocking(transport: str, tmp_path: Path) -> None:
    with auditd_running() as daemon:
        if not daemon.started_here:
            pytest.skip(f"auditd pid {daemon.pid} was not started by this test; not stopping it")
        rec = Recorder(RecorderConfig(str(tmp_path), audit=transport))
        rec.start()
        try:
            first = rec.decision(make_decision(1))
            wait_in_log(daemon.log_file, f"decision_id={first}")
            daemon.stop()
            assert audit_status()["pid"] == 0
            t0 = time.monotonic()
            for i in range(200):
                rec.decision(make_decision(i))
            assert time.monotonic() - t0 < 2.0, "recording must never wait for auditd"
            assert rec.flush(10)
            # auditing switched off as well: still no exception, counted under its own cause
            subprocess.run(["auditctl", "-e", "0"], check=True, capture_output=True)
            for i in range(10):
                rec.decision(make_decision(i))
        finally:
            t0 = time.monotonic()
            assert rec.close(10)
            assert time.monotonic() - t0 < 12
        audit = rec.stats()["audit"]
        assert audit["written"] == 1
        assert audit["dropped"] == 210
        assert audit["dropped_by_cause"].get("no-auditd", 0) >= 1
        assert audit["dropped_by_cause"].get("audit-disabled", 0) >= 1
        assert rec.stats()["decision_log"]["written"] == 211  # the log is not affected


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from agent.record import Recorder, RecorderConfig
from tests.record_fixtures import make_decision
rec = Recorder(RecorderConfig(None, audit={transport!r}))
rec.start()
t0 = time.monotonic()
for i in range(20):
    rec.decision(make_decision(i))
submit = time.monotonic() - t0
rec.close(10)
print(json.dumps(dict(rec.stats()["audit"], submit_s=submit)))
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refused_records_are_counted(auditd: Auditd, transport: str) -> None:
    """An agent without CAP_AUDIT_WRITE (dropped from the bounding set, a real refusal by
    the kernel): every denial is counted as a send error, nothing raises."""
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        ["setpriv", "--bounding-set", "-audit_write", sys.executable, "-c",
         CHILD.format(root=root, transport=transport)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["transport"] == transport
    assert (stats["written"], stats["dropped_by_cause"]) == (0, {"send-error": 20})
    assert "refused" in stats["last_error"] or "not permitted" in stats["last_error"]
    assert stats["submit_s"] < 2.0
