"""doctor's exit codes and rendering, over hand-built probe results."""

from __future__ import annotations

import argparse
import json
from typing import Dict

import pytest

from agent.cli import doctor_cmd
from agent.sensors import probe
from agent.sensors.probe import ProbeResult


def args(**kw: object) -> argparse.Namespace:
    base: Dict[str, object] = {"json": True, "no_compile": True, "backend": "auto"}
    base.update(kw)
    return argparse.Namespace(**base)


def fake_probes(*ok: str) -> Dict[str, ProbeResult]:
    names = ("kernel", "btf", "lsm", "bpf-lsm", "fmod-ret", "fanotify-exec", "fanotify-open")
    return {n: ProbeResult(n, n in ok, "yes" if n in ok else "no", None) for n in names}


@pytest.fixture(autouse=True)
def no_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "active_lsms", lambda: ("capability", "bpf"))
    monkeypatch.setattr(probe, "lockdown_mode", lambda: "integrity")


def test_enforcing_backend_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(probe, "run_probes", lambda compile: fake_probes("fanotify-exec"))
    assert doctor_cmd.run(args()) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["backend"]["chosen"] == "fanotify-exec"
    assert rep["lsm"] == ["capability", "bpf"] and rep["lockdown"] == "integrity"
    assert rep["probes"]["fanotify-exec"] == {"ok": True, "detail": "yes", "hint": None}


def test_audit_only_exits_1_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(probe, "run_probes", lambda compile: fake_probes())
    assert doctor_cmd.run(args(json=False)) == 1
    out = capsys.readouterr().out
    assert "backend: audit-only" in out
    assert "only audit-only is possible" in out


def test_internal_error_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(compile: bool) -> Dict[str, ProbeResult]:
        raise RuntimeError("broken")

    monkeypatch.setattr(probe, "run_probes", boom)
    assert doctor_cmd.run(args()) == 2
    assert "internal error" in capsys.readouterr().err


def test_hints_show_only_for_failures(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    probes = fake_probes("bpf-lsm", "btf", "lsm")
    probes["fmod-ret"] = ProbeResult("fmod-ret", False, "load failed: EPERM", "try fanotify")
    probes["kernel"] = ProbeResult("kernel", True, "6.18", "never shown")
    monkeypatch.setattr(probe, "run_probes", lambda compile: probes)
    assert doctor_cmd.run(args(json=False)) == 0
    out = capsys.readouterr().out
    assert "hint: try fanotify" in out and "never shown" not in out
    assert "backend: bpf-lsm (" in out


def test_the_parser_registers_doctor() -> None:
    parser = argparse.ArgumentParser()
    doctor_cmd.add_parser(parser.add_subparsers())
    ns = parser.parse_args(["doctor", "--json", "--no-compile", "--backend", "kill"])
    assert ns.run is doctor_cmd.run and ns.json and ns.no_compile and ns.backend == "kill"
    with pytest.raises(SystemExit):
        parser.parse_args(["doctor", "--backend", "selinux"])
