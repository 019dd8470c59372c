"""The FUSE breaker's rules (agent/sensors/fanotify_fuse.py): when it cuts, what, and how
long it lets a stuck agent wait. The real abort of a real FUSE connection is in
tests/integration/test_agent_fuse.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from agent.sensors import fanotify_fuse as ff
from agent.sensors.fanotify_watchdog import HARD_FACTOR, HARD_SLACK_S


@pytest.mark.parametrize("deadline", [0.05, 0.1, 0.5, 1.0, 5.0, 60.0])
def test_the_breaker_acts_before_the_watchdog_would_kill_the_loop(deadline: float) -> None:
    limit = ff.limit_for(deadline)
    assert limit < HARD_FACTOR * deadline + HARD_SLACK_S  # the watchdog's running limit
    assert limit > min(deadline / 4, 0.5)  # past the loop's idle beat (FanotifyBackend)
    assert limit <= ff.LIMIT_MAX_S  # inside the service watchdog's window


def test_the_default_deadline_gives_a_one_second_limit() -> None:
    assert ff.limit_for(0.5) == 1.0


def test_connection_names_are_the_kernels_dev_t() -> None:
    assert ff.connection_name(os.makedev(0, 43)) == "43"
    assert ff.connection_name(os.makedev(0, 300)) == "300"  # not st_dev's encoding
    assert ff.connection_name(os.makedev(8, 1)) == str(8 << 20 | 1)  # fuseblk


def test_a_thread_that_runs_starts_its_wait_again() -> None:
    w = ff.Waits()
    assert w.update(10.0, {7: 100}) == 0.0
    assert w.update(11.5, {7: 100}) == 1.5
    assert w.update(12.0, {7: 250}) == 0.0  # it ran: not stuck
    assert w.update(13.0, {7: 250}) == 1.0
    assert w.update(14.0, {}) == 0.0  # no longer waiting
    assert w.update(15.0, {7: 250}) == 0.0


def test_only_filesystems_whose_requests_waited_all_along_are_cut_past_the_limit() -> None:
    waited: Dict[int, float] = {1: 0.2, 2: 1.3}  # 1: a busy filesystem that keeps answering
    assert ff.to_cut(0.9, 1.0, waited) == []
    assert ff.to_cut(1.1, 1.0, waited) == [2]


@pytest.mark.parametrize("wchan,inside", [("request_wait_answer", True),
                                          ("fuse_get_req", True), ("do_epoll_wait", False),
                                          ("", False)])
def test_a_thread_inside_fuse_is_recognised(wchan: str, inside: bool) -> None:
    assert ff.in_fuse_wait(wchan) is inside


def test_the_mounting_user_of_a_fuse_filesystem() -> None:
    assert ff.user_of("rw,user_id=65534,group_id=65534") == 65534
    assert ff.user_of("rw,user_id=0,group_id=0,allow_other") == 0
    assert ff.user_of("rw,size=10k") is None


class FakeConnections(ff.Connections):
    """fusectl's files in a directory (the real one needs a FUSE mount: the integration
    test has it)."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.root = str(root)

    def find(self) -> Optional[str]:
        return self.root


def conn(root: Path, dev: int, waiting: int) -> Path:
    d = root / ff.connection_name(dev)
    d.mkdir()
    (d / "waiting").write_text(f"{waiting}\n")
    (d / "abort").write_text("")
    return d


def test_a_silent_loop_cuts_every_fuse_filesystem_in_scope_that_keeps_requests(
        tmp_path: Path) -> None:
    a, b = os.makedev(0, 50), os.makedev(0, 51)
    da, db = conn(tmp_path, a, 1), conn(tmp_path, b, 0)
    silent = [0.2]
    heard: List[str] = []
    breaker = ff.FuseBreaker(1.0, lambda: {a: "fuse at /s/a", b: "fuse at /s/b"},
                             lambda: silent[0], lambda: [],
                             on_cut=lambda name, why: heard.append(name),
                             connections=FakeConnections(tmp_path))
    assert breaker.tick(100.0) == []  # a's requests wait from here on
    silent[0] = 1.5
    assert breaker.tick(100.5) == []  # stuck, but a's requests waited only 0.5 s
    assert breaker.tick(101.2) == ["fuse at /s/a"]
    assert (da / "abort").read_text() == "1" and (db / "abort").read_text() == ""
    assert heard == ["fuse at /s/a"] and breaker.aborted == 1
    assert "event loop silent" in str(breaker.stats()["fuse_last_aborted"])


def test_a_connection_that_is_gone_is_forgotten(tmp_path: Path) -> None:
    a = os.makedev(0, 52)
    forgotten: List[int] = []
    breaker = ff.FuseBreaker(1.0, lambda: {a: "fuse at /s/a"}, lambda: 0.0, lambda: [],
                             connections=FakeConnections(tmp_path), forget=forgotten.append)
    breaker.tick(1.0)
    assert forgotten == [a]


def test_admin_access_is_raised_once_and_put_back_after_the_last_user(tmp_path: Path) -> None:
    param = tmp_path / "allow_sys_admin_access"
    param.write_text("N\n")
    with ff.admin_access(str(param)):
        assert param.read_text() == "Y"
        with ff.admin_access(str(param)):  # a second group marking meanwhile
            assert param.read_text() == "Y"
        assert param.read_text() == "Y"
    assert param.read_text() == "N"
    param.write_text("Y\n")  # an administrator's Y stays
    with ff.admin_access(str(param)):
        pass
    assert param.read_text() == "Y\n"


def test_without_fuse_in_scope_nothing_is_looked_at(tmp_path: Path) -> None:
    breaker = ff.FuseBreaker(1.0, dict, lambda: 99.0, lambda: [],
                             connections=FakeConnections(tmp_path))
    assert breaker.tick(1.0) == []
    assert breaker.stats()["fuse_aborted"] == 0
