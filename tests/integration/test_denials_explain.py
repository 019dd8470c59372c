"""``execguard denials explain ID`` on decisions the real Decider made about files signed
with ``execguard keygen/sign``: the printed ``execguard verify`` command is run and must
exit as the recorded verdict says; the printed ``ausearch`` command finds the audit record."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest

from agent.cache import TrustedCache, identity_from_stat
from agent.control import ControlServer
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent
from agent.errors import Reason
from agent.policy import PolicyStore, load_policy
from agent.record import Recorder, RecorderConfig
from tests.record_fixtures import auditd_running, wait_in_log
from tests.review_fixtures import ENTRY, denials, write_log


@dataclass
class Scene:
    base: Path
    policy: Path
    log: Path
    ids: Dict[str, str]  # signed / unsigned / tampered -> record id
    decisions: Dict[str, Decision]


def eg(*args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run([*ENTRY, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COSIGN_PASSWORD=""), stdin=subprocess.DEVNULL)


def decide(decider: Decider, path: Path) -> Decision:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        event = ExecEvent(4242, 1, 1000, 1000, path.name, str(path),
                          identity_from_stat(os.fstat(fd)), time.time_ns(), "test")
        return decider.decide(event, fd, Enforcement.FANOTIFY_DENY)
    finally:
        os.close(fd)


def build_scene(base: Path) -> Scene:
    bins = base / "bin"
    bins.mkdir()
    assert eg("keygen", "--output-prefix", str(base / "k"), "--no-password").returncode == 0
    for name in ("signed", "unsigned", "tampered"):
        shutil.copy2("/bin/true", bins / name)
    for name in ("signed", "tampered"):
        proc = eg("sign", str(bins / name), "--key", str(base / "k.key"))
        assert proc.returncode == 0, proc.stderr
    with open(bins / "tampered", "ab") as fh:
        fh.write(b"\0")
    policy = base / "policy.toml"
    policy.write_text(f"""version = 3
mode = "enforce"
scopes = ["{bins}"]
state_dir = "{base / 'state'}"
log_dir = "{base / 'log'}"

[trust]
keys = ["{base / 'k.pub'}"]

[[rules]]
id = "everything-signed"
action = "require-signature"
""")
    decider = Decider(PolicyStore(load_policy(str(policy))),
                      TrustedCache(str(base / "cache.msgpack"), "unused"))
    decisions = {name: decide(decider, bins / name) for name in ("signed", "unsigned",
                                                                  "tampered")}
    assert decisions["signed"].allow and decisions["signed"].reason is Reason.OK
    assert decisions["unsigned"].reason is Reason.NO_SIGNATURE
    assert decisions["tampered"].reason is Reason.BAD_SIGNATURE
    names = list(decisions)
    ids = write_log(base / "log", [decisions[n] for n in names])
    return Scene(base, policy, base / "log", dict(zip(names, ids)), decisions)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    return build_scene(tmp_path_factory.mktemp("explain"))


def verify_line(stdout: str) -> List[str]:
    lines = stdout.splitlines()
    cmd = lines[lines.index("Reproduce the signature verdict:") + 1].strip()
    argv = shlex.split(cmd)
    assert argv[:2] == ["execguard", "verify"], cmd
    return argv


@pytest.mark.parametrize("name,expected", [("signed", 0), ("unsigned", 1), ("tampered", 1)])
def test_printed_verify_command_reproduces_the_verdict(scene: Scene, name: str,
                                                       expected: int) -> None:
    proc = denials("explain", scene.ids[name], "--log-dir", str(scene.log),
                   "--policy", str(scene.policy))
    assert proc.returncode == 0, proc.stderr
    argv = verify_line(proc.stdout)
    assert argv[2] == str(scene.base / "bin" / name)
    assert argv[3:] == ["--key", str(scene.base / "k.pub")]
    assert f"expected: exit {expected}" in proc.stdout
    assert f"trust taken from the policy that decided: {scene.policy}" in proc.stdout
    assert "PLACEHOLDER" not in proc.stdout
    ran = subprocess.run([*ENTRY, *argv[1:]], capture_output=True, text=True, timeout=60)
    assert ran.returncode == expected, ran.stdout + ran.stderr
    assert scene.decisions[name].reason.value in ran.stdout


def test_explain_shows_the_whole_record(scene: Scene) -> None:
    d = scene.decisions["signed"]
    proc = denials("explain", scene.ids["signed"], "--log-dir", str(scene.log),
                   "--policy", str(scene.policy))
    out = proc.stdout
    assert d.evidence is not None and d.evidence.key_fingerprint and d.sha256
    for text in (scene.ids["signed"], "decision:           allow", "reason:             ok",
                 d.sha256, d.evidence.key_fingerprint, "kind:               cosign-sig",
                 f"file:               {scene.base}/bin/signed.sig", "everything-signed",
                 d.policy_digest or "?", "version:            3", "comm:               signed",
                 "uid:                1000", "backend:            test",
                 "on disk now:        unchanged since the decision"):
        assert text in out, text
    assert "none: only denials" in out  # an allow has no audit record
    deny = denials("explain", scene.ids["unsigned"], "--log-dir", str(scene.log),
                   "--policy", str(scene.policy)).stdout
    assert "decision:           deny" in deny and "enforcement:        fanotify-deny" in deny
    assert "signature:          none recorded" in deny
    assert (f"ausearch -m ANOM_EXEC -i | grep -F 'decision_id={scene.ids['unsigned']} '"
            in deny)


def test_explain_notices_a_changed_file_and_takes_an_id_prefix(tmp_path: Path) -> None:
    sc = build_scene(tmp_path)
    with open(sc.base / "bin" / "unsigned", "ab") as fh:
        fh.write(b"more")
    proc = denials("explain", sc.ids["unsigned"][:14], "--log-dir", str(sc.log),
                   "--policy", str(sc.policy))
    assert proc.returncode == 0, proc.stderr
    assert "same file, but changed since the decision" in proc.stdout
    (sc.base / "bin" / "signed").unlink()
    gone = denials("explain", sc.ids["signed"], "--log-dir", str(sc.log), "--policy",
                   str(sc.policy)).stdout
    assert "cannot stat it now: No such file or directory" in gone


def test_without_the_policy_placeholders_are_marked(scene: Scene, tmp_path: Path) -> None:
    proc = denials("explain", scene.ids["signed"], "--log-dir", str(scene.log),
                   "--state-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    argv = verify_line(proc.stdout)
    assert argv[2:] == [str(scene.base / "bin" / "signed"), "--key", "<TRUSTED-KEY.pem>"]
    fp = scene.decisions["signed"].evidence.key_fingerprint  # type: ignore[union-attr]
    assert f"PLACEHOLDER <TRUSTED-KEY.pem>: the public key with fingerprint {fp}" in proc.stdout
    assert "was not found among" in proc.stdout and "use --policy FILE" in proc.stdout


def test_explain_json_and_unknown_ids(scene: Scene) -> None:
    proc = denials("explain", scene.ids["tampered"], "--log-dir", str(scene.log),
                   "--policy", str(scene.policy), "--json")
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["record"]["id"] == scene.ids["tampered"]
    assert obj["record"]["reason"] == "bad-signature" and obj["decision"] == "deny"
    assert obj["verify"]["expected_exit"] == 1 and obj["verify"]["placeholders"] == []
    assert obj["verify"]["argv"][3:] == ["--key", str(scene.base / "k.pub")]
    assert obj["ausearch"].startswith("ausearch -m ANOM_EXEC -i")
    # options given before the verb apply too
    before = denials("--log-dir", str(scene.log), "explain", scene.ids["tampered"])
    assert before.returncode == 0, before.stderr
    missing = denials("explain", "0000000000000000000", "--log-dir", str(scene.log))
    assert missing.returncode == 1 and "no record" in missing.stderr


def test_printed_ausearch_command_finds_the_audit_record(tmp_path: Path) -> None:
    sc_dir = tmp_path / "s"
    sc_dir.mkdir()
    sc = build_scene(sc_dir)
    log2 = tmp_path / "log2"
    with auditd_running() as auditd:
        rec = Recorder(RecorderConfig(str(log2), audit="auto"))
        rec.start()
        try:
            rid = rec.decision(sc.decisions["unsigned"])
        finally:
            rec.close(10)
        assert rec.stats()["audit"]["written"] == 1, rec.stats()
        wait_in_log(auditd.log_file, f"decision_id={rid}")
        proc = denials("explain", rid, "--log-dir", str(log2), "--policy", str(sc.policy))
        line = proc.stdout.splitlines()
        cmd = line[line.index("Audit record:") + 1].strip()
        assert cmd.startswith("ausearch -m ANOM_EXEC -i | grep")
        # the test's auditd may log to a private file: point ausearch at it
        cmd = cmd.replace("ausearch ", f"ausearch -if {shlex.quote(auditd.log_file)} ", 1)
        found = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, (cmd, found.stderr)
    assert f"decision_id={rid}" in found.stdout and "reason=no-signature" in found.stdout
    assert len(found.stdout.strip().splitlines()) == 1


def test_log_and_policy_come_from_the_running_agent(scene: Scene, tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = ControlServer(str(state / "control.sock"), lambda req: {
        "state": "ready", "log_dir": str(scene.log),
        "policy": {"version": 3, "digest": "x", "source": str(scene.policy)}})
    server.start()
    try:
        proc = denials("explain", scene.ids["unsigned"], "--state-dir", str(state))
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert f"reading {scene.log} (from the running agent on {state}/control.sock)" in proc.stderr
    assert verify_line(proc.stdout)[3:] == ["--key", str(scene.base / "k.pub")]
    assert f"trust taken from the policy that decided: {scene.policy}" in proc.stdout
