"""The trusted cache in memory: exact identity, binding, LRU bound, TTL, content index, stats."""

from __future__ import annotations

import dataclasses
import json
from typing import List

import pytest

from agent.cache import TrustedCache, binding_for
from agent.cache_wire import EVIDENCE_FIELDS, decode, encode
from agent.decision import FileIdentity
from agent.errors import Reason
from agent.verify.model import Evidence, Verdict
from tests.cache_fixtures import (
    BINDING,
    OTHER_BINDING,
    denied,
    evidence,
    fake_identity,
    rich_verdict,
    trusted,
)

SHA = "ab" * 32
SHA2 = "cd" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 10**18

    def __call__(self) -> int:
        return self.now


def cache(**kw: object) -> TrustedCache:
    return TrustedCache("/nonexistent/cache", BINDING, **kw)  # type: ignore[arg-type]


def test_exact_identity_hits_and_stats_count() -> None:
    c = cache()
    ident = fake_identity(1)
    assert c.lookup(ident) is None
    assert c.store(ident, SHA, trusted(), BINDING)
    hit = c.lookup(ident)
    assert hit is not None and hit.verdict.trusted and hit.sha256 == SHA
    s = c.stats()
    assert (s.hits, s.misses, s.entries) == (1, 1, 1)
    assert s.hit_rate == 0.5
    js = s.to_json()
    assert js["hit_rate"] == 0.5 and js["entries"] == 1 and js["corrupt_loads"] == 0
    json.dumps(js)


@pytest.mark.parametrize("changed", [
    dataclasses.replace(fake_identity(1), ctime_ns=1_001),  # chmod, write, utime
    dataclasses.replace(fake_identity(1), size=11),  # append, truncate
])
def test_changed_stamp_on_same_inode_misses_and_drops_the_stale_verdict(
        changed: FileIdentity) -> None:
    c = cache()
    c.store(fake_identity(1), SHA, trusted(), BINDING)
    assert c.lookup(changed) is None
    assert c.stats().stale == 1 and c.stats().entries == 0
    assert c.lookup(fake_identity(1)) is None  # gone, not merely shadowed


def test_other_device_same_inode_number_is_another_file() -> None:
    c = cache()
    c.store(fake_identity(1), SHA, trusted(), BINDING)
    assert c.lookup(dataclasses.replace(fake_identity(1), dev=2050)) is None


def test_verdict_produced_under_another_binding_is_refused() -> None:
    c = cache()
    assert not c.store(fake_identity(1), SHA, trusted(), OTHER_BINDING)
    assert c.lookup(fake_identity(1)) is None


def test_lookup_under_another_binding_misses() -> None:
    c = cache()
    c.store(fake_identity(1), SHA, trusted(), BINDING)
    assert c.lookup(fake_identity(1), binding=OTHER_BINDING) is None
    assert c.lookup_digest(SHA, binding=OTHER_BINDING) is None
    assert c.lookup(fake_identity(1), binding=BINDING) is not None


def test_policy_change_drops_every_verdict() -> None:
    c = cache()
    for n in range(5):
        c.store(fake_identity(n), SHA, trusted(), BINDING)
    assert c.rebind(OTHER_BINDING) == 5
    assert c.binding == OTHER_BINDING
    assert all(c.lookup(fake_identity(n)) is None for n in range(5))
    assert c.lookup_digest(SHA) is None
    # a verifier that started before the reload finishes now: its verdict is stale
    assert not c.store(fake_identity(1), SHA, trusted(), BINDING)
    assert c.rebind(OTHER_BINDING) == 0 and c.stats().rebinds == 1


def test_binding_depends_on_policy_trust_roots_and_agent_version() -> None:
    b = binding_for("sha256:p1", "sha256:t1")
    assert b == binding_for("sha256:p1", "sha256:t1") and len(b) == 64
    assert b != binding_for("sha256:p2", "sha256:t1")
    assert b != binding_for("sha256:p1", "sha256:t2")
    assert binding_for("a", "b\0c") != binding_for("a\0b", "c")
    assert b != binding_for("sha256:p1", "sha256:t1", verifier="0.0.1")  # an upgrade


def test_least_recently_used_entry_is_evicted_first() -> None:
    c = cache(max_entries=3)
    for n in range(3):
        c.store(fake_identity(n), SHA, trusted(), BINDING)
    assert c.lookup(fake_identity(0)) is not None  # 0 is now the most recent
    c.store(fake_identity(3), SHA, trusted(), BINDING)
    assert c.lookup(fake_identity(1)) is None
    assert all(c.lookup(fake_identity(n)) is not None for n in (0, 2, 3))
    assert c.stats().evictions == 1 and c.stats().entries == 3


def test_denial_expires_after_the_negative_ttl_but_an_allow_does_not() -> None:
    clock = Clock()
    c = cache(negative_ttl_s=30, clock=clock)
    c.store(fake_identity(1), SHA, denied(), BINDING)
    c.store(fake_identity(2), SHA2, trusted(), BINDING)
    clock.now += 29 * 10**9
    hit = c.lookup(fake_identity(1))
    assert hit is not None and not hit.verdict.trusted
    clock.now += 2 * 10**9
    assert c.lookup(fake_identity(1)) is None
    assert c.stats().expired == 1
    clock.now += 10**6 * 10**9
    assert c.lookup(fake_identity(2)) is not None


def test_clock_stepping_back_expires_denials() -> None:
    clock = Clock()
    c = cache(clock=clock)
    c.store(fake_identity(1), SHA, denied(), BINDING)
    clock.now -= 10**9
    assert c.lookup(fake_identity(1)) is None


def test_zero_ttl_caches_no_denial() -> None:
    c = cache(negative_ttl_s=0)
    assert not c.store(fake_identity(1), SHA, denied(), BINDING)
    assert c.store(fake_identity(2), SHA, trusted(), BINDING)


def test_content_index_shares_only_trusted_verdicts() -> None:
    c = cache()
    c.store(fake_identity(1), SHA, denied(), BINDING)
    assert c.lookup_digest(SHA) is None  # a copy elsewhere may carry a .sig beside it
    c.store(fake_identity(2), SHA2, trusted(), BINDING)
    hit = c.lookup_digest(SHA2)
    assert hit is not None and hit.identity == fake_identity(2)
    assert c.stats().digest_hits == 1
    assert c.lookup_digest("ef" * 32) is None


def test_content_index_follows_removal_of_each_copy() -> None:
    c = cache(max_entries=2)
    c.store(fake_identity(1), SHA, trusted(), BINDING)
    c.store(fake_identity(2), SHA, trusted(), BINDING)
    assert c.discard(fake_identity(1))
    assert c.lookup_digest(SHA) is not None  # the other copy still vouches
    c.store(fake_identity(3), SHA2, trusted(), BINDING)
    c.store(fake_identity(4), SHA2, trusted(), BINDING)  # evicts 2
    assert c.lookup_digest(SHA) is None
    # replacing an inode's verdict with a denial takes it out of the index
    c.store(fake_identity(3), SHA2, denied(), BINDING)
    hit = c.lookup_digest(SHA2)
    assert hit is not None and hit.identity == fake_identity(4)


def test_discard_forgets_the_inode() -> None:
    c = cache()
    c.store(fake_identity(1), SHA, denied(), BINDING)
    assert c.discard(fake_identity(1)) and not c.discard(fake_identity(1))
    assert c.lookup(fake_identity(1)) is None


@pytest.mark.parametrize("bad", [
    ("sha", "AB" * 32), ("sha", "ab" * 31), ("sha", "zz" * 32),
    ("ident", FileIdentity(-1, 1, 1, 1)), ("ident", FileIdentity(1, 1 << 64, 1, 1)),
    ("verdict", Verdict(True, Reason.OK, "no evidence")),
    ("verdict", Verdict(True, Reason.NO_SIGNATURE, "odd", evidence())),
])
def test_store_refuses_malformed_input(bad: tuple) -> None:  # type: ignore[type-arg]
    what, value = bad
    args: List[object] = [fake_identity(1), SHA, trusted(), BINDING]
    args[{"ident": 0, "sha": 1, "verdict": 2}[what]] = value
    with pytest.raises(ValueError):
        cache().store(*args)  # type: ignore[arg-type]


def test_constructor_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        TrustedCache("/x", "")
    with pytest.raises(ValueError):
        TrustedCache("/x", BINDING, max_entries=0)
    with pytest.raises(ValueError):
        cache().rebind("")


def test_wire_knows_every_evidence_field() -> None:
    # a new Evidence field must be added to the cache format (and FORMAT_VERSION bumped)
    assert {f.name for f in dataclasses.fields(Evidence)} == EVIDENCE_FIELDS
    assert {f.name for f in dataclasses.fields(Verdict)} == {
        "trusted", "reason", "detail", "evidence", "attempts"}


def test_wire_round_trip_keeps_every_field() -> None:
    rows = [(fake_identity(7, ctime_ns=-5, size=0), SHA, rich_verdict(), 42),
            (FileIdentity((1 << 64) - 1, (1 << 64) - 1, (1 << 63) - 1, (1 << 63) - 1), SHA2,
             denied(Reason.BAD_SIGNATURE, "x"), 43)]
    doc = decode(encode(BINDING, rows))
    assert doc.binding == BINDING and doc.entries == rows


def test_wire_caps_long_text_and_attempts() -> None:
    many = tuple(denied() for _ in range(40))
    v = Verdict(False, Reason.NO_SIGNATURE, "x" * 100_000, None, many)
    [(_, _, back, _)] = decode(encode(BINDING, [(fake_identity(1), SHA, v, 1)])).entries
    assert len(back.detail) == 4096 and len(back.attempts) == 16
