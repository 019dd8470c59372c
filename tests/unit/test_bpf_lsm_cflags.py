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

from agent.sensors.bpf.build import LOAD_PROBE_READ
from agent.sensors.bpf.build import program_text as kill_program_text
from agent.sensors.bpf_exec import BPF_DIR, SensorConfig
from agent.sensors.bpf_exec import build_cflags as exec_build_cflags
from agent.sensors.bpf_fmod_ret import fmod_ret_offsets
from agent.sensors.bpf_lsm import (
    DEFAULT_CONFIG,
    SOURCE,
    BpfLsmSensor,
    OffsetsFn,
    build_cflags,
    func_params,
    lsm_offsets,
    program_text,
    verdict_offsets,
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


PROBE_READ_HELPERS = {4, 45, 112, 113, 114, 115}  # probe_read{,_str,_user,_kernel,...}
D_PATH = 147  # enum bpf_func_id: BPF_FUNC_d_path


def compiled_ir(source: str, cflags: List[str]) -> Tuple[str, str]:
    """The LLVM IR BCC compiles ``source`` to (its stdout and stderr), and why the load
    failed, if it did. On this host the kernel refuses LSM and tracing programs (EPERM)."""
    import bcc

    with tempfile.TemporaryFile() as log:
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        loaded = None
        try:
            text = program_text(source) if source != "exec_sensor.c" else \
                kill_program_text(source, "kill", LOAD_PROBE_READ)
            loaded = bcc.BPF(text=text.encode(), cflags=cflags, debug=bcc.DEBUG_LLVM_IR)
        except Exception as exc:  # BCC raises bare Exception
            failure = str(exc)
        else:
            failure = ""
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if loaded is not None:
                loaded.cleanup()  # a kernel that allows them: loaded in allow-all, gone now
        log.seek(0)
        return log.read().decode("utf-8", "replace"), failure


def helper_calls(ir: str) -> set:  # type: ignore[type-arg]
    return {int(n) for n in re.findall(r"inttoptr \(i64 (\d+) to", ir)}


def indirect_calls(ir: str) -> list:  # type: ignore[type-arg]
    """Calls through a pointer (BPF "callx", opcode 0x8d), which the kernel refuses: what a
    BCC map call becomes when BCC did not rewrite it (code in an #included header)."""
    return re.findall(r"\bcall\b[^\n(]*%[\w.]+\(", ir)


@pytest.mark.parametrize(("source", "hook", "offsets_fn"), [
    (SOURCE, "lsm__bprm_check_security", lsm_offsets),
    ("exec_fmod_ret.c", "kmod_ret__security_bprm_check", fmod_ret_offsets),
])
def test_bcc_leaves_no_probe_read_in_the_program(source: str, hook: str,
                                                 offsets_fn: OffsetsFn) -> None:
    """What LLVM gets from BCC calls no bpf_probe_read* helper (decision 2): every kernel
    read is a BTF direct load, so the program loads under lockdown=confidentiality. Checked
    on the IR, where code from exec_verdict.h is inlined (BCC's preprocessor dump shows
    the main file only). The exec sensor, which does use probe reads, is the control."""
    ir, failure = compiled_ir(source, build_cflags(DEFAULT_CONFIG, offsets_fn=offsets_fn))
    assert f"@{hook}(" in ir and "error:" not in ir, ir[-2000:]
    calls = helper_calls(ir)
    assert D_PATH in calls and not calls & PROBE_READ_HELPERS, calls
    assert not indirect_calls(ir), indirect_calls(ir)[:3]
    if failure:
        assert "Failed to load program" in ir or "privileges" in failure, failure
    control, _ = compiled_ir("exec_sensor.c", exec_build_cflags(SensorConfig()))
    assert 113 in helper_calls(control)  # bpf_probe_read_kernel: the check can see one


def test_sensor_failure_is_sensor_unavailable_with_a_cause() -> None:
    try:
        sensor = BpfLsmSensor()
    except SensorUnavailable as exc:
        assert exc.backend == "bpf-lsm" and exc.cause
        return
    sensor.close()  # a kernel that runs BPF LSM programs: it loaded, which is fine too


def test_fmod_ret_offsets_count_security_inode_setattr() -> None:
    """fmod_ret hooks the kernel's own security_inode_setattr (not bpf_lsm_*, which exists
    only with CONFIG_BPF_LSM); 6.18 passes an idmap first, 6.1 does not."""
    blob = Path(VMLINUX_BTF).read_bytes()
    off = fmod_ret_offsets(Btf(blob), blob)
    assert off["EG_SETATTR_ARGS"] == func_params(blob, "security_inode_setattr") == 3
    assert off["EG_OFF_FILE_PATH"] == lsm_offsets(Btf(blob), blob)["EG_OFF_FILE_PATH"]
    with pytest.raises(LayoutError, match="security_no_such_hook has None parameters"):
        verdict_offsets(Btf(blob), blob, "security_no_such_hook")


def test_fmod_ret_sensor_failure_names_its_backend() -> None:
    from agent.sensors.bpf_fmod_ret import BpfFmodRetSensor

    try:
        sensor = BpfFmodRetSensor()
    except SensorUnavailable as exc:  # this host: the kernel refuses tracing programs
        assert exc.backend == "fmod-ret" and exc.cause
        assert "fmod-ret" in exc.diagnostics()
        return
    sensor.close()
