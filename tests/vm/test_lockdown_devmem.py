"""Lockdown integrity and above refuse raw hardware and memory access; none allows it.

Each case tries the real operation as root with every capability and asserts the errno
the kernel's lockdown check gives (EPERM), or success under ``none`` (the control, which
proves the refusal comes from lockdown and not from a missing device or capability).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Callable

import pytest

from tests.vm.guest_env import at_least

pytestmark = pytest.mark.timeout(60)
_libc = ctypes.CDLL(None, use_errno=True)


def _errno_of(op: Callable[[], None]) -> int:
    """0 when ``op`` succeeds, else the errno it failed with."""
    try:
        op()
    except OSError as exc:
        return exc.errno or -1
    return 0


def _read_dev(path: str, offset: int = 0, size: int = 16) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _ioperm() -> None:
    # port 0x80 (the POST diagnostic port): enabling access to it changes nothing
    if _libc.ioperm(ctypes.c_ulong(0x80), ctypes.c_ulong(1), 1) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    _libc.ioperm(ctypes.c_ulong(0x80), ctypes.c_ulong(1), 0)


def test_dev_mem(lockdown_mode: str) -> None:
    """/dev/mem: LOCKDOWN_DEV_MEM (integrity). The first page is readable under
    CONFIG_STRICT_DEVMEM, so the control really reads physical memory."""
    got = _errno_of(lambda: _read_dev("/dev/mem"))
    assert got == (errno.EPERM if at_least(lockdown_mode, "integrity") else 0), os.strerror(got)


def test_dev_port(lockdown_mode: str) -> None:
    """/dev/port goes through the same open check as /dev/mem."""
    got = _errno_of(lambda: os.close(os.open("/dev/port", os.O_RDONLY)))
    assert got == (errno.EPERM if at_least(lockdown_mode, "integrity") else 0), os.strerror(got)


def test_ioperm(lockdown_mode: str) -> None:
    """ioperm(): LOCKDOWN_IOPORT (integrity)."""
    got = _errno_of(_ioperm)
    assert got == (errno.EPERM if at_least(lockdown_mode, "integrity") else 0), os.strerror(got)


def test_proc_kcore(lockdown_mode: str) -> None:
    """/proc/kcore: LOCKDOWN_KCORE, blocked only under confidentiality."""
    got = _errno_of(lambda: os.close(os.open("/proc/kcore", os.O_RDONLY)))
    want = errno.EPERM if at_least(lockdown_mode, "confidentiality") else 0
    assert got == want, os.strerror(got)
