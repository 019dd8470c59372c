"""Hostile drop-directory and control-socket bundles against the real agent (fanotify-exec,
enforce, on a tmpfs the test owns), real keys and real Go binaries: JSON nested past the
parser's recursion limit and times whose offset leaves datetime's range are refused
(``malformed``/``threshold``); the agent keeps running, answering and enforcing, and the
next good bundle still applies on SIGHUP. A symlink in the drop directory is refused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.agent_fixtures import RunningAgent, exec_file, running_agent, scoped_tmpfs
from tests.integration.test_policy_apply import agent_args, apply, bundle_status
from tests.policy_bundle_fixtures import make_bundle, root_keys, signed_payload, write_policy
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(300)

DEEP = b'{"payloadType": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def _history(agent: RunningAgent) -> List[Dict[str, Any]]:
    path = agent.log_dir / "policy-bundles.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _sighup_until(agent: RunningAgent, done: Any, what: str) -> None:
    agent.proc.send_signal(1)  # SIGHUP
    deadline = time.monotonic() + 20
    while not done():
        assert agent.proc.poll() is None, f"agent exited: {agent.output.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: {agent.output.read_text()[-3000:]}"
        time.sleep(0.1)


def test_hostile_bundles_are_refused_and_the_agent_keeps_enforcing(
        tmp_path: Path, material: Material) -> None:
    keys = root_keys(tmp_path / "root")
    r = keys.private
    with scoped_tmpfs() as scope:
        by_a = copy_signed(material.bins["app"], scope / "a", material.private["a"])
        by_b = copy_signed(material.bins["app"], scope / "b", material.private["b"])
        plain = write_policy(tmp_path / "plain.toml", 1, scope, material.keys["a"])
        edge = json.dumps({
            "version": 3, "issued_at": "2026-01-01T00:00:00Z",
            "expires": "9999-12-31T23:59:59-01:00",
            "policy": {"version": 3, "trust": {"keys": []}},
            "trust": {"keys": {}, "trusted_root": {}}}).encode()
        drop = tmp_path / "drop"
        with running_agent(tmp_path, "--policy", str(plain), "--audit", "off",
                           *agent_args(keys, drop)) as agent:
            assert exec_file(by_b).returncode == 126
            # unsigned and too deep; unsigned with an out-of-range expiry; signed and both
            (drop / "deep.json").write_bytes(DEEP)
            signed_payload(drop / "edge.bundle", edge, [])
            signed_payload(drop / "edge-signed.bundle", edge, [r["r1"], r["r2"]])
            _sighup_until(agent, lambda: len(_history(agent)) >= 3, "three refusals")
            reasons = sorted(rec["reason"] for rec in _history(agent))
            assert reasons == ["malformed", "malformed", "threshold"], _history(agent)
            assert agent.status()["policy"]["version"] == 1
            assert exec_file(by_b).returncode == 126 and exec_file(by_a).returncode == 0
            # the same files through the control socket: refused, the control thread lives
            for name, reason in (("deep.json", "malformed"), ("edge.bundle", "threshold"),
                                 ("edge-signed.bundle", "malformed")):
                reply = apply(agent, drop / name)
                assert reply["exit"] == 1 and reply["reason"] == reason, reply
            for name in ("deep.json", "edge.bundle", "edge-signed.bundle"):
                (drop / name).unlink()
            # a valid 2-of-3 bundle, but reached through a symlink: not followed
            v2 = make_bundle(tmp_path / "v2.bundle",
                             write_policy(tmp_path / "v2.toml", 2, scope, material.keys["b"]),
                             [r["r1"], r["r3"]])
            os.symlink(v2, drop / "v2.bundle")
            seen = len(_history(agent))
            _sighup_until(agent, lambda: len(_history(agent)) > seen, "symlink refusal")
            assert "symbolic link" in _history(agent)[-1]["detail"]
            assert bundle_status(agent)["in_force"] is None
            # the real file: applied by the same main loop, which is still turning
            (drop / "v2.bundle").unlink()
            (drop / "v2.bundle").write_bytes(v2.read_bytes())
            _sighup_until(agent, lambda: (bundle_status(agent)["in_force"] or {}).get(
                "version") == 2, "v2 applied")
            assert exec_file(by_b).returncode == 0 and exec_file(by_a).returncode == 126
