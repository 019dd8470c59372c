"""Break-glass end to end: the real agent enforcing on a tmpfs the test owns (fanotify), real
tokens issued and applied with the CLI, real execs, real auditd (tests/record_fixtures.py).

An unsigned Go binary is denied; a token makes it run (recorded as a monitor-mode denial);
at expiry it is denied again without a restart. Replays (also after a restart), a wrong
host, a wrong key, a tampered and an expired token are all refused, and every step is in
the audit log and the agent's ledger.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from agent import signing
from agent.breakglass.token import HostId, issue
from tests.agent_fixtures import cli, exec_file, keygen, running_agent, scoped_tmpfs, wait_for
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401
from tests.record_fixtures import auditd_running, run_tool, wait_in_log

pytestmark = pytest.mark.timeout(300)

EXPIRY_S = 12  # long enough for the monitor-mode execs below, short for the suite
# fanotify: this host refuses to load BPF LSM programs (execguard doctor); the bpf-lsm
# runner's re-arm on a mode switch is its own policy_changed (agent/backends/)
BACKEND, DENY = "fanotify-exec", "fanotify-deny"



@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture



def issue_cli(key: Path, host: str, out: Path, seconds: int, reason: str = "incident 7"
              ) -> Path:
    done = cli("breakglass", "issue", "--host", host, "--seconds", str(seconds), "--reason",
               reason, "--key", str(key), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "monitor mode from" in done.stderr
    return out


def apply(state: Path, token: Path) -> subprocess.CompletedProcess[str]:
    return cli("breakglass", "apply", str(token), "--state-dir", str(state), "--json")


def rejected(state: Path, token: Path) -> str:
    done = apply(state, token)
    assert done.returncode == 1, (done.stdout, done.stderr)
    return str(json.loads(done.stdout)["rejected"])


def ledger(state: Path) -> List[Dict[str, Any]]:
    return [json.loads(x) for x in (state / "breakglass.jsonl").read_text().splitlines()]


def test_breakglass_applies_expires_and_is_single_use(tmp_path: Path,
                                                      material: Material) -> None:
    bg_keys = tmp_path / "bg-keys"
    bg_keys.mkdir()
    ops_key = keygen(bg_keys / "ops")  # ops.pub is the pinned key; the .key is not read
    rogue_key = keygen(tmp_path / "rogue")
    host = cli("breakglass", "host-id").stdout.strip()
    assert HostId.parse(host)
    state = tmp_path / "state"
    with auditd_running() as auditd, scoped_tmpfs() as scope:
        unsigned = copy_signed(material.bins["app"], scope / "bad", None)
        signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
        args = ("--mode", "enforce", "--scope", str(scope), "--key", str(material.keys["a"]),
                "--backend", BACKEND, "--breakglass-keys", str(bg_keys),
                "--status-interval", "1")
        with running_agent(tmp_path, *args) as agent:
            assert agent.status()["enforcement"] == DENY
            assert exec_file(unsigned).returncode == 126
            assert exec_file(signed).returncode == 0

            # refused tokens change nothing
            wrong_host = issue_cli(ops_key, "elsewhere:" + "f" * 32, tmp_path / "wh.tok", 600)
            assert rejected(state, wrong_host) == "wrong-host"
            wrong_key = issue_cli(rogue_key, host, tmp_path / "wk.tok", 600)
            assert rejected(state, wrong_key) == "untrusted-key"
            tampered = tmp_path / "tampered.tok"
            doc = json.loads(issue_cli(ops_key, host, tmp_path / "t.tok", 60).read_text())
            payload = json.loads(base64.b64decode(doc["payload"]))
            payload["not_after"] += 86000
            doc["payload"] = base64.b64encode(json.dumps(
                payload, sort_keys=True, separators=(",", ":")).encode()).decode()
            tampered.write_text(json.dumps(doc))
            assert rejected(state, tampered) == "bad-signature"
            key = signing.load_private_key(ops_key.read_bytes(), str(ops_key), None)
            expired = tmp_path / "expired.tok"
            expired.write_bytes(issue(key, HostId.parse(host), 60, "old",
                                      now=time.time() - 120)[1].to_bytes())
            assert rejected(state, expired) == "expired"
            assert exec_file(unsigned).returncode == 126
            assert agent.status()["mode"] == "enforce"

            # a good token: monitor mode, the unsigned binary runs and is reported
            token = issue_cli(ops_key, host, tmp_path / "good.tok", EXPIRY_S)
            applied = apply(state, token)
            assert applied.returncode == 0, applied.stdout + applied.stderr
            not_after = json.loads(base64.b64decode(json.loads(token.read_text())["payload"])
                                   )["not_after"]
            seen = len(agent.wait_decision(str(unsigned)))
            for _ in range(2):  # the second exec must not be denied by a stale answer
                ran = exec_file(unsigned)
                assert ran.returncode == 0 and ran.stdout == "app\n"
            rec = agent.wait_decision(str(unsigned), seen + 1)[-1]
            assert rec["decision"] == "deny" and rec["enforcement"] == "monitor"
            bg = json.loads(applied.stdout)["breakglass"]
            assert bg["active"] and 0 < bg["remaining_s"] <= EXPIRY_S
            shown = cli("breakglass", "status", "--state-dir", str(state))
            assert shown.returncode == 0 and "break-glass ACTIVE" in shown.stdout
            status = cli("status", "--state-dir", str(state))
            assert "break-glass ACTIVE: monitor mode until" in status.stdout
            assert agent.status()["mode"] == "monitor"
            assert agent.status()["enforcement"] == "monitor"
            wait_for(lambda: "BREAK-GLASS=" in agent.output.read_text(), timeout=5)  # console
            assert time.time() < not_after, "the machine was too slow for this test"

            # expiry: enforcement returns without a restart, and the exec that ran during
            # break-glass left no kernel-side allow behind
            wait_for(lambda: not agent.status()["breakglass"]["active"], timeout=EXPIRY_S + 10)
            assert time.time() >= not_after  # not a moment early (the tick is 0.2 s)
            assert agent.status()["mode"] == "enforce"
            seen = len(agent.wait_decision(str(unsigned)))
            denied = exec_file(unsigned)
            assert denied.returncode == 126 and "Operation not permitted" in denied.stderr
            rec = agent.wait_decision(str(unsigned), seen + 1)[-1]
            assert rec["enforcement"] == DENY
            # the warm cache survives both switches (the mode is not part of its binding):
            # the signed binary, its ignore mark flushed, is answered from the cache
            seen = len(agent.wait_decision(str(signed)))
            assert exec_file(signed).returncode == 0
            assert agent.wait_decision(str(signed), seen + 1)[-1]["source"] == "cache"
            assert agent.status()["cache"]["rebinds"] == 0

            assert rejected(state, token) == "expired"  # the clock is checked first

            # end early, then nothing is left to end
            second = issue_cli(ops_key, host, tmp_path / "second.tok", 600)
            assert apply(state, second).returncode == 0
            assert exec_file(unsigned).returncode == 0
            assert rejected(state, second) == "replayed"  # while it is active
            # a policy reload meanwhile installs the enforce policy again: the overlay stays
            agent.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "policy reloaded" in agent.output.read_text())
            assert agent.status()["mode"] == "monitor"
            assert exec_file(unsigned).returncode == 0
            ended = cli("breakglass", "revoke", "--state-dir", str(state), "--reason", "done")
            assert ended.returncode == 0 and "not active" in ended.stdout
            assert exec_file(unsigned).returncode == 126
            again = cli("breakglass", "end", "--state-dir", str(state))
            assert again.returncode == 1 and "no break-glass is active" in again.stdout

        # a restart does not make a spent token new
        with running_agent(tmp_path, *args) as agent:
            assert rejected(state, second) == "replayed"
            assert exec_file(unsigned).returncode == 126

        events = [(r["event"], r.get("why")) for r in ledger(state)]
        assert events == [
            ("rejected", "wrong-host"), ("rejected", "untrusted-key"),
            ("rejected", "bad-signature"), ("rejected", "expired"),
            ("applied", None), ("ended", "expired"), ("rejected", "expired"),
            ("applied", None), ("rejected", "replayed"), ("ended", "revoked"),
            ("rejected", "replayed")]

        # auditd has all of it
        wait_in_log(auditd.log_file, "op=breakglass-end", 2)
        found = run_tool("ausearch", "-m", "USYS_CONFIG", "-i", "-if", auditd.log_file)
        nonce = json.loads(base64.b64decode(json.loads(token.read_text())["payload"]))["nonce"]
        lines = [x for x in found.splitlines() if "op=breakglass" in x]
        assert any("op=breakglass-apply" in x and f"token={nonce}" in x and
                   "info=incident 7" in x and "res=success" in x for x in lines), lines
        assert any("op=breakglass-end" in x and f"token={nonce}" in x and
                   "reason=expired" in x for x in lines), lines
        for code in ("wrong-host", "untrusted-key", "bad-signature", "expired", "replayed"):
            assert any("op=breakglass-reject" in x and f"reason={code}" in x and
                       "res=failed" in x for x in lines), (code, lines)
        assert any("op=breakglass-end" in x and "reason=revoked" in x for x in lines)
