"""A policy reload (SIGHUP) re-arms the kernel's view, on the backends this host runs
(fanotify-exec, kill; the BPF LSM and fmod_ret backends are tested in the VM,
tests/vm/test_lsm_reload.py). Real agent, real Go binaries and signatures, each agent on
tmpfs mounts the test owns, with deadlines; everything stops in ``finally``.

- fanotify-exec: a file allowed under the old policy holds an ignore mark; a new policy that
  no longer trusts its signer must deny it. New scopes move the marks.
- kill: the kernel verdict map held an allow for the file; after the reload it is killed,
  and a monitor -> enforce reload starts killing unsigned binaries.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs, wait_for
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401
from tests.rearm_fixtures import reload, write_policy

pytestmark = pytest.mark.timeout(240)
EPERM_RC = 126


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def test_fanotify_reload_revokes_allowed_files_and_moves_the_marks(
        tmp_path: Path, material: Material) -> None:
    with scoped_tmpfs("32m") as one, scoped_tmpfs("32m") as two:
        signed = copy_signed(material.bins["app"], one / "a", material.private["a"])
        unsigned_two = copy_signed(material.bins["app"], two / "u", None)
        policy = write_policy(tmp_path / "p.toml", mode="enforce", scopes=[one],
                              keys=[material.keys["a"]], deadline_ms=5000)
        with running_agent(tmp_path, "--policy", str(policy), "--backend", "fanotify-exec",
                           "--audit", "off", "--no-prewarm") as agent:
            assert exec_file(signed).returncode == 0  # allowed: now ignore-marked
            assert exec_file(signed).returncode == 0
            assert exec_file(unsigned_two).returncode == 0  # not in scope yet
            write_policy(policy, mode="enforce", scopes=[one], keys=[material.keys["b"]],
                         deadline_ms=5000)
            reload(agent)
            ran = exec_file(signed)  # its signer is no longer trusted: asked again, denied
            assert ran.returncode == EPERM_RC, ran
            write_policy(policy, mode="enforce", scopes=[two], keys=[material.keys["b"]],
                         deadline_ms=5000)
            status = reload(agent)
            assert status["sensor"]["policy_swaps"] == 2
            assert exec_file(signed).returncode == 0  # outside the new scope
            ran = exec_file(unsigned_two)
            assert ran.returncode == EPERM_RC, ran
            assert agent.wait_decision(str(unsigned_two))[-1]["decision"] == "deny"


def test_kill_reload_drops_kernel_verdicts_and_follows_the_mode(
        tmp_path: Path, material: Material) -> None:
    with scoped_tmpfs("32m") as scope:
        signed = copy_signed(material.bins["app"], scope / "a", material.private["a"])
        unsigned = copy_signed(material.bins["app"], scope / "u", None)
        policy = write_policy(tmp_path / "p.toml", mode="monitor", scopes=[scope],
                              keys=[material.keys["a"]])
        with running_agent(tmp_path, "--policy", str(policy), "--backend", "kill",
                           "--audit", "off", "--no-prewarm") as agent:
            assert exec_file(unsigned).returncode == 0  # monitor: recorded, not killed
            agent.wait_decision(str(unsigned))
            write_policy(policy, mode="enforce", scopes=[scope], keys=[material.keys["a"]])
            reload(agent)
            ran = exec_file(unsigned)
            assert ran.returncode == -9 and ran.stdout == "", ran  # killed before it printed
            # unknown at its first exec: killed, verified, then it runs on a kernel allow
            wait_for(lambda: exec_file(signed).returncode == 0, 30)
            assert exec_file(signed).returncode == 0
            write_policy(policy, mode="enforce", scopes=[scope], keys=[material.keys["b"]])
            status = reload(agent)
            assert status["sensor"]["verdicts_dropped"] >= 1, status["sensor"]
            ran = exec_file(signed)
            assert ran.returncode == -9 and ran.stdout == "", ran


def test_kill_with_a_caller_rule_judges_every_exec_in_user_space(
        tmp_path: Path, material: Material) -> None:
    """A rule on the caller's uid: the kernel map must not hold per-file allows (root's
    allow would let uid 65534 run the file unjudged). Every exec is decided by the agent,
    and the one the rule denies is recorded as denied (and killed, if it still runs)."""
    with scoped_tmpfs("32m") as scope:
        signed = copy_signed(material.bins["app"], scope / "a", material.private["a"])
        signed.parent.chmod(0o755)
        policy = write_policy(tmp_path / "p.toml", mode="enforce", scopes=[scope],
                              keys=[material.keys["a"]])
        text = policy.read_text()
        first = text.index("[[rules]]")
        policy.write_text(text[:first] + '[[rules]]\nid = "not-nobody"\naction = "deny"\n'
                          'match = { uids = [65534] }\n\n' + text[first:])
        with running_agent(tmp_path, "--policy", str(policy), "--backend", "kill",
                           "--audit", "off") as agent:
            for _ in range(3):
                ran = exec_file(signed)
                assert ran.returncode == 0 and ran.stdout == "app\n", ran
            subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            str(signed)], capture_output=True, timeout=20, check=False)

            def nobody_denied() -> bool:
                return any(d["event"]["uid"] == 65534 and d["decision"] == "deny"
                           and d["rule_id"] == "not-nobody"
                           for d in agent.decisions() if d["event"]["path"] == str(signed))

            wait_for(nobody_denied, 30)
            status = agent.status()
            assert status["sensor"]["kernel_hits"] == 0, status["sensor"]  # no per-file allow
            assert len([d for d in agent.decisions() if d["event"]["path"] == str(signed)
                        and d["event"]["uid"] == 0 and d["decision"] == "allow"]) == 3
