"""A bundle's policy swapped into a live Decider: the trusted cache is rebound to the new
policy, so verdicts cached under the old one are re-evaluated (real keys, signatures and Go
binaries; the same swap ``Agent.install_policy`` does)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent.cache import TrustedCache, identity_from_stat
from agent.decide import Decider
from agent.decision import Decision, Enforcement, ExecEvent, Source
from agent.errors import Reason
from agent.policy import PolicySnapshot, PolicyStore
from agent.policy.bundle import build_bundle, bundle_snapshot
from tests.policy_bundle_fixtures import write_policy
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def snapshot(tmp: Path, version: int, scope: Path, key: Path) -> PolicySnapshot:
    policy = write_policy(tmp / f"v{version}.toml", version, scope, key)
    _, bundle, _ = build_bundle(str(policy), None, NOW, NOW + timedelta(days=1))
    return bundle_snapshot(bundle, f"v{version}.bundle", str(tmp / "state"), str(tmp / "log"))


def decide(decider: Decider, path: Path) -> Decision:
    fd = os.open(path, os.O_RDONLY)
    try:
        event = ExecEvent(os.getpid(), os.getppid(), 0, 0, "test", str(path),
                          identity_from_stat(os.fstat(fd)), time.time_ns(), "test")
        return decider.decide(event, fd, Enforcement.FANOTIFY_DENY)
    finally:
        os.close(fd)


def test_a_new_bundle_rebinds_the_cache_and_old_verdicts_are_re_evaluated(
        tmp_path: Path, material: Material) -> None:
    scope = tmp_path / "scope"
    scope.mkdir()
    binary = copy_signed(material.bins["app"], scope, material.private["a"])
    v1 = snapshot(tmp_path, 1, scope, material.keys["a"])
    decider = Decider(PolicyStore(v1), TrustedCache(str(tmp_path / "cache"), "unused"))
    assert decide(decider, binary).source is Source.VERIFY
    cached = decide(decider, binary)
    assert cached.allow and cached.source is Source.CACHE and cached.policy_version == 1

    # same trust, new version: the verdict is verified again under v2, then cached again
    decider.store.reload(lambda: snapshot(tmp_path, 2, scope, material.keys["a"]))
    again = decide(decider, binary)
    assert again.allow and again.source is Source.VERIFY and again.policy_version == 2
    assert decider.cache.stats().rebinds >= 1
    assert decide(decider, binary).source is Source.CACHE

    # the key is no longer trusted: the cached allow must not survive the swap
    decider.store.reload(lambda: snapshot(tmp_path, 3, scope, material.keys["b"]))
    revoked = decide(decider, binary)
    assert not revoked.allow and revoked.reason is Reason.BAD_SIGNATURE, revoked
    assert revoked.policy_version == 3 and revoked.source is Source.VERIFY
