"""`execguard run --backend audit-only` in the test VM: where the BCC exec sensor loads (none,
integrity) audit-only uses it; under confidentiality the kernel refuses it (it reads task
and inode fields with bpf_probe_read_kernel), and audit-only falls back to fanotify
notification events, which need no BPF at all. Either way nothing is blocked and every exec
in scope is decided and recorded.

One agent per run, scoped to a tmpfs the test owns; execs have deadlines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs
from tests.policy_fixtures import Material, copy_signed
from tests.vm.guest_env import at_least

pytestmark = pytest.mark.timeout(300)
EXECS_EACH = 2


def test_audit_only_records_every_exec(tmp_path: Path, vm_material: Material,
                                       lockdown_mode: str) -> None:
    with scoped_tmpfs() as scope:
        signed = copy_signed(vm_material.bins["app"], scope / "ok", vm_material.private["a"])
        unsigned = copy_signed(vm_material.bins["app"], scope / "bad", None)
        script = scope / "script.sh"
        script.write_bytes(vm_material.script.read_bytes())
        script.chmod(0o755)
        with running_agent(tmp_path, "--backend", "audit-only", "--mode", "enforce",
                           "--scope", str(scope), "--key", str(vm_material.keys["a"]),
                           "--audit", "off", "--no-prewarm", ready_timeout=240,
                           expect_state=("degraded",)) as agent:
            status = agent.status()
            assert status["backend"] == "audit-only" and status["enforcement"] == "audit-only"
            skipped = {s["backend"]: s["why"] for s in status["skipped_backends"]}
            if at_least(lockdown_mode, "confidentiality"):
                # the BCC sensor first: refused by the verifier, then the fanotify fallback
                assert "bpf_probe_read_kernel" in skipped.get("audit-only", ""), skipped
                assert status["selftest"].startswith("audit-only via fanotify FAN_OPEN_EXEC "
                                                     "notifications"), status["selftest"]
            else:
                assert "audit-only" not in skipped, skipped  # the BCC sensor loaded
                assert "fanotify" not in status["selftest"], status["selftest"]
            for _ in range(EXECS_EACH):
                for app in (signed, unsigned):
                    ran = exec_file(app)
                    assert ran.returncode == 0 and ran.stdout == "app\n", ran  # never blocked
                ran = exec_file(script)
                assert ran.returncode == 0 and ran.stdout == "hi\n", ran
            for path in (signed, unsigned, script):
                found = agent.wait_decision(str(path), EXECS_EACH, timeout=60)
                assert len(found) == EXECS_EACH, found  # one record per exec, no more
                assert all(d["event"]["path"] == str(path) for d in found)
            bad = agent.wait_decision(str(unsigned), EXECS_EACH)
            assert all(d["decision"] == "deny" and d["enforcement"] == "audit-only"
                       and d["reason"] == "no-signature" for d in bad), bad
            good = agent.wait_decision(str(signed), EXECS_EACH)
            assert all(d["decision"] == "allow" for d in good), good
