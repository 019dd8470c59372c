"""The cache file on disk: round trip, atomic 0600 writes, bounded loads, bad files set aside."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable, Dict, List

import msgpack
import pytest

from agent.cache import TrustedCache
from agent.cache_wire import MAX_FILE_BYTES, encode
from tests.cache_fixtures import (
    BINDING,
    OTHER_BINDING,
    denied,
    fake_identity,
    rich_verdict,
    trusted,
)

SHA = "ab" * 32


def filled(path: Path, n: int = 3, **kw: Any) -> TrustedCache:
    c = TrustedCache(str(path), BINDING, **kw)
    for i in range(n):
        c.store(fake_identity(i), SHA, rich_verdict() if i == 0 else trusted(), BINDING)
    return c


def test_round_trip_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cache"
    a = filled(path, 3)
    a.store(fake_identity(9), "cd" * 32, denied(), BINDING)
    assert a.flush()
    b = TrustedCache(str(path), BINDING)
    report = b.load()
    assert (report.entries, report.dropped, report.set_aside, report.warnings) == (4, 0, None, ())
    for i in range(3):
        assert b.lookup(fake_identity(i)) == a.lookup(fake_identity(i))
    hit = b.lookup(fake_identity(0))
    assert hit is not None and hit.verdict == rich_verdict()
    miss = b.lookup(fake_identity(9))
    assert miss is not None and not miss.verdict.trusted
    assert b.lookup_digest(SHA) is not None


def test_recency_order_survives_a_restart(tmp_path: Path) -> None:
    a = filled(tmp_path / "c", 3, max_entries=3)
    a.lookup(fake_identity(0))  # 1 is now the least recently used
    a.store(fake_identity(5), SHA, trusted(), BINDING)  # dirty, so the order is written
    a.flush()
    b = TrustedCache(str(tmp_path / "c"), BINDING, max_entries=3)
    b.load()
    b.store(fake_identity(6), SHA, trusted(), BINDING)
    assert b.lookup(fake_identity(2)) is None and b.lookup(fake_identity(0)) is not None


def test_file_is_0600_whatever_the_umask_and_flush_only_when_dirty(tmp_path: Path) -> None:
    c = filled(tmp_path / "c")
    old = os.umask(0)
    try:
        assert c.flush()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o600
    assert not c.flush()
    c.lookup(fake_identity(1))
    assert not c.flush()  # lookups never make the file dirty
    c.discard(fake_identity(1))
    assert c.flush() and c.stats().flushes == 2
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no tmp left behind


def test_file_from_another_policy_is_dropped_not_trusted(tmp_path: Path) -> None:
    filled(tmp_path / "c", 4).flush()
    c = TrustedCache(str(tmp_path / "c"), OTHER_BINDING)
    report = c.load()
    assert (report.entries, report.dropped, report.set_aside) == (0, 4, None)
    assert c.lookup(fake_identity(1)) is None and c.stats().corrupt_loads == 0
    assert c.flush()  # rewritten under the new binding
    c2 = TrustedCache(str(tmp_path / "c"), BINDING)
    assert c2.load().dropped == 0 and c2.stats().entries == 0


def test_over_capacity_file_keeps_the_most_recent(tmp_path: Path) -> None:
    filled(tmp_path / "c", 10).flush()
    c = TrustedCache(str(tmp_path / "c"), BINDING, max_entries=4)
    report = c.load()
    assert (report.entries, report.dropped) == (4, 6)
    assert c.stats().evictions == 0
    assert [c.lookup(fake_identity(i)) is not None for i in range(10)] == [False] * 6 + [True] * 4


def test_expired_denials_are_dropped_at_load(tmp_path: Path) -> None:
    c = TrustedCache(str(tmp_path / "c"), BINDING, clock=lambda: 1_000 * 10**9)
    c.store(fake_identity(1), SHA, denied(), BINDING)
    c.store(fake_identity(2), SHA, trusted(), BINDING)
    c.flush()
    later = TrustedCache(str(tmp_path / "c"), BINDING, clock=lambda: 2_000 * 10**9)
    assert later.load().dropped == 1
    assert later.lookup(fake_identity(2)) is not None


def test_writes_no_more_than_the_size_cap(tmp_path: Path) -> None:
    c = filled(tmp_path / "c", 200, max_file_bytes=20_000)
    assert c.flush()
    assert os.path.getsize(tmp_path / "c") <= 20_000
    b = TrustedCache(str(tmp_path / "c"), BINDING, max_file_bytes=20_000)
    report = b.load()
    assert 0 < report.entries < 200 and report.set_aside is None
    assert b.lookup(fake_identity(199)) is not None  # the newest kept


def test_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "notadir").write_bytes(b"")
    c = filled(tmp_path / "notadir" / "c")
    assert not c.flush()
    s = c.stats()
    assert s.flush_errors == 1 and s.last_error is not None and "notadir" in s.last_error
    assert c.lookup(fake_identity(1)) is not None  # decisions go on
    c.path = str(tmp_path / "c")  # the operator fixes the state dir: the data was kept dirty
    assert c.flush()


# -- corrupt and foreign files: set aside, start empty, warn, never allow ---------------------

def _doc(**changes: Any) -> Dict[str, Any]:
    row = [2049, 1, 1_000, 10, bytes.fromhex(SHA), 5,
           {"trusted": True, "reason": "ok", "detail": "d", "attempts": [],
            "evidence": {"kind": "cosign-sig", "source": "s", "key_fingerprint": None,
                         "identity": None, "issuer": None, "log_index": None,
                         "integrated_time": None, "bundle_media_type": None}}]
    doc: Dict[str, Any] = {"magic": "execguard-verdict-cache", "version": 1, "binding": BINDING,
                           "written_at_ns": 1, "entries": [row]}
    for key, fn in changes.items():
        fn(doc if key == "doc" else row if key == "row" else row[6])
    return doc


def _pack(**changes: Callable[[Any], None]) -> bytes:
    return bytes(msgpack.packb(_doc(**changes), use_bin_type=True))


def _set(key: Any, value: Any) -> Callable[[Any], None]:
    return lambda target: target.__setitem__(key, value)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


VALID = _pack()
CORRUPT: Dict[str, bytes] = {
    "empty": b"",
    "random": bytes(range(256)) * 4,
    "truncated": VALID[: len(VALID) // 2],
    "trailing-garbage": VALID + b"\x00",
    "json": b'{"magic": "execguard-verdict-cache", "version": 1}',
    "wrong-magic": _pack(doc=_set("magic", "fapolicyd")),
    "future-version": _pack(doc=_set("version", 2)),
    "not-a-map": msgpack.packb([1, 2, 3]),
    "extra-field": _pack(doc=_set("extra", 1)),
    "binding-not-str": _pack(doc=_set("binding", 7)),
    "entries-not-list": _pack(doc=_set("entries", {"a": 1})),
    "ino-as-string": _pack(row=_set(1, "1")),
    "ino-as-bool": _pack(row=_set(1, True)),
    "negative-dev": _pack(row=_set(0, -1)),
    "short-sha": _pack(row=_set(4, b"\x00" * 31)),
    "sha-as-hex-str": _pack(row=_set(4, SHA)),
    "short-row": _pack(row=lambda r: r.pop()),
    "trusted-as-int": _pack(verdict=_set("trusted", 1)),
    "trusted-without-ok": _pack(verdict=_set("reason", "no-signature")),
    "trusted-without-evidence": _pack(verdict=_set("evidence", None)),
    "unknown-reason": _pack(verdict=_set("reason", "yes-please")),
    "unknown-kind": _pack(verdict=lambda v: v["evidence"].__setitem__("kind", "gpg")),
    "evidence-missing-field": _pack(verdict=lambda v: v["evidence"].pop("issuer")),
    "nested-attempts": _pack(verdict=_set("attempts", [
        {"trusted": False, "reason": "no-signature", "detail": "", "evidence": None,
         "attempts": [{}]}])),
    "duplicate-inode": _pack(doc=lambda d: d["entries"].append(list(d["entries"][0]))),
    "ext-type": msgpack.packb(msgpack.ExtType(5, b"xx")),
    "int-map-keys": msgpack.packb({1: 2}),
    "deep-nesting": _nested(100_000),
    "huge-array-header": b"\xdd\xff\xff\xff\xff",
}

WHY: Dict[str, str] = {  # what the warning must say: each forgery fails for its reason
    "empty": "incomplete input",
    "random": "not a valid msgpack",
    "truncated": "incomplete input",
    "trailing-garbage": "extra data",
    "json": "not a valid msgpack",
    "wrong-magic": "wrong magic",
    "future-version": "format version 2",
    "not-a-map": "wrong magic",
    "extra-field": "'extra'",
    "binding-not-str": "'binding' has type int",
    "entries-not-list": "'entries' has type dict",
    "ino-as-string": "non-integer",
    "ino-as-bool": "non-integer",
    "negative-dev": "out of range",
    "short-sha": "not 32 bytes",
    "sha-as-hex-str": "not 32 bytes",
    "short-row": "7-item",
    "trusted-as-int": "'trusted' has type int",
    "trusted-without-ok": "needs reason 'ok'",
    "trusted-without-evidence": "needs reason 'ok' and evidence",
    "unknown-reason": "unknown reason",
    "unknown-kind": "unknown signature kind",
    "evidence-missing-field": "evidence has fields",
    "nested-attempts": "nested attempts",
    "duplicate-inode": "two entries for one inode",
    "ext-type": "wrong magic",
    "int-map-keys": "map key",
    "deep-nesting": "StackError",
    "huge-array-header": "max_array_len",
}


def _assert_set_aside(c: TrustedCache, original: bytes, why: str = "") -> None:
    report = c.load()
    assert report.entries == 0 and c.stats().entries == 0
    assert c.stats().corrupt_loads == 1
    assert report.set_aside is not None and ".corrupt-" in report.set_aside
    assert len(report.warnings) == 1 and c.path in report.warnings[0]
    assert why in report.warnings[0]
    assert not os.path.lexists(c.path)
    if original:
        assert Path(report.set_aside).read_bytes() == original
    assert c.lookup(fake_identity(1)) is None  # the forged allow is never served
    assert c.lookup_digest(SHA) is None
    c.store(fake_identity(2), SHA, trusted(), BINDING)
    assert c.flush()  # rebuilt
    again = TrustedCache(c.path, BINDING)
    assert again.load().entries == 1 and again.stats().corrupt_loads == 0


def test_unforged_document_gives_a_hit(tmp_path: Path) -> None:
    # the forgeries start from this document: it must load, or they would prove nothing
    (tmp_path / "c").write_bytes(VALID)
    os.chmod(tmp_path / "c", 0o600)
    c = TrustedCache(str(tmp_path / "c"), BINDING)
    assert c.load().entries == 1 and c.lookup(fake_identity(1)) is not None


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_file_is_set_aside_and_never_allows(tmp_path: Path, name: str) -> None:
    data = CORRUPT[name]
    (tmp_path / "c").write_bytes(data)
    os.chmod(tmp_path / "c", 0o600)
    _assert_set_aside(TrustedCache(str(tmp_path / "c"), BINDING), data, WHY[name])


@pytest.mark.parametrize("how", ["other-owner", "world-writable", "group-writable", "symlink",
                                 "directory", "fifo"])
def test_foreign_file_is_set_aside(tmp_path: Path, how: str) -> None:
    path = tmp_path / "c"
    if how == "symlink":
        (tmp_path / "target").write_bytes(VALID)
        os.symlink(tmp_path / "target", path)
    elif how == "directory":
        path.mkdir()
    elif how == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(VALID)
        mode = {"world-writable": 0o602, "group-writable": 0o620}.get(how, 0o600)
        os.chmod(path, mode)
        if how == "other-owner":
            os.chown(path, 65534, 65534)
    why = {"other-owner": "owned by uid 65534", "symlink": "symbolic link",
           "directory": "not a regular file", "fifo": "not a regular file"}.get(how, "writable")
    _assert_set_aside(TrustedCache(str(path), BINDING), b"", why)
    if how == "symlink":
        assert (tmp_path / "target").read_bytes() == VALID  # the link moved, not its target


def test_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with open(path, "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)  # sparse: the size alone must refuse it
    os.chmod(path, 0o600)
    c = TrustedCache(str(path), BINDING)
    report = c.load()
    assert report.set_aside is not None and "cap" in report.warnings[0]


def test_only_the_newest_set_aside_files_are_kept(tmp_path: Path) -> None:
    names: List[str] = []
    for _ in range(6):
        (tmp_path / "c").write_bytes(b"junk")
        os.chmod(tmp_path / "c", 0o600)
        aside = TrustedCache(str(tmp_path / "c"), BINDING).load().set_aside
        assert aside is not None
        names.append(os.path.basename(aside))
    left = sorted(f for f in os.listdir(tmp_path) if ".corrupt-" in f)
    assert len(left) == 3 and names[-1] in left


def test_stray_tmp_from_a_crash_never_touches_the_live_file(tmp_path: Path) -> None:
    filled(tmp_path / "c", 3).flush()
    live = (tmp_path / "c").read_bytes()
    (tmp_path / "c.tmp").write_bytes(encode(BINDING, [])[:7])  # died mid-write
    c = TrustedCache(str(tmp_path / "c"), BINDING)
    report = c.load()
    assert report.entries == 3 and report.set_aside is None
    assert any("c.tmp" in w for w in report.warnings)
    assert not (tmp_path / "c.tmp").exists() and (tmp_path / "c").read_bytes() == live


def test_planted_tmp_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    c = filled(tmp_path / "c", 2)
    os.symlink(victim, tmp_path / "c.tmp")
    assert c.flush()
    assert victim.read_bytes() == b"keep me"
    assert TrustedCache(str(tmp_path / "c"), BINDING).load().entries == 2
