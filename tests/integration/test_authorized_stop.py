"""``execguard stop`` end to end: the real agent enforcing on a tmpfs the test owns
(fanotify), real break-glass keys and tokens issued with the CLI, real execs, real auditd
(tests/record_fixtures.py).

A monitor token and a stop token for another host are refused and the agent keeps
enforcing; a valid stop token stops it (exit 0), the stop is recorded with its reason, and
enforcement ends with it; the same token against a second agent on the same state directory
is refused (the ledger), and that agent runs on.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from agent.breakglass.token import HostId
from tests.agent_fixtures import cli, exec_file, keygen, running_agent, scoped_tmpfs
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401
from tests.record_fixtures import auditd_running, run_tool, wait_in_log

pytestmark = pytest.mark.timeout(300)

# fanotify: this host refuses to load BPF LSM programs (execguard doctor); a runner that
# outlives the agent (bpf-lsm, keep-enforcing) releases through Agent.stop (agent/daemon.py)
BACKEND, DENY = "fanotify-exec", "fanotify-deny"



@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture



def issue(key: Path, host: str, out: Path, grant: str) -> Tuple[Path, str]:
    """The token file and its nonce."""
    done = cli("breakglass", "issue", "--host", host, "--seconds", "600", "--reason",
               "INC-9: retire the host", "--key", str(key), "--grant", grant, "-o", str(out))
    assert done.returncode == 0, done.stderr
    payload = json.loads(base64.b64decode(json.loads(out.read_text())["payload"]))
    assert payload["grant"] == grant
    return out, str(payload["nonce"])


def stop(state: Path, token: Path, *extra: str) -> Tuple[int, Dict[str, Any]]:
    done = cli("stop", "--token", str(token), "--state-dir", str(state), "--json", *extra)
    lines = done.stdout.splitlines()
    assert len(lines) == 1, (done.stdout, done.stderr)  # one JSON object, also on errors
    return done.returncode, json.loads(lines[0])


def ledger(state: Path) -> List[Tuple[Any, ...]]:
    return [(r["event"], r.get("why"), r.get("verb")) for r in
            map(json.loads, (state / "breakglass.jsonl").read_text().splitlines())]


def test_authorized_stop_refusals_stop_and_replay(tmp_path: Path, material: Material) -> None:
    bg_keys = tmp_path / "bg-keys"
    bg_keys.mkdir()
    ops_key = keygen(bg_keys / "ops")  # ops.pub is the pinned key; the .key is not read
    host = cli("breakglass", "host-id").stdout.strip()
    assert HostId.parse(host)
    state = tmp_path / "state"
    with auditd_running() as auditd, scoped_tmpfs() as scope:
        unsigned = copy_signed(material.bins["app"], scope / "bad", None)
        args = ("--mode", "enforce", "--scope", str(scope), "--key", str(material.keys["a"]),
                "--backend", BACKEND, "--breakglass-keys", str(bg_keys))
        monitor, _ = issue(ops_key, host, tmp_path / "monitor.tok", "monitor")
        elsewhere, _ = issue(ops_key, "elsewhere:" + "f" * 32, tmp_path / "other.tok", "stop")
        good, nonce = issue(ops_key, host, tmp_path / "stop.tok", "stop")

        with running_agent(tmp_path, *args) as agent:
            assert agent.status()["enforcement"] == DENY
            assert exec_file(unsigned).returncode == 126

            # refused: the agent keeps running and enforcing
            for token, code in ((monitor, "wrong-grant"), (elsewhere, "wrong-host")):
                rc, doc = stop(state, token)
                assert rc == 1 and doc["rejected"] == code, doc
                assert agent.proc.poll() is None
                assert agent.status()["state"] == "ready"
                assert exec_file(unsigned).returncode == 126

            # a valid stop token: the answer comes, then the agent exits 0
            rc, doc = stop(state, good, "--why", "decommission drill")
            assert rc == 0 and doc["ok"] and doc["stopping"] and doc["token"] == nonce, doc
            assert doc["pid"] == agent.proc.pid and doc["backend"] == BACKEND
            assert agent.proc.wait(timeout=60) == 0
            out = agent.output.read_text()
            assert f"AUTHORIZED STOP by token {nonce[:12]}" in out, out[-3000:]
            # enforcement ended with the agent (fanotify: its marks go with it)
            ran = exec_file(unsigned)
            assert ran.returncode == 0 and ran.stdout == "app\n"

        # the same token against a new agent on the same state directory: spent
        with running_agent(tmp_path, *args) as agent:
            rc, doc = stop(state, good)
            assert rc == 1 and doc["rejected"] == "replayed", doc
            assert agent.proc.poll() is None and agent.status()["state"] == "ready"
            assert exec_file(unsigned).returncode == 126

        assert ledger(state) == [("rejected", "wrong-grant", "stop"),
                                 ("rejected", "wrong-host", "stop"),
                                 ("stop", None, None),
                                 ("rejected", "replayed", "stop")]

        # auditd: the authorized stop, its stop record with the why, every refusal
        wait_in_log(auditd.log_file, "op=stop-reject", 3)
        found = run_tool("ausearch", "-m", "USYS_CONFIG", "-i", "-if", auditd.log_file)
        lines = [x for x in found.splitlines() if "op=authorized-stop" in x or
                 "op=stop-reject" in x]
        assert any("op=authorized-stop" in x and f"token={nonce}" in x and
                   "info=decommission drill (token reason: INC-9: retire the host)" in x
                   and "res=success" in x for x in lines), lines
        for code in ("wrong-grant", "wrong-host", "replayed"):
            assert any("op=stop-reject" in x and f"reason={code}" in x and "res=failed" in x
                       for x in lines), (code, lines)
        stops = run_tool("ausearch", "-m", "SERVICE_STOP", "-i", "-if", auditd.log_file)
        assert f"info=authorized stop by token {nonce[:12]}: decommission drill" in stops, \
            stops[-3000:]


def test_a_stop_signed_by_m_of_n_policy_root_keys(tmp_path: Path, material: Material) -> None:
    """No break-glass key pinned at all: the policy root keys (3 pinned, threshold 2, as
    bundles are checked) sign the stop. One signature is refused, two stop the agent, and
    the audit record names the authority."""
    roots_dir = tmp_path / "policy-keys"
    roots_dir.mkdir()
    roots = [keygen(roots_dir / f"root{i}") for i in range(3)]
    for private in roots:  # only the .pub files are pinned
        private.rename(tmp_path / private.name)
    roots = [tmp_path / r.name for r in roots]
    host = cli("breakglass", "host-id").stdout.strip()
    state = tmp_path / "state"

    def issue_by(keys: List[Path], out: Path) -> str:
        done = cli("breakglass", "issue", "--host", host, "--seconds", "600", "--reason",
                   "INC-10: retire the host", "--grant", "stop", "-o", str(out),
                   *[arg for k in keys for arg in ("--key", str(k))])
        assert done.returncode == 0, done.stderr
        return str(json.loads(base64.b64decode(json.loads(out.read_text())["payload"]))
                   ["nonce"])

    with auditd_running() as auditd, scoped_tmpfs() as scope:
        unsigned = copy_signed(material.bins["app"], scope / "bad", None)
        issue_by(roots[:1], tmp_path / "one.tok")
        nonce = issue_by([roots[1], roots[2]], tmp_path / "two.tok")
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", BACKEND,
                           "--breakglass-keys", str(tmp_path / "no-bg-keys"),
                           "--policy-keys", str(roots_dir),
                           "--policy-threshold", "2") as agent:
            rc, doc = stop(state, tmp_path / "one.tok")
            assert rc == 1 and doc["rejected"] == "untrusted-key", doc
            assert "2 signature(s) by pinned policy keys needed" in doc["error"], doc
            assert agent.proc.poll() is None and exec_file(unsigned).returncode == 126

            rc, doc = stop(state, tmp_path / "two.tok")
            assert rc == 0 and doc["ok"] and doc["token"] == nonce, doc
            assert doc["authority"]["keys"] == "policy", doc
            assert len(doc["authority"]["signers"]) == 2, doc
            assert agent.proc.wait(timeout=60) == 0
        assert exec_file(unsigned).returncode == 0  # enforcement ended with the agent
        wait_in_log(auditd.log_file, "op=authorized-stop", 1)
        found = run_tool("ausearch", "-m", "USYS_CONFIG", "-i", "-if", auditd.log_file)
        assert any("op=authorized-stop" in x and f"token={nonce}" in x
                   and "authority=policy-keys threshold=2-of-3 signers=\"sha256:" in x
                   for x in found.splitlines()), \
            found[-3000:]
