"""The real agent (``execguard run``, fanotify-exec, enforce) scoped to a tmpfs the test owns,
against the evasion of issue 9 point 5: a Go binary whose build-info magic was overwritten.

Before, the default policy with ``--mode enforce`` counted it as "not Go" and let it run.
Now it is Go by its runtime tables: denied unsigned, run when signed, and its decision
record says how Go-ness was established. Programs that are not Go still run under the
default policy, which the agent warns about at start; the shipped enforce template requires
signatures on them too, and gets no such warning.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

import pytest

from tests import goinfo_fixtures as fx
from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs, wait_for
from tests.policy_fixtures import Material, material_fixture, sign  # noqa: F401

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
HOLE = "rules[1] (id not-go): enforce mode, but this allow rule lets executables that are " \
    "not Go run without a signature"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    dst.chmod(0o755)
    return dst


def test_default_policy_enforce_denies_a_go_binary_with_zeroed_build_info(
        tmp_path: Path, go_bins: Dict[str, Path], c_bins: Dict[str, Path],
        material: Material) -> None:
    with scoped_tmpfs("64m") as scope:
        evil = fx.zero_buildinfo_magic(go_bins["hello"], scope / "evil")
        signed = fx.zero_buildinfo_magic(material.bins["app"].path, scope / "signed-app")
        sign(signed, material.private["a"])
        plain = _copy(go_bins["hello"], scope / "plain-go")
        cprog = _copy(c_bins["c-dynamic"], scope / "cprog")
        script = scope / "hi.sh"
        script.write_text("#!/bin/sh\necho script ran\n")
        script.chmod(0o755)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope),
                           "--key", str(material.keys["a"]), "--backend", "fanotify-exec",
                           "--no-prewarm") as agent:
            assert agent.status()["enforcement"] == "fanotify-deny"
            # the start-up warning: on the console and in status, naming the rule
            wait_for(lambda: HOLE in agent.output.read_text())
            assert f"execguard: WARNING: line 29: {HOLE}" in agent.output.read_text()
            assert any(HOLE in w for w in agent.status()["warnings"])

            denied = exec_file(evil)
            assert denied.returncode == 126 and "Operation not permitted" in denied.stderr
            rec = agent.wait_decision(str(evil))[-1]
            assert (rec["decision"], rec["reason"], rec["rule_id"], rec["enforcement"]) == (
                "deny", "no-signature", "go-signed", "fanotify-deny")
            go = rec["go"]
            assert (go["evidence"], go["go_version"]) == ("runtime", None)
            assert "no Go build info" in go["detail"]
            assert "Go runtime pclntab (go1.18-1.19" in go["runtime"]
            assert "moduledata at" in go["runtime"]

            # signed, the same kind of file runs: it is judged by its signature
            ran = exec_file(signed)
            assert ran.returncode == 0 and ran.stdout == "app\n", ran.stderr
            rec = agent.wait_decision(str(signed))[-1]
            assert (rec["decision"], rec["rule_id"], rec["go"]["evidence"]) == (
                "allow", "go-signed", "runtime")

            assert exec_file(plain).returncode == 126
            rec = agent.wait_decision(str(plain))[-1]
            assert (rec["decision"], rec["go"]["evidence"]) == ("deny", "build-info")

            # not Go: the default policy still lets it run (the warning above says so)
            for path, says in ((cprog, "c says hi\n"), (script, "script ran\n")):
                ran = exec_file(path)
                assert ran.returncode == 0 and ran.stdout == says, ran.stderr
                rec = agent.wait_decision(str(path))[-1]
                assert (rec["decision"], rec["rule_id"], rec["go"]) == ("allow", "not-go", None)


def test_enforce_template_requires_signatures_on_everything(
        tmp_path: Path, c_bins: Dict[str, Path], material: Material) -> None:
    with scoped_tmpfs("16m") as scope:
        unsigned = _copy(c_bins["c-dynamic"], scope / "cprog")
        signed = _copy(c_bins["c-dynamic"], scope / "cprog-signed")
        sign(signed, material.private["a"])
        with running_agent(tmp_path, "--policy", str(REPO / "packaging/policy-enforce.toml"),
                           "--scope", str(scope), "--key", str(material.keys["a"]),
                           "--backend", "fanotify-exec", "--no-prewarm") as agent:
            assert exec_file(unsigned).returncode == 126
            rec = agent.wait_decision(str(unsigned))[-1]
            assert (rec["decision"], rec["reason"], rec["rule_id"], rec["go"]) == (
                "deny", "no-signature", "signed", None)
            ran = exec_file(signed)
            assert ran.returncode == 0 and ran.stdout == "c says hi\n"
            assert agent.wait_decision(str(signed))[-1]["rule_id"] == "signed"
            assert not [w for w in agent.status()["warnings"] if "without a signature" in w]
            assert "without a signature" not in agent.output.read_text()
