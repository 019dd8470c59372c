"""`execguard run --backend kill` in enforce mode: the exec boundary as the agent holds it.

One agent for the module, scoped to a tmpfs the test owns, trusting a test key only. What it
kills: ld.so run as a program, an mmap(PROT_EXEC) of an unsigned file by a small loader, an
LD_PRELOAD of an unsigned library into a signed program, a memfd exec, an exec from a tmpfs
mounted inside the scope after the start, through a bind mount of the scope elsewhere,
through ``unshare -m`` and through an overlay whose lower layer is the scope. What it leaves
alone: signed programs, programs out of scope, a signed dynamic program whose libraries are
out of scope, and (once verified) a signed library deployed while it runs.

SAFETY: an enforcing kill agent puts every filesystem it has not classified in scope (the
policy default), so a brand-new mount elsewhere on the host is in scope until the mount
watcher classifies it (milliseconds), and mounts of other namespaces stay so. The agent
runs only for this module (well under a minute), every exec has a deadline, every mount is
undone and the agent stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from tests.agent_fixtures import RunningAgent, running_agent, scoped_tmpfs, wait_for
from tests.attacks.harness import (
    LDSO,
    Outcome,
    Result,
    mounted,
    run_attack,
    run_until_not_killed,
)
from tests.kill_fixtures import build_tools, keypair, place, scope_policy
from tests.policy_fixtures import sign

pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True)
class Stage:
    agent: RunningAgent
    scope: Path
    work: Path  # outside the scope, on the root filesystem
    tools: Dict[str, Path]
    private_key: Path


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="eg-kill-work-"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], timeout=30)


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    base = tmp_path_factory.mktemp("kill-boundary")
    tools = build_tools(base)
    private, public = keypair(base)
    with scoped_tmpfs("64m") as scope, work_dir() as work:
        # before the agent starts, so its pre-scan writes their verdicts into the kernel
        for name in ("benign-dyn",):
            sign(place(tools[name], scope / "signed" / name), private)
        for name in ("payload-dyn", "payload-static", "preload.so"):
            place(tools[name], scope / "unsigned" / name)
        (scope / "mnt").mkdir()
        (scope / "late").mkdir()
        time.sleep(0.05)  # settled (agent/decide.py SETTLE_NS), as a deployed file is
        policy = scope_policy(base / "policy.toml", scope, public)
        with running_agent(base, "--policy", str(policy), "--backend", "kill",
                           "--audit", "off") as agent:
            status = agent.status()
            assert status["backend"] == "kill", status
            wait_for(lambda: agent.status()["prewarm"]["scan_done"], 30)
            yield Stage(agent, scope, work, tools, private)


def decisions_for(agent: RunningAgent, pred: Any, count: int = 1, timeout: float = 15.0
                  ) -> List[Dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found: List[Dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = [d for d in agent.decisions() if pred(d)]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no decision matched; last decisions: {agent.decisions()[-5:]}")


def assert_result(outcome: Outcome, want: Result) -> None:
    assert outcome.result is want, str(outcome)


def test_the_kernel_judges_the_scope_it_was_given(stage: Stage) -> None:
    status = stage.agent.status()
    sensor = status["sensor"]
    assert status["enforcement"] == "post-exec-kill"
    assert "mapping of a denied file killed" in status["selftest"], status["selftest"]
    assert sensor["kernel_judges"] == "every file in scope" and sensor["mapping_hook"] == "on"
    guards = sensor["scope"]["guards"]
    assert guards["loader"] and guards["maps"] and not guards["unseen_out"], guards
    assert sensor["scope"]["loaders"] >= 1


def test_signed_programs_and_programs_out_of_scope_run(stage: Stage) -> None:
    signed = stage.scope / "signed" / "benign-dyn"  # dynamic: its libraries are out of scope
    ran = run_attack([str(signed)])
    assert ran.returncode == 0 and "EG-BENIGN" in ran.stdout, ran
    outside = place(stage.tools["payload-dyn"], stage.work / "payload-dyn")  # unsigned
    assert_result(run_attack([str(outside)]), Result.RAN)
    assert subprocess.run(["/bin/true"], timeout=10).returncode == 0


def test_unsigned_program_in_scope_is_killed(stage: Stage) -> None:
    path = stage.scope / "unsigned" / "payload-static"
    assert_result(run_attack([str(path)]), Result.KILLED)
    rec = stage.agent.wait_decision(str(path))[-1]
    assert (rec["decision"], rec["enforcement"]) == ("deny", "post-exec-kill"), rec


def test_ldso_run_as_a_program_is_killed(stage: Stage) -> None:
    payload = stage.scope / "unsigned" / "payload-dyn"
    assert_result(run_attack([LDSO, str(payload)]), Result.KILLED)
    rec = decisions_for(stage.agent, lambda d: d["reason"] == "loader-exec")[-1]
    assert (rec["decision"], rec["enforcement"]) == ("deny", "post-exec-kill"), rec


def test_a_loader_mapping_an_unsigned_file_is_killed(stage: Stage) -> None:
    """Written after the agent started (fresh): killed at the mmap, before a byte of it
    runs; the record names the file through the scope's mount."""
    blob = place(stage.tools["blob.bin"], stage.scope / "late" / "blob.bin")
    assert_result(run_attack([str(stage.tools["loader"]), "mmap", str(blob)]), Result.KILLED)
    rec = decisions_for(stage.agent, lambda d: d["event"]["path"] == str(blob)
                        and d.get("extra", {}).get("op") == "mmap")[-1]
    assert (rec["decision"], rec["enforcement"]) == ("deny", "post-exec-kill"), rec
    assert_result(run_attack([str(stage.tools["loader"]), "mmap", str(blob)]), Result.KILLED)


def test_ld_preload_of_an_unsigned_library_into_a_signed_program_is_killed(
        stage: Stage) -> None:
    """One written after the start (fresh) and one that was there before (the pre-scan
    wrote its denial, and with the whole scope verified no mapping without a verdict gets
    the benefit of the doubt): both are killed at their first mapping."""
    signed = stage.scope / "signed" / "benign-dyn"
    fresh = place(stage.tools["preload.so"], stage.scope / "late" / "preload.so")
    old = stage.scope / "unsigned" / "preload.so"
    for lib in (fresh, old):
        assert_result(run_attack([str(signed)], env={"LD_PRELOAD": str(lib)}), Result.KILLED)
        rec = decisions_for(stage.agent, lambda d, lib=lib: d["event"]["path"] == str(lib))[-1]
        assert rec["decision"] == "deny" and rec["extra"]["op"] == "mmap", rec


def test_a_signed_library_deployed_while_the_agent_runs_maps(stage: Stage) -> None:
    """Fresh, so a mapping without a verdict would be killed; the close-after-write watch
    (or the first killed mapping) verifies it, and from then on its mappings run."""
    signed = stage.scope / "signed" / "benign-dyn"
    lib = place(stage.tools["preload.so"], stage.scope / "late" / "signed.so")
    sign(lib, stage.private_key)
    outcome = run_until_not_killed([str(signed)], env={"LD_PRELOAD": str(lib)})
    assert_result(outcome, Result.RAN)  # the library's constructor is the "attacker" here
    assert_result(run_attack([str(signed)], env={"LD_PRELOAD": str(lib)}), Result.RAN)


def test_a_memfd_exec_is_killed(stage: Stage) -> None:
    for mode in ("fexecve", "procfd"):
        assert_result(run_attack([str(stage.tools["memfd-exec"]), mode,
                                  str(stage.tools["payload-static"])]), Result.KILLED)
    # no-path when the process was gone before the agent could open its file; no-signature
    # when /proc/PID/exe still opened (the memfd's bytes were verified and have no signature)
    recs = decisions_for(stage.agent, lambda d: d["event"]["path"].startswith("/memfd:")
                         or d["reason"] == "no-path", count=2)
    assert all((d["decision"], d["enforcement"]) == ("deny", "post-exec-kill")
               and d["reason"] in ("no-path", "no-signature") for d in recs), recs


def test_an_exec_from_a_tmpfs_mounted_inside_the_scope_later_is_killed(stage: Stage) -> None:
    """A filesystem that appears after the start: in scope while unseen, then classified IN
    (it is mounted inside the scope) and dynamic."""
    with mounted("-t", "tmpfs", "-o", "size=8m", "eg-kill-late", where=stage.scope / "mnt"):
        payload = place(stage.tools["payload-static"], stage.scope / "mnt" / "payload")
        assert_result(run_attack([str(payload)]), Result.KILLED)
        rec = stage.agent.wait_decision(str(payload))[-1]
        assert rec["decision"] == "deny", rec


def test_an_exec_through_a_bind_mount_of_the_scope_elsewhere_is_killed(stage: Stage) -> None:
    view = stage.work / "view"
    view.mkdir()
    with mounted("--bind", str(stage.scope), where=view):
        assert_result(run_attack([str(view / "unsigned" / "payload-static")]), Result.KILLED)
        signed = run_attack([str(view / "signed" / "benign-dyn")])
        assert signed.returncode == 0 and "EG-BENIGN" in signed.stdout, signed


def test_an_exec_through_an_overlay_over_the_scope_is_killed_every_time(
        stage: Stage) -> None:
    """The overlay's file has the overlay's device and a path outside every scope root:
    the overlay is in scope (a layer is), and the file is judged by the policy, never
    allowed as "outside every scope" (which would have put an allow for it in the kernel,
    so the second exec ran)."""
    away = stage.work / "overlay"
    for sub in ("upper", "work", "merged"):
        (away / sub).mkdir(parents=True)
    opts = (f"lowerdir={stage.scope / 'unsigned'},upperdir={away / 'upper'},"
            f"workdir={away / 'work'}")
    with mounted("-t", "overlay", "-o", opts, "eg-kill-ovl", where=away / "merged"):
        payload = away / "merged" / "payload-static"
        for _ in range(2):
            assert_result(run_attack([str(payload)]), Result.KILLED)
        rec = stage.agent.wait_decision(str(payload))[-1]
        assert (rec["decision"], rec["reason"]) == ("deny", "no-signature"), rec


def test_an_exec_from_another_mount_namespace_is_killed(stage: Stage) -> None:
    payload = stage.scope / "unsigned" / "payload-static"
    assert_result(run_attack(["unshare", "-m", str(payload)]), Result.KILLED)
    signed = run_attack(["unshare", "-m", str(stage.scope / "signed" / "benign-dyn")])
    assert signed.returncode == 0 and "EG-BENIGN" in signed.stdout, signed
