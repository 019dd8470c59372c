"""Signed policy bundles applied to the real agent (fanotify-exec, enforce, on a tmpfs the test
owns), with real keys, real signatures and real Go binaries: a 2-of-3 bundle changes what
runs; every kind of bad bundle is refused for its own reason and the old policy keeps
enforcing; anti-rollback survives a restart; an expired bundle keeps enforcing with an alarm.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List

import pytest

from agent.policy.bundle import canonical_payload
from tests.agent_fixtures import RunningAgent, cli, exec_file, running_agent, scoped_tmpfs
from tests.policy_bundle_fixtures import (
    RootKeys,
    make_bundle,
    root_keys,
    signed_payload,
    tampered,
    write_policy,
)
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401
from tests.record_fixtures import auditd_running, run_tool, wait_in_log

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture



def apply(agent: RunningAgent, bundle: Path) -> Dict[str, Any]:
    """``execguard policy apply --json``: the agent's answer, with the exit code."""
    done = cli("policy", "apply", str(bundle), "--state-dir", str(agent.state_dir), "--json")
    assert done.returncode in (0, 1), done
    reply: Dict[str, Any] = json.loads(done.stdout)
    reply["exit"] = done.returncode
    return reply


def agent_args(keys: RootKeys, drop: Path, *extra: str) -> List[str]:
    drop.mkdir(exist_ok=True)
    return ["--backend", "fanotify-exec", "--policy-keys", str(keys.pinned_dir),
            "--policy-threshold", "2", "--policy-drop-dir", str(drop), *extra]


def bundle_status(agent: RunningAgent) -> Dict[str, Any]:
    section: Dict[str, Any] = agent.status()["policy_bundle"]
    return section


def test_2_of_3_bundle_changes_what_runs(tmp_path: Path, material: Material) -> None:
    keys = root_keys(tmp_path / "root")
    r = keys.private
    with auditd_running() as auditd, scoped_tmpfs() as scope:
        by_a = copy_signed(material.bins["app"], scope / "a", material.private["a"])
        by_b = copy_signed(material.bins["app"], scope / "b", material.private["b"])
        v1 = make_bundle(tmp_path / "v1.bundle",
                         write_policy(tmp_path / "v1.toml", 1, scope, material.keys["a"]),
                         [r["r1"], r["r2"]])
        v2 = make_bundle(tmp_path / "v2.bundle",
                         write_policy(tmp_path / "v2.toml", 2, scope, material.keys["b"]),
                         [r["r2"], r["r3"]])
        with running_agent(tmp_path, "--policy", str(v1),
                           *agent_args(keys, tmp_path / "drop")) as agent:
            assert bundle_status(agent)["in_force"]["version"] == 1
            assert exec_file(by_a).returncode == 0  # allowed, and now ignore-marked
            assert exec_file(by_a).returncode == 0
            assert exec_file(by_b).returncode == 126

            reply = apply(agent, v2)
            assert reply["exit"] == 0 and reply["applied"] and reply["reason"] == "ok"
            assert reply["old_version"] == 1 and reply["version"] == 2
            assert len(reply["signers"]["valid"]) == 2

            # the binary allowed before is now denied: its kernel ignore mark and its cached
            # verdict went with the old policy
            denied = exec_file(by_a)
            assert denied.returncode == 126, denied
            rec = agent.wait_decision(str(by_a), 2)[-1]
            assert rec["decision"] == "deny" and rec["policy_version"] == 2
            assert rec["source"] != "cache"
            ran = exec_file(by_b)
            assert ran.returncode == 0 and ran.stdout == "app\n"
            status = agent.status()
            assert status["policy"]["version"] == 2
            assert bundle_status(agent)["in_force"]["digest"] == reply["digest"]

            # the agent's own record and auditd both have the apply, old and new version
            history = (agent.log_dir / "policy-bundles.jsonl").read_text().splitlines()
            last = json.loads(history[-1])
            assert last["applied"] and last["old_version"] == 1 and last["version"] == 2
            wait_in_log(auditd.log_file, "op=policy-bundle")
            found = run_tool("ausearch", "-m", "USYS_CONFIG", "-i", "-if", auditd.log_file)
            assert "op=policy-bundle" in found and "new_version=2" in found
            assert "old_version=1" in found
            # a refusal is recorded too (res=failed), and changes nothing
            assert apply(agent, v1)["reason"] == "rollback"
            wait_in_log(auditd.log_file, "reason=rollback")
            found = run_tool("ausearch", "-m", "USYS_CONFIG", "-i", "-if", auditd.log_file)
            refusal = [line for line in found.splitlines() if "reason=rollback" in line]
            assert refusal and "res=failed" in refusal[-1] and "old_version=2" in refusal[-1]
            assert exec_file(by_b).returncode == 0 and exec_file(by_a).returncode == 126


def test_bad_bundles_are_refused_and_the_old_policy_keeps_enforcing(
        tmp_path: Path, material: Material) -> None:
    keys = root_keys(tmp_path / "root")
    r = keys.private
    with scoped_tmpfs() as scope:
        signed = copy_signed(material.bins["app"], scope / "signed", material.private["a"])
        unsigned = copy_signed(material.bins["app"], scope / "unsigned", None)
        pol = write_policy(tmp_path / "v2.toml", 2, scope, material.keys["a"])
        # v3 would let anything run (monitor): each bad copy of it must change nothing
        loose = write_policy(tmp_path / "v3.toml", 3, scope, material.keys["a"], "monitor")
        v1 = make_bundle(tmp_path / "v1.bundle", pol, [r["r1"], r["r2"]], version=1)
        v2 = make_bundle(tmp_path / "v2.bundle", pol, [r["r1"], r["r2"]])
        good_v3 = make_bundle(tmp_path / "good.bundle", loose, [r["r1"], r["r3"]])
        bad: Dict[str, Path] = {
            "threshold": make_bundle(tmp_path / "one.bundle", loose, [r["r1"]]),
            "wrong-key": make_bundle(tmp_path / "wrong.bundle", loose,
                                     [r["r1"], r["stranger"]]),
            "bad-signature": tampered(
                make_bundle(tmp_path / "t.bundle", write_policy(
                    tmp_path / "t.toml", 3, scope, material.keys["a"]), [r["r1"], r["r2"]]),
                tmp_path / "tampered.bundle"),
            "rollback": v1,
            "expired": make_bundle(
                tmp_path / "expired.bundle", loose, [r["r1"], r["r2"]],
                issued_at=datetime.now(timezone.utc) - timedelta(days=10),
                lifetime=timedelta(days=1)),
            "malformed-file": tmp_path / "garbage.bundle",
            "malformed-policy": signed_payload(
                tmp_path / "badpolicy.bundle",
                canonical_payload(3, datetime.now(timezone.utc),
                                  datetime.now(timezone.utc) + timedelta(days=1),
                                  {"version": 3, "mode": "lenient"}, {}, {}),
                [r["r1"], r["r2"]]),
        }
        bad["malformed-file"].write_text('{"payloadType": "application/vnd.execguard')
        want = {"threshold": "threshold", "wrong-key": "threshold",
                "bad-signature": "bad-signature", "rollback": "rollback",
                "expired": "expired", "malformed-file": "malformed",
                "malformed-policy": "malformed"}
        with running_agent(tmp_path, "--policy", str(v2), "--audit", "off",
                           *agent_args(keys, tmp_path / "drop")) as agent:
            digest = bundle_status(agent)["in_force"]["digest"]
            for case, path in bad.items():
                reply = apply(agent, path)
                assert reply["exit"] == 1 and not reply["applied"], (case, reply)
                assert reply["reason"] == want[case], (case, reply)
                assert reply["old_version"] == 2, (case, reply)
                # the old policy still enforces: unsigned denied, signed runs
                assert exec_file(unsigned).returncode == 126, case
                ran = exec_file(signed)
                assert ran.returncode == 0 and ran.stdout == "app\n", case
                assert bundle_status(agent)["in_force"]["digest"] == digest, case
                assert agent.status()["policy"]["version"] == 2, case
            assert apply(agent, bad["wrong-key"])["signers"]["unknown"]
            refused = [json.loads(line) for line in
                       (agent.log_dir / "policy-bundles.jsonl").read_text().splitlines()]
            assert [x["reason"] for x in refused if not x["applied"]][:len(bad)] == \
                [want[c] for c in bad]
            # the control: a good v3 is applied (monitor), so the unsigned file now runs
            assert apply(agent, good_v3)["applied"]
            assert exec_file(unsigned).returncode == 0


def test_rollback_refused_after_restart_and_the_agent_comes_back_on_its_bundle(
        tmp_path: Path, material: Material) -> None:
    keys = root_keys(tmp_path / "root")
    r = keys.private
    with scoped_tmpfs() as scope:
        signed = copy_signed(material.bins["app"], scope / "signed", material.private["a"])
        by_b = copy_signed(material.bins["app"], scope / "b", material.private["b"])
        old_pol = write_policy(tmp_path / "old.toml", 4, scope, material.keys["b"])
        new_pol = write_policy(tmp_path / "new.toml", 5, scope, material.keys["a"])
        v4 = make_bundle(tmp_path / "v4.bundle", old_pol, [r["r1"], r["r2"]])
        v5 = make_bundle(tmp_path / "v5.bundle", new_pol, [r["r2"], r["r3"]])
        drop = tmp_path / "drop"
        args = agent_args(keys, drop, "--audit", "off")
        with running_agent(tmp_path, "--policy", str(v4), *args) as agent:
            assert exec_file(by_b).returncode == 0
            # the drop directory on SIGHUP
            (drop / "v5.bundle").write_bytes(v5.read_bytes())
            agent.proc.send_signal(1)  # SIGHUP
            deadline = time.monotonic() + 20
            while bundle_status(agent)["in_force"]["version"] != 5:
                assert time.monotonic() < deadline, agent.output.read_text()[-2000:]
                time.sleep(0.1)
            assert exec_file(by_b).returncode == 126
        applied = json.loads((tmp_path / "state" / "policy-bundle" / "applied.json").read_text())
        assert applied["version"] == 5
        (drop / "v5.bundle").unlink()
        # restarted, even with the old bundle on the command line: v5 stays, v4 is refused
        with running_agent(tmp_path, "--policy", str(v4), *args) as agent:
            section = bundle_status(agent)
            assert section["in_force"]["version"] == 5
            assert agent.status()["policy"]["version"] == 5
            assert exec_file(by_b).returncode == 126
            assert exec_file(signed).returncode == 0
            reply = apply(agent, v4)
            assert reply["exit"] == 1 and reply["reason"] == "rollback"
            assert exec_file(by_b).returncode == 126
        # and without any --policy: still v5, unless the drop directory has a newer one
        with running_agent(tmp_path, *args) as agent:
            assert agent.status()["policy"]["version"] == 5
            assert exec_file(by_b).returncode == 126
        v6 = make_bundle(drop / "v6.bundle", write_policy(tmp_path / "v6.toml", 6, scope,
                                                          material.keys["b"]),
                         [r["r1"], r["r3"]])
        (drop / "old.bundle").write_bytes(v4.read_bytes())  # ignored: below the applied
        with running_agent(tmp_path, *args) as agent:
            assert bundle_status(agent)["in_force"]["version"] == 6
            assert bundle_status(agent)["in_force"]["source"] == str(v6)
            assert exec_file(by_b).returncode == 0
        # the kept bundle is re-verified at start: altered on disk, it is refused (recorded)
        # and the agent starts on the configured policy file instead
        kept = tmp_path / "state" / "policy-bundle" / "current.bundle"
        kept.write_bytes(tampered(kept, tmp_path / "t.bundle").read_bytes())
        (drop / "v6.bundle").unlink()
        with running_agent(tmp_path, "--policy", str(new_pol), *args) as agent:
            section = bundle_status(agent)
            assert section["in_force"] is None
            assert section["last"]["reason"] == "bad-signature"
            assert section["last"]["origin"] == "restore"
            assert agent.status()["policy"]["version"] == 5


def test_expired_bundle_keeps_enforcing_with_an_alarm(tmp_path: Path,
                                                      material: Material) -> None:
    keys = root_keys(tmp_path / "root")
    r = keys.private
    with scoped_tmpfs() as scope:
        unsigned = copy_signed(material.bins["app"], scope / "unsigned", None)
        signed = copy_signed(material.bins["app"], scope / "signed", material.private["a"])
        pol = write_policy(tmp_path / "p.toml", 7, scope, material.keys["a"])
        short = make_bundle(tmp_path / "short.bundle", pol, [r["r1"], r["r2"]],
                            lifetime=timedelta(seconds=20))
        args = agent_args(keys, tmp_path / "drop", "--audit", "off")
        with running_agent(tmp_path, "--policy", str(short), *args) as agent:
            status = agent.status()
            assert status["policy_bundle"]["expiry"] == "expiring"  # inside the 7 d warning
            assert any("expires at" in w for w in status["warnings"])
            deadline = time.monotonic() + 45
            while agent.status()["state"] != "alarm":
                assert time.monotonic() < deadline, agent.status()
                time.sleep(0.2)
            status = agent.status()
            assert status["policy_bundle"]["expiry"] == "expired"
            assert any("ALARM" in w for w in status["warnings"])
            assert exec_file(unsigned).returncode == 126  # never fails open
            assert exec_file(signed).returncode == 0
            # the ticker says it once (console, own record), however long it stays expired
            deadline = time.monotonic() + 10
            while "ALARM: policy bundle v7 expired" not in agent.output.read_text():
                assert time.monotonic() < deadline, agent.output.read_text()[-2000:]
                time.sleep(0.2)
            time.sleep(2.5)
            assert agent.output.read_text().count("ALARM: policy bundle v7 expired") == 1
            history = (agent.log_dir / "policy-bundles.jsonl").read_text()
            assert '"event": "expired"' in history
        # restarted after expiry: comes back on it, still enforcing, still alarmed
        with running_agent(tmp_path, *args, expect_state=("alarm",)) as agent:
            assert agent.status()["policy"]["version"] == 7
            assert exec_file(unsigned).returncode == 126
            assert exec_file(signed).returncode == 0
