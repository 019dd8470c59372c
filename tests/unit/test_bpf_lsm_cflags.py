"""Host-side checks of the BPF LSM program: its cflags from this kernel's BTF, the BTF
function lookup, and (decision 2) that BCC leaves no bpf_probe_read* in what it compiles."""

from __future__ import annotations

import os
import re
import struct
import tempfile
from pathlib import Path
from typing import List, Tuple

import pytest

from agent.sensors.bpf_exec import SensorConfig
from agent.sensors.bpf_lsm import (
    BPF_DIR,
    DEFAULT_CONFIG,
    SOURCE,
    BpfLsmSensor,
    build_cflags,
    func_params,
    lsm_offsets,
)
from agent.sensors.errors import SensorUnavailable
from agent.sensors.kernel_layout import VMLINUX_BTF, Btf, LayoutError


def btf_blob(funcs: List[Tuple[str, int]]) -> bytes:
    """A minimal BTF: an int, then per function a FUNC_PROTO with n int params and its FUNC."""
    strings = b"\0int\0"
    types = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", 32)  # id 1: int
    tid = 1
    for name, nparams in funcs:
        types += struct.pack("<III", 0, (13 << 24) | nparams, 1)
        types += b"".join(struct.pack("<II", 0, 1) for _ in range(nparams))
        proto = tid = tid + 1
        types += struct.pack("<III", len(strings), 12 << 24, proto)
        tid += 1
        strings += name.encode() + b"\0"
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_func_params_counts_the_prototype() -> None:
    blob = btf_blob([("bpf_lsm_inode_setattr_x", 5), ("bpf_lsm_inode_setattr", 3)])
    assert func_params(blob, "bpf_lsm_inode_setattr") == 3
    assert func_params(blob, "bpf_lsm_inode_setattr_x") == 5
    assert func_params(btf_blob([("bpf_lsm_inode_setattr", 2)]), "bpf_lsm_inode_setattr") == 2
    assert func_params(blob, "bpf_lsm_file_open") is None


def test_truncated_btf_is_a_clear_error() -> None:
    blob = btf_blob([("bpf_lsm_inode_setattr", 3)])
    with pytest.raises(LayoutError, match="malformed BTF"):
        func_params(blob[:30], "bpf_lsm_inode_setattr")


def test_offsets_from_this_kernels_btf() -> None:
    blob = Path(VMLINUX_BTF).read_bytes()
    btf = Btf(blob)
    off = lsm_offsets(btf, blob)
    assert off["EG_OFF_FILE_PATH"] == btf.require("file", "f_path").offset
    assert off["EG_OFF_DENTRY_INODE"] == btf.require("dentry", "d_inode").offset
    assert off["EG_OFF_FILE_MODE"] == btf.require("file", "f_mode").offset
    assert "EG_OFF_BPRM_FILENAME" not in off  # the path comes from bpf_d_path
    # inode_setattr gained a leading idmap in 6.8; this host runs 6.18
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    assert off["EG_SETATTR_ARGS"] == (3 if release >= (6, 8) else 2)
    flags = build_cflags(DEFAULT_CONFIG)
    assert f"-I{BPF_DIR}" in flags and "-DEG_RINGBUF_PAGES=256" in flags
    assert f"-DEG_SETATTR_ARGS={off['EG_SETATTR_ARGS']}" in flags


def test_bad_btf_and_bad_knobs_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    with pytest.raises(SensorUnavailable, match=f"{missing}: cannot read kernel BTF"):
        build_cflags(DEFAULT_CONFIG, str(missing))
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(SensorUnavailable, match="cannot read struct offsets"):
        build_cflags(DEFAULT_CONFIG, str(junk))
    with pytest.raises(ValueError, match="power of two"):
        build_cflags(SensorConfig(ringbuf_pages=3))


def test_bcc_leaves_no_probe_read_in_the_program() -> None:
    """What BCC hands to LLVM (its rewritten C) holds no bpf_probe_read*: every kernel read
    is a BTF direct load, so the program loads under lockdown=confidentiality. On this host
    the kernel then refuses BPF LSM programs (EPERM), which must be the only failure."""
    import bcc

    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        loaded = None
        try:
            loaded = bcc.BPF(src_file=os.path.join(BPF_DIR, SOURCE),
                             cflags=build_cflags(DEFAULT_CONFIG), debug=bcc.DEBUG_PREPROCESSOR)
        except Exception as exc:  # BCC raises bare Exception
            failure = str(exc)
        else:
            failure = ""
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if loaded is not None:
                loaded.cleanup()  # a kernel that allows BPF LSM: loaded in allow-all, gone now
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    assert "lsm__bprm_check_security" in code and "bpf_d_path" in code
    assert not [ln for ln in code.splitlines() if "probe_read" in ln]
    if failure:
        assert "Failed to load program" in text or "privileges" in failure, failure
        assert "error:" not in text  # not a compile error


def test_sensor_failure_is_sensor_unavailable_with_a_cause() -> None:
    try:
        sensor = BpfLsmSensor()
    except SensorUnavailable as exc:
        assert exc.backend == "bpf-lsm" and exc.cause
        return
    sensor.close()  # a kernel that runs BPF LSM programs: it loaded, which is fine too
