"""The cache against real files on ext4 and tmpfs: a modified binary is unknown again.

Each test verifies a file (stores a verdict under the identity fstat() gave on an open fd),
changes it the way an attacker or a deploy would, and looks it up again with the identity
of a fresh open, as the agent does at exec time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from agent.cache import TrustedCache
from tests.cache_fixtures import BINDING, denied, identity_of, open_identity, trusted, write_file

CONTENT = b"\x7fELF" + bytes(range(256)) * 64  # 16 KiB stand-in for a binary


@pytest.fixture(params=["ext4", "tmpfs"])
def fsdir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory this test owns, on the root ext4 or on a tmpfs mounted for it."""
    if request.param == "ext4":
        yield tmp_path
        return
    mnt = Path(tempfile.mkdtemp(prefix="eg-cache-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)
        mnt.rmdir()


def verified(fsdir: Path, name: str = "app", data: bytes = CONTENT) -> tuple[TrustedCache, str]:
    path = str(fsdir / name)
    write_file(path, data)
    cache = TrustedCache(str(fsdir / "state" / "cache"), BINDING)
    ident, sha = open_identity(path)
    assert cache.store(ident, sha, trusted(), BINDING)
    assert cache.lookup(identity_of(path)) is not None  # unchanged: a fresh open hits
    return cache, path


def test_append_misses(fsdir: Path) -> None:
    cache, path = verified(fsdir)
    with open(path, "ab") as fh:
        fh.write(b"\x90")
    assert cache.lookup(identity_of(path)) is None
    assert cache.stats().stale == 1


def test_truncate_misses(fsdir: Path) -> None:
    cache, path = verified(fsdir)
    os.truncate(path, len(CONTENT) // 2)
    assert cache.lookup(identity_of(path)) is None


def test_truncate_and_rewrite_same_bytes_misses(fsdir: Path) -> None:
    cache, path = verified(fsdir)
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(CONTENT)
    ident = identity_of(path)
    assert ident.size == len(CONTENT) and cache.lookup(ident) is None  # only ctime tells


def test_same_size_rewrite_right_after_verification_always_misses(fsdir: Path) -> None:
    # the dangerous race: content swapped in place, same size, within one timer tick of the
    # identity being read. ctime must still move (multigrain timestamps: a queried ctime
    # is followed by a fine-grained one), or the old verdict would cover the new bytes.
    cache = TrustedCache(str(fsdir / "c"), BINDING)
    path = str(fsdir / "app")
    write_file(path, CONTENT)
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(300):
            ident = open_identity(path)[0]
            cache.store(ident, "00" * 32, trusted(), BINDING)
            os.pwrite(fd, bytes([i & 0xFF]), 100)  # same size, other content
            after = identity_of(path)
            assert after.size == ident.size
            assert after.ctime_ns != ident.ctime_ns, f"ctime did not move on rewrite {i}"
            assert cache.lookup(after) is None
    finally:
        os.close(fd)


def test_file_renamed_over_the_path_misses(fsdir: Path) -> None:
    cache, path = verified(fsdir)
    old_fd = os.open(path, os.O_RDONLY)
    try:
        write_file(str(fsdir / "evil"), CONTENT)  # even the same bytes: another inode
        os.rename(fsdir / "evil", path)
        assert cache.lookup(identity_of(path)) is None
        # the replaced inode lives on through the old fd, but dropping its last name
        # stamped its ctime as well: it is unknown again too (measured on ext4 and tmpfs)
        assert cache.lookup(open_identity(f"/proc/self/fd/{old_fd}")[0]) is None
    finally:
        os.close(old_fd)


def test_hard_link_shares_the_verdict_and_a_write_through_it_voids_both(fsdir: Path) -> None:
    cache, path = verified(fsdir)
    link = str(fsdir / "sub" / "alias")
    os.makedirs(os.path.dirname(link))
    os.link(path, link)  # link() changes ctime (i_nlink): re-verify, once, for both names
    ident, sha = open_identity(link)
    assert cache.lookup(ident) is None
    cache.store(ident, sha, trusted(), BINDING)
    assert identity_of(path) == identity_of(link)
    assert cache.lookup(identity_of(path)) is not None
    assert cache.lookup(identity_of(link)) is not None
    with open(link, "ab") as fh:
        fh.write(b"x")
    assert cache.lookup(identity_of(path)) is None
    assert cache.lookup(identity_of(link)) is None


@pytest.mark.parametrize("change", ["chmod", "chown", "utime", "xattr"])
def test_metadata_change_misses_the_safe_way(fsdir: Path, change: str) -> None:
    cache, path = verified(fsdir)
    if change == "chmod":
        os.chmod(path, 0o700)
    elif change == "chown":
        os.chown(path, 0, 0)  # even a no-op chown stamps ctime
    elif change == "xattr":
        os.setxattr(path, "trusted.note", b"1")
    else:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime moves
    assert cache.lookup(identity_of(path)) is None


def test_copy_reuses_a_trusted_verdict_only_after_hashing(fsdir: Path) -> None:
    cache, path = verified(fsdir)
    copy = str(fsdir / "copy")
    shutil.copyfile(path, copy)
    ident, sha = open_identity(copy)
    assert cache.lookup(ident) is None
    hit = cache.lookup_digest(sha)
    assert hit is not None and hit.verdict.trusted
    cache.store(ident, sha, hit.verdict, BINDING)
    assert cache.lookup(identity_of(copy)) is not None


def test_copy_of_a_denied_file_is_verified_afresh(fsdir: Path) -> None:
    cache = TrustedCache(str(fsdir / "c"), BINDING)
    path = str(fsdir / "unsigned")
    write_file(path, CONTENT)
    cache.store(*open_identity(path), denied(), BINDING)
    shutil.copyfile(path, fsdir / "copy")
    ident, sha = open_identity(str(fsdir / "copy"))
    assert cache.lookup(ident) is None and cache.lookup_digest(sha) is None


def test_deleted_and_recreated_file_misses_even_if_the_inode_is_reused(fsdir: Path) -> None:
    cache, path = verified(fsdir)
    old = identity_of(path)
    reused = 0
    for _ in range(20):
        os.unlink(path)
        write_file(path, b"\xcc" * len(CONTENT))  # same size, other bytes
        new = identity_of(path)
        reused += new.ino == old.ino
        assert cache.lookup(new) is None
    print(f"inode reused {reused}/20 times on {fsdir}")


def test_verdicts_survive_a_restart_and_changes_while_down_miss(fsdir: Path) -> None:
    cache, path = verified(fsdir)
    write_file(str(fsdir / "other"), CONTENT + b"2")
    cache.store(*open_identity(str(fsdir / "other")), trusted(), BINDING)
    assert cache.flush()
    with open(path, "ab") as fh:  # modified while the agent was not running
        fh.write(b"!")
    restarted = TrustedCache(cache.path, BINDING)
    assert restarted.load().entries == 2
    assert restarted.lookup(identity_of(path)) is None
    assert restarted.lookup(identity_of(str(fsdir / "other"))) is not None
