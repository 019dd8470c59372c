"""The decider: scope, cache, verifier and policy together, on real signed Go binaries."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Tuple

import pytest

from agent.cache import TrustedCache, identity_from_stat
from agent.decide import Decider
from agent.decision import Enforcement, ExecEvent, Source
from agent.errors import Reason
from agent.policy import PolicyStore, apply_overrides, default_policy
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401


def make(tmp_path: Path, material: Material, mode: str) -> Tuple[Decider, Path]:
    scope = tmp_path / "scope"
    scope.mkdir(parents=True)
    snap = apply_overrides(default_policy(), mode=mode, scopes=(str(scope),),
                           keys=(str(material.keys["a"]),), state_dir=str(tmp_path / "state"),
                           log_dir=str(tmp_path / "log"))
    cache = TrustedCache(str(tmp_path / "cache.msgpack"), "unused")
    return Decider(PolicyStore(snap), cache), scope


def event_for(path: Path) -> Tuple[ExecEvent, int]:
    fd = os.open(path, os.O_RDONLY)
    ident = identity_from_stat(os.fstat(fd))
    return ExecEvent(os.getpid(), os.getppid(), 0, 0, "test", str(path), ident,
                     time.time_ns(), "test"), fd


def run(decider: Decider, path: Path, enforcement: Enforcement = Enforcement.FANOTIFY_DENY):
    event, fd = event_for(path)
    try:
        return decider.decide(event, fd, enforcement)
    finally:
        os.close(fd)


def test_signed_allowed_then_cache_hit(tmp_path: Path, material: Material) -> None:
    decider, scope = make(tmp_path, material, "enforce")
    binary = copy_signed(material.bins["app"], scope, material.private["a"])
    first = run(decider, binary)
    assert first.allow and first.reason is Reason.OK and first.source is Source.VERIFY
    assert first.evidence is not None and first.evidence.key_fingerprint
    assert first.go is not None and first.go["module"] == "example.com/app"
    second = run(decider, binary)
    assert second.allow and second.source is Source.CACHE
    assert decider.cache.stats().hits == 1


def test_unsigned_denied_in_enforce_and_reported_in_monitor(tmp_path: Path,
                                                            material: Material) -> None:
    decider, scope = make(tmp_path, material, "enforce")
    binary = copy_signed(material.bins["app"], scope, None)
    d = run(decider, binary)
    assert not d.allow and d.reason is Reason.NO_SIGNATURE
    assert d.enforcement is Enforcement.FANOTIFY_DENY and d.rule_id == "go-signed"
    monitor, scope2 = make(tmp_path / "m", material, "monitor")
    d2 = run(monitor, copy_signed(material.bins["app"], scope2, None))
    assert not d2.allow and d2.enforcement is Enforcement.MONITOR


def test_tampered_after_verification_is_reverified_and_denied(tmp_path: Path,
                                                              material: Material) -> None:
    decider, scope = make(tmp_path, material, "enforce")
    binary = copy_signed(material.bins["app"], scope, material.private["a"])
    assert run(decider, binary).allow
    with open(binary, "ab") as fh:
        fh.write(b"\0")
    d = run(decider, binary)
    assert not d.allow and d.reason is Reason.BAD_SIGNATURE and d.source is Source.VERIFY


def test_outside_scope_is_allowed_without_verification(tmp_path: Path,
                                                       material: Material) -> None:
    decider, _scope = make(tmp_path, material, "enforce")
    outside = copy_signed(material.bins["app"], tmp_path / "elsewhere", None)
    d = run(decider, outside)
    assert d.allow and d.enforcement is Enforcement.NONE and d.sha256 is None


def test_non_go_file_allowed_by_the_default_rules(tmp_path: Path, material: Material) -> None:
    decider, scope = make(tmp_path, material, "enforce")
    script = scope / "s.sh"
    script.write_bytes(material.script.read_bytes())
    d = run(decider, script)
    assert d.allow and d.rule_id == "not-go" and d.go is None


def test_stats_count_outcomes_and_latency(tmp_path: Path, material: Material) -> None:
    decider, scope = make(tmp_path, material, "enforce")
    run(decider, copy_signed(material.bins["app"], scope, None))
    stats = decider.stats.to_json()
    assert stats["decisions"] == {"deny": 1}
    assert stats["latency_us"]["samples"] == 1


def test_policy_reload_rebinds_the_cache(tmp_path: Path, material: Material) -> None:
    decider, scope = make(tmp_path, material, "enforce")
    binary = copy_signed(material.bins["app"], scope, material.private["a"])
    assert run(decider, binary).allow
    assert run(decider, binary).source is Source.CACHE
    old = decider.store.current.snapshot
    rebinds = decider.cache.stats().rebinds
    # the new policy trusts key b only: the cached allow (by key a) must not survive
    decider.store.reload(lambda: apply_overrides(old, keys=(str(material.keys["b"]),)))
    d = run(decider, binary)
    assert not d.allow and d.source is Source.VERIFY
    assert decider.cache.stats().rebinds == rebinds + 1


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def test_out_of_fds_is_an_io_error_never_a_cached_verdict(tmp_path: Path, material: Material,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A signature file that cannot be opened for want of fds (EMFILE) says nothing about
    the file: the decision fails as an I/O error and nothing is cached, so the signed file
    runs as soon as fds are back (issue 9: no grudge from an fd shortage)."""
    import errno

    from agent.verify import discovery

    decider, scope = make(tmp_path, material, "enforce")
    binary = copy_signed(material.bins["app"], scope, material.private["a"])
    real_open = os.open

    def no_fds(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".sig"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(discovery.os, "open", no_fds)
    d = run(decider, binary)
    assert not d.allow and d.reason is Reason.VERIFY_FAILED
    assert "short of resources" in d.detail
    assert decider.cache.stats().entries == 0
    monkeypatch.setattr(discovery.os, "open", real_open)
    assert run(decider, binary).allow


def test_a_file_placed_in_scope_under_another_namespaces_path_is_judged(
        tmp_path: Path, material: Material) -> None:
    """A file the caller placed in scope whose rules path is one another namespace chose
    (``Placement.judged_path``: under UNPLACED, matched by no scope glob) is judged as
    everywhere-scoped, never allowed as "outside the policy's scopes" (the way
    ``proc-root-other-ns`` ran on fanotify-exec and kill when only ``event.path`` was
    looked at)."""
    import dataclasses

    from agent.scope.live import UNPLACED

    decider, scope = make(tmp_path, material, "enforce")
    binary = copy_signed(material.bins["app"], scope, None)
    event, fd = event_for(binary)
    try:
        event = dataclasses.replace(event, rules_path=UNPLACED + "/proc/1/root" + str(binary))
        d = decider.decide(event, fd, Enforcement.FANOTIFY_DENY, in_scope=True)
    finally:
        os.close(fd)
    assert not d.allow and d.reason is Reason.NO_SIGNATURE
