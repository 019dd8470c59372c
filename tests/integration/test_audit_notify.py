"""audit-only without BCC (CentOS 7, lockdown=confidentiality): fanotify notification events
feed the decider; nothing is blocked and each exec in scope is decided and recorded."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import List

import pytest

from agent.backends import NotifyAuditRunner, make_runners
from agent.cache import TrustedCache
from agent.decide import Decider
from agent.decision import Decision, Enforcement
from agent.errors import Reason
from agent.policy import PolicyStore, apply_overrides, default_policy
from tests.agent_fixtures import scoped_tmpfs
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def test_audit_only_falls_back_to_fanotify_notifications(tmp_path: Path,
                                                         material: Material) -> None:
    runners = make_runners("audit-only", None, lambda d: None)  # type: ignore[arg-type]
    assert [type(r).__name__ for r in runners] == ["SensorRunner", "NotifyAuditRunner"]
    with scoped_tmpfs() as scope:
        signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
        unsigned = copy_signed(material.bins["app"], scope / "bad", None)
        snap = apply_overrides(default_policy(), mode="enforce", scopes=(str(scope),),
                               keys=(str(material.keys["a"]),),
                               state_dir=str(tmp_path / "s"), log_dir=str(tmp_path / "l"))
        decider = Decider(PolicyStore(snap), TrustedCache(str(tmp_path / "c"), "x"))
        seen: List[Decision] = []
        lock = threading.Lock()

        def record(d: Decision) -> None:
            with lock:
                seen.append(d)

        runner = NotifyAuditRunner(decider, record)
        result = runner.selftest()
        assert result.ok, result.detail
        runner.start()
        try:
            for path in (unsigned, signed):
                out = subprocess.run([str(path)], capture_output=True, text=True, timeout=20)
                assert out.returncode == 0 and out.stdout == "app\n"  # nothing is blocked
            deadline = time.monotonic() + 20
            while len(seen) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            runner.stop()
        by_path = {d.event.path: d for d in seen}
        bad, good = by_path[str(unsigned)], by_path[str(signed)]
        assert not bad.allow and bad.reason is Reason.NO_SIGNATURE
        assert bad.enforcement is Enforcement.AUDIT_ONLY
        assert good.allow and good.reason is Reason.OK
