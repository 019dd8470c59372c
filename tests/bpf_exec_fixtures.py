"""Shared helpers for the kill sensor tests: one compile per session, scoped tmpfs mounts.

The sensor is cached at module level, so test files that import the fixture share one BCC
compile (a fixture imported into two modules is two fixtures to pytest). Every test leaves
the sensor in report-only mode with no filesystem class set and the guards that keep every
unclassified filesystem out of scope (``ONLY_CLASSED``), whatever happens: with them, only
a tmpfs the test put in scope can ever be killed on.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import time
from typing import Iterator, List, Optional

import pytest

from agent.decision import FileIdentity
from agent.sensors.bpf.sensor import Guards
from agent.sensors.bpf_exec import BpfExecSensor
from agent.sensors.decode import ExecRecord, Op
from agent.sensors.selftest import ONLY_CLASSED, private_tmpfs

ECHO = "/bin/echo"
RECORD_DEADLINE_S = 5.0
_shared: Optional[BpfExecSensor] = None


def _close_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None


@pytest.fixture(scope="session", name="sensor")
def sensor_fixture() -> Iterator[BpfExecSensor]:
    global _shared
    if os.geteuid() != 0:
        pytest.fail("BPF exec sensor tests run as root (CI runs them as root)")
    if _shared is None:
        _shared = BpfExecSensor()
        atexit.register(_close_shared)
    reset(_shared)
    yield _shared
    reset(_shared)


def reset(sensor: BpfExecSensor) -> None:
    """Report only, nothing in scope but what has a class, and no class left over."""
    sensor.set_mode(enforce=False, deny_unknown=False, guards=ONLY_CLASSED)
    for dev in sensor.fs_classes:
        sensor.drop_fs_class(dev)


def enforce(sensor: BpfExecSensor, *, deny_unknown: bool = True, maps: bool = True,
            loader: bool = False) -> None:
    """Kill in scope: only the filesystems the test gave a class (ONLY_CLASSED)."""
    sensor.set_mode(enforce=True, deny_unknown=deny_unknown,
                    guards=Guards(maps=maps, loader=loader, unseen_out=True))


@contextlib.contextmanager
def scoped_tmpfs(sensor: BpfExecSensor, *, in_scope: bool) -> Iterator[str]:
    """A tmpfs the test owns; in scope (class IN) while the block runs, out of it (and
    unmounted) after. The mode is reset to report-only first, so a kill never outlives the
    block. Out of scope, its execs are not even reported."""
    with private_tmpfs() as mnt:
        os.chmod(mnt, 0o755)
        dev = os.stat(mnt).st_dev
        try:
            if in_scope:
                sensor.add_scope_dev(dev)
            yield mnt
        finally:
            sensor.set_mode(enforce=False, deny_unknown=False, guards=ONLY_CLASSED)
            sensor.remove_scope_dev(dev)


def copy_exe(src: str, dst: str) -> FileIdentity:
    shutil.copy(src, dst)
    os.chmod(dst, 0o755)
    st = os.stat(dst)
    return FileIdentity(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)


def run(argv: List[str], timeout: float = 10.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )


def wait_record(
    sensor: BpfExecSensor, *, path: str, pid: Optional[int] = None, op: Op = Op.EXEC
) -> ExecRecord:
    """The first ``op`` record for ``path`` (and ``pid`` if given); fails after a deadline.
    A mapping record's path is the file's path within its filesystem."""
    end = time.monotonic() + RECORD_DEADLINE_S
    while time.monotonic() < end:
        for rec in sensor.poll(50):
            if rec.op is op and rec.event.path == path and (pid is None or rec.event.pid == pid):
                return rec
    pytest.fail(f"no {op.name} record for {path} (pid {pid}) within {RECORD_DEADLINE_S} s")


def drain(sensor: BpfExecSensor) -> None:
    sensor.poll(0)
