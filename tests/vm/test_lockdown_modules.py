"""Lockdown integrity and above refuse unsigned kernel modules; Debian's signed ones still load.

Debian signs its modules but does not set CONFIG_MODULE_SIG_FORCE, so without lockdown an
unsigned module loads (and taints the kernel); lockdown adds LOCKDOWN_MODULE_SIGNATURE,
checked in module_sig_check() before the ELF is even parsed. The unsigned module is a real
Debian module with its appended PKCS#7 signature cut off, so under ``none`` it really loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from pathlib import Path
from typing import Iterator

import pytest

from tests.vm.guest_env import at_least

pytestmark = pytest.mark.timeout(60)

MODULE = "crc7"  # a leaf library module: no dependencies, no hardware, nothing uses it here
SIG_MARKER = b"~Module signature appended~\n"
SIG_INFO = struct.Struct(">BBBBB3xI")  # struct module_signature: algo..key_id_len, sig_len
SYS_INIT_MODULE, SYS_FINIT_MODULE, SYS_DELETE_MODULE = 175, 313, 176  # x86_64
O_NONBLOCK = os.O_NONBLOCK
_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(nr: int, *args: object) -> int:
    """0 on success, else the errno."""
    res = _libc.syscall(ctypes.c_long(nr), *args)
    return 0 if res == 0 else ctypes.get_errno()


def _module_path() -> Path:
    path = Path(f"/lib/modules/{os.uname().release}/kernel/lib/{MODULE}.ko")
    if not path.is_file():
        pytest.fail(f"{path} missing: the guest kernel's modules are not installed")
    return path


def _strip_signature(data: bytes) -> bytes:
    if not data.endswith(SIG_MARKER):
        raise AssertionError("module has no appended signature: not a Debian-signed module")
    end = len(data) - len(SIG_MARKER)
    _algo, _hash, _id_type, signer_len, key_id_len, sig_len = SIG_INFO.unpack(
        data[end - SIG_INFO.size:end])
    unsigned = data[:end - SIG_INFO.size - sig_len - signer_len - key_id_len]
    assert unsigned[:4] == b"\x7fELF" and not unsigned.endswith(SIG_MARKER)
    return unsigned


def _loaded() -> bool:
    return os.path.exists(f"/sys/module/{MODULE}")


def _finit(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _syscall(SYS_FINIT_MODULE, ctypes.c_int(fd), ctypes.c_char_p(b""), ctypes.c_int(0))
    finally:
        os.close(fd)


@contextlib.contextmanager
def _unloaded_after() -> Iterator[None]:
    if _loaded():
        pytest.fail(f"{MODULE} is already loaded in the guest: the test cannot tell a load")
    try:
        yield
    finally:
        if _loaded():
            err = _syscall(SYS_DELETE_MODULE, ctypes.c_char_p(MODULE.encode()),
                           ctypes.c_int(O_NONBLOCK))
            assert err == 0, f"delete_module({MODULE}): {os.strerror(err)}"


def test_unsigned_module_refused_from_integrity(lockdown_mode: str, tmp_path: Path) -> None:
    unsigned = tmp_path / f"{MODULE}.ko"
    unsigned.write_bytes(_strip_signature(_module_path().read_bytes()))
    with _unloaded_after():
        err = _finit(unsigned)
        if at_least(lockdown_mode, "integrity"):
            assert err == errno.EPERM, os.strerror(err)
            assert not _loaded()
        else:
            assert err == 0, os.strerror(err)  # control: the same bytes load without lockdown
            assert _loaded()


def test_signed_module_still_loads(lockdown_mode: str) -> None:
    """Lockdown refuses what is unsigned, not modules as such."""
    with _unloaded_after():
        err = _finit(_module_path())
        assert err == 0, os.strerror(err)
        assert _loaded()


def test_init_module_garbage(lockdown_mode: str) -> None:
    """init_module() with bytes that are no ELF at all: lockdown refuses it for want of a
    signature (EPERM) before the ELF check; without lockdown the ELF check says ENOEXEC."""
    blob = b"\0execguard-not-a-module\0" * 64
    buf = ctypes.create_string_buffer(blob, len(blob))
    err = _syscall(SYS_INIT_MODULE, buf, ctypes.c_ulong(len(blob)), ctypes.c_char_p(b""))
    want = errno.EPERM if at_least(lockdown_mode, "integrity") else errno.ENOEXEC
    assert err == want, f"{os.strerror(err)} (want {os.strerror(want)})"
