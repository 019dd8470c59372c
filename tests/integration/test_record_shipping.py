"""Shipping the decision log with an existing engine: the shipped rsyslog configuration
(packaging/rsyslog/60-execguard.conf) on a sender rsyslogd follows the log of a real agent,
and a denial it made arrives at a receiver rsyslogd on loopback with every field.

Two rsyslogd processes of the test's own, each with its own configuration, pid file and work
directory (the host's rsyslog, if any, is not touched); the sender's configuration is the
shipped file with only the log path, the collector's address and port changed. The agent
runs fanotify-exec in enforce mode on a tmpfs the test owns.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from tests.agent_fixtures import REPO, exec_file, keygen, running_agent, scoped_tmpfs
from tests.attacks.policies import ALL_SIGNED, write_policy

pytestmark = pytest.mark.timeout(180)
SHIPPED = REPO / "packaging" / "rsyslog" / "60-execguard.conf"
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"

RECEIVER = """
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="in")
template(name="msg-only" type="string" string="%msg%\\n")
ruleset(name="in") {{
    action(type="omfile" file="{out}" template="msg-only")
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def rsyslogd(name: str, config: str, work: Path) -> Iterator[Path]:
    conf, pid = work / f"{name}.conf", work / f"{name}.pid"
    conf.write_text(config)
    check = subprocess.run([RSYSLOGD, "-N1", "-f", str(conf)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, f"{name}: {check.stderr}"
    with open(work / f"{name}.err", "w") as err:
        proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        time.sleep(0.5)
        assert proc.poll() is None, (work / f"{name}.err").read_text()
        yield work / f"{name}.err"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def received(out: Path) -> List[Dict[str, Any]]:
    if not out.exists():
        return []
    lines = [line.strip() for line in out.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_rsyslog_ships_a_real_denial_to_a_collector_with_every_field(tmp_path: Path) -> None:
    port = free_port()
    recv_work, send_work = tmp_path / "receiver", tmp_path / "sender"
    recv_work.mkdir()
    send_work.mkdir()
    out = tmp_path / "collected.jsonl"
    logs = tmp_path / "agent" / "log"
    logs.mkdir(parents=True)
    (logs / "decisions.jsonl").touch()  # the agent appends to it; the sender follows it
    shipped = SHIPPED.read_text()
    for old in ("/var/log/execguard/decisions.jsonl", 'Target="collector.example"',
                'Port="6514"'):
        assert old in shipped, old
    sender = (f'global(workDirectory="{send_work}")\n' + shipped
              .replace("/var/log/execguard/decisions.jsonl", str(logs / "decisions.jsonl"))
              .replace('Target="collector.example"', 'Target="127.0.0.1"')
              .replace('Port="6514"', f'Port="{port}"'))
    with rsyslogd("receiver", RECEIVER.format(work=recv_work, port=port, out=out), recv_work), \
            rsyslogd("sender", sender, send_work) as sender_err, scoped_tmpfs("16m") as scope:
        unsigned = scope / "unsigned"
        shutil.copy("/bin/true", unsigned)
        unsigned.chmod(0o755)
        key = keygen(tmp_path / "release")
        policy = write_policy(tmp_path / "policy.toml", ALL_SIGNED, scope,
                              Path(f"{key}".replace(".key", ".pub")), 5000)
        with running_agent(tmp_path / "agent", "--policy", str(policy), "--backend",
                           "fanotify-exec", "--audit", "off", "--quiet") as agent:
            assert exec_file(unsigned).returncode == 126
            local = agent.wait_decision(str(unsigned))[-1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = [r for r in received(out) if r.get("id") == local["id"]]
            if got:
                break
            time.sleep(0.2)
        assert got, (f"not received: {out.read_text() if out.exists() else 'nothing'}; "
                     f"sender: {sender_err.read_text()[-2000:]}")
    # the collector holds the record the agent wrote, field for field
    assert got[0] == local
    assert local["decision"] == "deny" and local["host"]["hostname"] == socket.gethostname()
