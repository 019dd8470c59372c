"""The BPF program text the sensors compile (agent/sensors/bpf/build.py): exec_verdict.h
is pasted in place of its ``#include``, and the kill program gets the same header with its
kernel reads turned into probe reads. A change to the header's ``EG_LOAD`` line must stop
the kill sensor loudly, never compile it into direct loads a tracepoint cannot make."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.sensors.bpf import build
from agent.sensors.bpf.build import (
    LOAD_DIRECT,
    LOAD_PROBE_READ,
    SHARED,
    SHARED_INCLUDE,
    program_text,
)
from agent.sensors.errors import SensorUnavailable


def test_every_bpf_program_gets_the_shared_header_once() -> None:
    for source in ("exec_lsm.c", "exec_fmod_ret.c", "exec_sensor.c"):
        text = program_text(source, "test")
        assert SHARED_INCLUDE not in text and text.count(f"/* ---- {SHARED}") == 1
        assert "eg_place(" in text and LOAD_DIRECT in text


def test_the_kill_program_reads_the_kernel_with_probe_reads() -> None:
    text = program_text("exec_sensor.c", "kill", LOAD_PROBE_READ)
    assert LOAD_PROBE_READ in text and LOAD_DIRECT not in text
    assert "RAW_TRACEPOINT_PROBE(sched_process_exec)" in text
    assert "TRACEPOINT_PROBE(syscalls, sys_enter_mmap)" in text


def fake_tree(tmp_path: Path, header: str) -> Path:
    (tmp_path / SHARED).write_text(header)
    (tmp_path / "prog.c").write_text(f"/* a program */\n{SHARED_INCLUDE}\nint x;\n")
    return tmp_path


def test_a_changed_load_definition_stops_the_kill_program(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    header = "#define EG_LOAD(type, base, off) (*(volatile type *)((char *)(base) + (off)))\n"
    monkeypatch.setattr(build, "BPF_DIR", str(fake_tree(tmp_path, header)))
    assert "volatile" in program_text("prog.c", "bpf-lsm")  # direct loads: pasted as it is
    with pytest.raises(SensorUnavailable, match="its EG_LOAD definition changed") as err:
        program_text("prog.c", "kill", LOAD_PROBE_READ)
    assert err.value.backend == "kill" and SHARED in err.value.cause


def test_missing_files_and_two_includes_are_clear_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "BPF_DIR", str(fake_tree(tmp_path, LOAD_DIRECT + "\n")))
    with pytest.raises(SensorUnavailable, match=r"nothing\.c: cannot read the BPF program"):
        program_text("nothing.c", "kill")
    (tmp_path / "twice.c").write_text(f"{SHARED_INCLUDE}\n{SHARED_INCLUDE}\n")
    with pytest.raises(SensorUnavailable, match="expected one"):
        program_text("twice.c", "kill")
    (tmp_path / "alone.c").write_text("int y;\n")
    assert program_text("alone.c", "kill") == "int y;\n"  # no header: returned as it is
