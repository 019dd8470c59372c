"""`execguard run` with fanotify-exec in enforce mode: a scope means files, wherever they are
reached from, and no verdict outlives a change of the bytes (docs/fanotify.md, "Marks").

One agent, scoped to a directory of a tmpfs the test owns (so the tmpfs is partly in scope:
its other files must run at once). Every other mount the test makes is a bind of that tmpfs
onto a directory of its own, a tmpfs inside the scope, or lives in a private namespace; all
undone in finally. Nothing marks the root filesystem. Every exec has a timeout.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.agent_fixtures import RunningAgent, exec_file, running_agent, scoped_tmpfs, wait_for
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify permission events need root"),
    pytest.mark.timeout(240),
]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def run(argv: List[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except PermissionError as exc:
        return subprocess.CompletedProcess(argv, 126, "", str(exc))


@contextlib.contextmanager
def mount(*argv: str) -> Iterator[None]:
    """``mount ARGV...`` (the last argument is the mount point), undone on exit."""
    subprocess.run(["mount", *argv], check=True, capture_output=True, timeout=10)
    try:
        yield
    finally:
        if subprocess.run(["umount", argv[-1]], capture_output=True, timeout=10).returncode:
            subprocess.run(["umount", "-l", argv[-1]], capture_output=True, timeout=10)


def decided(agent: RunningAgent, path: Path) -> List[str]:
    return [d["reason"] for d in agent.decisions() if d["event"]["path"] == str(path)]


def denied_for(agent: RunningAgent, path: Path, reason: str) -> None:
    """Until the log has that denial of ``path`` (records are written after the answer)."""
    wait_for(lambda: reason in decided(agent, path), timeout=15)


def write_through_mapping(path: Path) -> None:
    """Bytes into ``path`` through a MAP_SHARED mapping whose pages came in by a read fault:
    on tmpfs the write changes neither ctime, mtime nor size."""
    before = os.stat(path)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            middle = len(m) // 2
            assert m[:4] == b"\x7fELF" and m[middle: middle + 8]  # read faults: writable
            m[middle: middle + 8] = b"EG-PWNED"
    finally:
        os.close(fd)
    after = os.stat(path)
    assert (before.st_ctime_ns, before.st_mtime_ns, before.st_size) == \
        (after.st_ctime_ns, after.st_mtime_ns, after.st_size)


def test_files_in_scope_are_judged_wherever_they_are_reached_from(tmp_path: Path,
                                                                  material: Material) -> None:
    key = material.private["a"]
    with scoped_tmpfs() as fs_root:
        scope = fs_root / "scope"
        ok = copy_signed(material.bins["app"], scope, key)
        bad = copy_signed(material.bins["app"], scope / "u", None)
        sibling = copy_signed(material.bins["app"], fs_root / "other", None)
        view = Path(tempfile.mkdtemp(prefix="eg-agent-view-"))
        try:
            with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                               str(material.keys["a"]), "--backend", "fanotify-exec",
                               "--audit", "off") as agent:
                wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=60)
                sensor = agent.status()["sensor"]
                assert sensor["marked_filesystems"] == 1 and sensor["marked_inodes"] == 0
                assert exec_file(ok).returncode == 0
                assert exec_file(bad).returncode == 126
                # the tmpfs is marked as a whole; its files outside the scope run at once
                assert exec_file(sibling).returncode == 0
                assert decided(agent, sibling) == []

                # a bind mount of the tmpfs elsewhere: judged at the scope path
                with mount("--bind", str(fs_root), str(view)):
                    assert exec_file(view / "scope" / "u" / "app").returncode == 126
                    assert exec_file(view / "other" / "app").returncode == 0
                agent.wait_decision(str(bad), 2)
                assert decided(agent, view / "scope" / "u" / "app") == []

                # other mount namespaces: root's private one, nobody's user namespace
                assert run(["unshare", "-m", str(bad)]).returncode == 126
                assert run([*NOBODY, "unshare", "-Urm", str(bad)]).returncode == 126
                agent.wait_decision(str(bad), 4)  # records are written after the answer
                assert decided(agent, bad) == ["no-signature"] * 4
                assert run(["unshare", "-m", str(ok)]).returncode == 0
                assert run(["unshare", "-m", str(sibling)]).returncode == 0
                assert decided(agent, sibling) == []
        finally:
            view.rmdir()


def test_a_new_tmpfs_in_the_scope_is_marked_and_judged(tmp_path: Path,
                                                       material: Material) -> None:
    with scoped_tmpfs() as scope:
        inner = scope / "inner"
        inner.mkdir()
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "fanotify-exec",
                           "--audit", "off") as agent, \
                mount("-t", "tmpfs", "-o", "size=32m,mode=0755", "eg-inner", str(inner)):
            wait_for(lambda: agent.status()["sensor"]["marked_filesystems"] == 2, timeout=10)
            unsigned = copy_signed(material.bins["app"], inner, None)
            signed = copy_signed(material.bins["app"], inner / "s", material.private["a"])
            assert exec_file(unsigned).returncode == 126
            assert exec_file(signed).returncode == 0
            agent.wait_decision(str(unsigned))
            assert decided(agent, unsigned) == ["no-signature"]


def test_no_allow_outlives_a_write_through_a_shared_mapping(tmp_path: Path,
                                                            material: Material) -> None:
    """The allow of a signed program is remembered and, on this tmpfs, ignore-marked (its
    next execs are the kernel's); bytes written into it through a shared mapping change no
    stamp on tmpfs, yet its next exec is decided from the new bytes and denied: the open
    for write took the mark and the memory first. Prearmed: the mapping is made writable
    before the program is judged again, the bytes go in later."""
    key = material.private["a"]
    with scoped_tmpfs() as scope:
        plain = copy_signed(material.bins["app"], scope / "plain", key)
        armed = copy_signed(material.bins["app"], scope / "armed", key)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "fanotify-exec",
                           "--audit", "off") as agent:
            wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=60)
            for app in (plain, armed):
                assert exec_file(app).returncode == 0
                assert exec_file(app).returncode == 0
            sensor = agent.status()["sensor"]
            assert sensor["remembered_allows"] >= 2 and sensor["marked_inodes"] == 2

            write_through_mapping(plain)
            assert exec_file(plain).returncode == 126
            denied_for(agent, plain, "bad-signature")

            # prearmed: writable pages first, a close-after-write has the agent judge the
            # still-signed bytes while they are writable, then the bytes go in
            fd = os.open(armed, os.O_RDWR)
            with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                os.close(fd)
                middle = len(m) // 2
                assert m[:4] == b"\x7fELF" and m[middle: middle + 8]  # read faults: writable
                os.close(os.open(armed, os.O_WRONLY))  # close-after-write: judged again
                time.sleep(1.0)
                before = os.stat(armed)
                m[middle: middle + 8] = b"EG-PWNED"
                assert os.stat(armed).st_ctime_ns == before.st_ctime_ns  # no new stamp
            assert exec_file(armed).returncode == 126
            denied_for(agent, armed, "bad-signature")
            assert agent.status()["sensor"]["marked_inodes"] == 0
