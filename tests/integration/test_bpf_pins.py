"""agent/sensors/bpf/pins.py against the real bpf(2) on this host: a per-CPU counter map is
pinned in a bpffs the test mounts itself (never /sys/fs/bpf: a pin there would outlive the
test), read back read-only by path and by the orphan scan, as a restarted agent reads an
orphan's counters. Links and the LSM guards need BPF LSM: the VM suite has them
(tests/vm/test_tamper_vm.py)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from agent.sensors.bpf import pins
from agent.sensors.bpf.sensor import VERDICT_STAT_NAMES

_BPF_MAP_CREATE, _BPF_MAP_UPDATE_ELEM = 0, 2
_PERCPU_ARRAY = 6


@pytest.fixture
def bpffs() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="eg-bpffs-"))
    subprocess.run(["mount", "-t", "bpf", "eg-test-bpffs", str(where)], check=True, timeout=10)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, timeout=10)
        where.rmdir()


def percpu_counters(slots: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 6)(_PERCPU_ARRAY, 4, 8, slots, 0, 0)
    fd = int(libc.syscall(321, _BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr)))
    assert fd >= 0, os.strerror(ctypes.get_errno())
    return fd


def set_slot(fd: int, index: int, per_cpu: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    key = ctypes.c_uint32(index)
    values = (ctypes.c_uint64 * pins.possible_cpus())(*([per_cpu] * pins.possible_cpus()))
    attr = (ctypes.c_uint64 * 4)(fd, ctypes.addressof(key), ctypes.addressof(values), 0)
    assert libc.syscall(321, _BPF_MAP_UPDATE_ELEM, ctypes.byref(attr), ctypes.sizeof(attr)) == 0


def test_an_orphans_counters_are_read_from_its_pin(bpffs: Path) -> None:
    fd = percpu_counters(len(VERDICT_STAT_NAMES))
    try:
        orphan_denied = VERDICT_STAT_NAMES.index("orphan_denied")
        set_slot(fd, orphan_denied, 3)
        assert pins.obj_id(fd) > 0
        directory = bpffs / "bpf-lsm_999999999_7"  # a pid that no process has
        directory.mkdir()
        pins.obj_pin(fd, str(directory / pins.STATS_PIN))
    finally:
        os.close(fd)  # the pin keeps the map
    found = pins.orphans(VERDICT_STAT_NAMES, root=str(bpffs))
    assert [(o.pid, o.links) for o in found] == [(999999999, 0)]
    counters = found[0].counters
    assert counters["orphan_denied"] == 3 * pins.possible_cpus()  # summed over the CPUs
    assert counters["denied"] == 0


def test_bpffs_refuses_a_name_with_a_dot(bpffs: Path) -> None:
    """Why the pin names use underscores (found in the VM: EPERM on the first mkdir)."""
    with pytest.raises(PermissionError):
        (bpffs / "bpf-lsm.1.2").mkdir()
    (bpffs / "bpf-lsm_1_2").mkdir()
