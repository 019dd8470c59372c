"""Review finding: a pre-warm verdict decided under the old policy reached the kernel verdict
map after a policy swap had emptied it, so a binary whose signer the new policy no longer
trusts ran without a decision (``remember`` wrote with the generation current at write
time, which made the swap guard of ``KernelVerdicts`` moot).

Real components: the kill backend's BCC exec sensor (kills only on a tmpfs this test owns
and scopes whole), the real decider and pre-warmer, a real signed Go binary. The swap is
put exactly into the race window by the pre-warmer's ``on_result`` callback, which swaps
(store reload, then the runner's policy hook, the order ``Agent.install_policy`` uses)
before handing the verdict on to the runner.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.backends.sensor import SensorRunner
from agent.cache import TrustedCache
from agent.decide import Decider
from agent.policy import PolicyStore, load_policy
from agent.prewarm import Prewarmer
from tests.agent_fixtures import scoped_tmpfs
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401
from tests.rearm_fixtures import write_policy

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def test_prewarm_verdict_from_a_swapped_out_policy_stays_out_of_the_kernel(
        tmp_path: Path, material: Material) -> None:
    with scoped_tmpfs("32m") as scope:
        signed = copy_signed(material.bins["app"], scope / "a", material.private["a"])
        old = load_policy(str(write_policy(tmp_path / "old.toml", mode="enforce",
                                           scopes=[scope], keys=[material.keys["a"]])))
        new = load_policy(str(write_policy(tmp_path / "new.toml", mode="enforce",
                                           scopes=[scope], keys=[material.keys["b"]])))
        store = PolicyStore(old)
        decider = Decider(store, TrustedCache(str(tmp_path / "cache"), "unbound"))
        runner = SensorRunner("kill", decider, lambda decision: None)

        def swap_then_remember(*result: Any) -> None:
            store.reload(lambda: new)
            runner.policy_changed(new)
            runner.remember(*result)

        try:
            runner.start()
            assert runner.enforcing()
            assert Prewarmer(decider, swap_then_remember).warm_path(str(signed)) is True
            # key a is not trusted any more: no verdict, killed. Run from a grandchild: the
            # runner lives in this process, which the kernel exempts with its children
            ran = subprocess.run(["/bin/sh", "-c", '"$0"; exit $?', str(signed)],
                                 capture_output=True, text=True, timeout=20)
            assert ran.returncode == 128 + signal.SIGKILL and ran.stdout == "", ran
        finally:
            runner.stop()
