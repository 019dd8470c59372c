"""Policy on Go binaries whose build info is gone: real binaries from tests/policy_fixtures
with the build-info magic zeroed (or the blob broken), real OpenSSL signatures, the real
decider. ``match.go = true`` covers them, Go predicates fail closed with a clear detail,
the decision record says how Go-ness was established, and replay (whatif) reads it back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from agent.cache import TrustedCache, identity_from_stat
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent
from agent.digest import Artifact
from agent.errors import Reason
from agent.policy import PolicyStore, decide, parse_policy, subject_of
from agent.policy.model import PolicySnapshot
from agent.record.decision_log import from_json, to_json
from agent.review.whatif import recorded_subject
from tests import goinfo_fixtures as fx
from tests.policy_fixtures import Material, material_fixture, sign, verifier  # noqa: F401

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def policy(material: Material, tmp_path: Path, rules: List[Dict[str, Any]]) -> PolicySnapshot:
    doc = {"version": 1, "mode": "enforce", "scopes": [str(tmp_path)],
           "state_dir": str(tmp_path / "state"), "log_dir": str(tmp_path / "log"),
           "trust": {"keys": [str(material.keys["a"])]}, "rules": rules}
    return parse_policy(json.dumps(doc).encode(), "p.json")


def zeroed(material: Material, tmp_path: Path, name: str = "app", signed: bool = True
           ) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = fx.zero_buildinfo_magic(material.bins[name].path, tmp_path / f"{name}-zeroed")
    if signed:
        sign(path, material.private["a"])
    return path


def broken(material: Material, tmp_path: Path) -> Path:
    """Build info present, its module-info framing destroyed: Go reports the version alone,
    so do we (no module information, said so)."""
    data = bytearray(material.bins["app"].path.read_bytes())
    blob = data.index(fx.BUILDINFO_MAGIC)  # the rodata holds another copy: not that one
    at = data.index(bytes.fromhex("3077af0c9274080241e1c107e6d618e6"), blob)
    data[at : at + 4] = b"XXXX"
    path = tmp_path / "app-broken"
    path.write_bytes(bytes(data))
    path.chmod(0o755)
    sign(path, material.private["a"])
    return path


def malformed(material: Material, tmp_path: Path) -> Path:
    """Build info present and unreadable (its Go version's length overflows): malformed."""
    data = bytearray(material.bins["app"].path.read_bytes())
    blob = data.index(fx.BUILDINFO_MAGIC)
    data[blob + 32: blob + 42] = b"\xff" * 10  # the version's varint length: past 64 bits
    path = tmp_path / "app-malformed"
    path.write_bytes(bytes(data))
    path.chmod(0o755)
    sign(path, material.private["a"])
    return path


def subject_for(path: Path):  # type: ignore[no-untyped-def]
    with Artifact.open(str(path)) as art:
        return subject_of(art, 0)


def test_go_true_matches_a_go_binary_without_build_info(material: Material,
                                                        tmp_path: Path) -> None:
    path = zeroed(material, tmp_path)
    subject = subject_for(path)
    assert subject.go and subject.buildinfo is None and subject.go_evidence == "runtime"
    assert subject.go_runtime is not None and "pclntab" in subject.go_runtime
    snap = policy(material, tmp_path, [
        {"id": "by-module", "action": "deny", "match": {"module": "example.com/*"}},
        {"id": "not-go", "action": "deny", "match": {"go": False}},
        {"id": "go", "action": "require-signature", "match": {"go": True}}])
    out = decide(snap, subject, verifier(path))
    # no module known (no build info), not "not Go": the Go rule decides, and the
    # signature over the file's bytes is all it asks
    assert (out.allow, out.rule_id, out.reason) == (True, "go", Reason.OK)
    unsigned = zeroed(material, tmp_path / "u", signed=False)
    out = decide(snap, subject_for(unsigned), verifier(unsigned))
    assert (out.allow, out.rule_id, out.reason) == (False, "go", Reason.NO_SIGNATURE)


@pytest.mark.parametrize("predicate, needs, intact_passes", [
    ({"min_version": "1.18"}, "Go >= 1.18", True),
    ({"deny_vcs_modified": True}, "vcs.modified is not true", True),
    ({"require_trimpath": True}, "-trimpath=true", False),  # app is not built so
    ({"deny_modules": [{"path": "golang.org/x/net", "below": "v0.23.0"}]},
     "no golang.org/x/net", True),
    ({"module_signers": [{"module": "example.com/*", "keys": ["KEY"]}]}, "example.com/*",
     True),
])
def test_go_predicates_fail_closed_without_build_info(material: Material, tmp_path: Path,
                                                      predicate: Dict[str, Any], needs: str,
                                                      intact_passes: bool) -> None:
    go = json.loads(json.dumps(predicate).replace('"KEY"', json.dumps(
        str(material.keys["a"]))))
    snap = policy(material, tmp_path, [
        {"id": "go", "action": "require-signature", "match": {"go": True}, "go": go}])
    original = tmp_path / "orig"
    original.mkdir()
    intact = original / "app"
    intact.write_bytes(material.bins["app"].path.read_bytes())
    sign(intact, material.private["a"])
    path = zeroed(material, tmp_path)
    out = decide(snap, subject_for(path), verifier(path))
    assert (out.allow, out.reason) == (False, Reason.GO_PREDICATE), out.detail
    assert out.detail.startswith(f"cannot check {needs}")
    assert "this Go binary has no readable Go build info" in out.detail
    assert "no Go build info" in out.detail and out.verdict is not None and out.verdict.trusted
    # module info Go would drop (broken framing): the version is still known, so only the
    # predicates on modules and settings fail closed
    path = broken(material, tmp_path)
    out = decide(snap, subject_for(path), verifier(path))
    if "min_version" in predicate:
        assert out.allow, out.detail
    else:
        assert (out.allow, out.reason) == (False, Reason.GO_PREDICATE), out.detail
        assert out.detail.startswith(f"cannot check {needs}")
        assert out.detail.endswith(": this Go binary has no module information (module "
                                   "info framing is broken)"), out.detail
    # the same signed program with its build info intact: judged on the build info
    assert decide(snap, subject_for(intact), verifier(intact)).allow is intact_passes


def _decider(snap: PolicySnapshot, tmp_path: Path) -> Decider:
    return Decider(PolicyStore(snap), TrustedCache(str(tmp_path / "cache.msgpack"), "x"))


def _decide(decider: Decider, path: Path) -> Decision:
    fd = os.open(path, os.O_RDONLY)
    try:
        event = ExecEvent(os.getpid(), os.getppid(), 0, 0, "t", str(path),
                          identity_from_stat(os.fstat(fd)), time.time_ns(), "test")
        return decider.decide(event, fd, Enforcement.FANOTIFY_DENY)
    finally:
        os.close(fd)


def test_decision_records_say_how_go_ness_was_established(material: Material,
                                                          tmp_path: Path) -> None:
    snap = policy(material, tmp_path, [
        {"id": "go", "action": "require-signature", "match": {"go": True},
         "go": {"min_version": "1.18"}},
        {"id": "rest", "action": "allow"}])
    decider = _decider(snap, tmp_path)
    intact = tmp_path / "intact"
    intact.write_bytes(material.bins["app"].path.read_bytes())
    sign(intact, material.private["a"])
    cases = {
        "build-info": intact,
        "runtime": zeroed(material, tmp_path),
        "malformed": malformed(material, tmp_path),
    }
    for evidence, path in cases.items():
        d = _decide(decider, path)
        assert d.go is not None and d.go["evidence"] == evidence, d.go
        logged = from_json(json.loads(json.dumps(to_json("0" * 19, d))), "log", 1)
        assert logged.decision.go == d.go
        replay = recorded_subject(logged.decision).subject
        assert replay is not None and replay.go
        if evidence == "build-info":
            assert d.allow and d.go["module"] == "example.com/app"
            continue
        assert not d.allow and d.reason is Reason.GO_PREDICATE
        assert d.go["go_version"] is None and replay.buildinfo is None
        assert d.go.get("malformed", False) is (evidence == "malformed")
    # module info Go drops: build info, the version judged, the absence on record
    d = _decide(decider, broken(material, tmp_path))
    assert d.allow and d.go is not None and d.go["evidence"] == "build-info", d.go
    assert d.go["no_module_info"] == "module info framing is broken" and d.go["module"] is None
    logged = from_json(json.loads(json.dumps(to_json("0" * 19, d))), "log", 1)
    replay = recorded_subject(logged.decision).subject
    assert replay is not None and replay.buildinfo is not None
    assert replay.buildinfo.no_module_info == "module info framing is broken"
    runtime = _decide(decider, cases["runtime"]).go
    assert runtime is not None and "no Go build info" in runtime["detail"]
    assert "pclntab" in runtime["runtime"] and "moduledata at" in runtime["runtime"]
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    d = _decide(decider, script)
    assert d.allow and d.go is None and d.rule_id == "rest"


def test_verify_json_reports_runtime_evidence(material: Material, tmp_path: Path) -> None:
    path = zeroed(material, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "agent", "verify", str(path), "--key",
                           str(material.keys["a"]), "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    go = json.loads(proc.stdout)["go"]
    assert (go["is_go"], go["evidence"], go["go_version"]) == (True, "runtime", None)
    assert go["runtime"]["formats"] == "go1.18-1.19" and go["runtime"]["moduledata"]


def test_a_signed_go_build_without_modules_is_judged_on_its_version(
        material: Material, tmp_path: Path, old_debian_bins: Dict[str, Path]) -> None:
    """Debian bullseye's fzf (go1.15, GOPATH mode: no module list), signed by a trusted key:
    a Go version predicate admits it (it was denied as malformed build info before);
    predicates on modules cannot be checked, so they fail closed, saying why."""
    path = tmp_path / "fzf"
    path.write_bytes(old_debian_bins["fzf"].read_bytes())
    path.chmod(0o755)
    sign(path, material.private["a"])
    subject = subject_for(path)
    assert subject.go and subject.buildinfo is not None
    assert subject.buildinfo.go_version == "go1.15.9"
    versioned = policy(material, tmp_path, [
        {"id": "go", "action": "require-signature", "match": {"go": True},
         "go": {"min_version": "1.15"}}])
    out = decide(versioned, subject, verifier(path))
    assert out.allow and out.rule_id == "go", out.detail
    banned = policy(material, tmp_path, [
        {"id": "go", "action": "require-signature", "match": {"go": True},
         "go": {"deny_modules": [{"path": "golang.org/x/net", "below": "v0.23.0"}]}}])
    out = decide(banned, subject, verifier(path))
    assert (out.allow, out.reason) == (False, Reason.GO_PREDICATE), out.detail
    assert "has no module information (a zero (.bss) runtime.modinfo: built without " \
           "modules)" in out.detail
