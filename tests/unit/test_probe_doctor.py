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
    names = ("kernel", "btf", "bpf-programs", "lsm", "bpf-lsm", "fmod-ret", "fanotify-exec",
             "fanotify-open")
    return {n: ProbeResult(n, n in ok, "yes" if n in ok else "no", None) for n in names}


@pytest.fixture(autouse=True)
def no_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "active_lsms", lambda: ("capability", "bpf"))
    monkeypatch.setattr(probe, "lockdown_mode", lambda: "integrity")


def test_enforcing_backend_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(probe, "run_probes",
                        lambda compile, timeout=None: fake_probes("fanotify-exec"))
    assert doctor_cmd.run(args()) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["backend"]["chosen"] == "fanotify-exec"
    assert rep["lsm"] == ["capability", "bpf"] and rep["lockdown"] == "integrity"
    assert rep["probes"]["fanotify-exec"] == {"ok": True, "detail": "yes", "hint": None}


def test_audit_only_exits_1_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(probe, "run_probes", lambda compile, timeout=None: fake_probes())
    assert doctor_cmd.run(args(json=False)) == 1
    out = capsys.readouterr().out
    assert "backend: audit-only" in out
    assert "only audit-only is possible" in out


def test_internal_error_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(compile: bool, timeout: object = None) -> Dict[str, ProbeResult]:
        raise RuntimeError("broken")

    monkeypatch.setattr(probe, "run_probes", boom)
    assert doctor_cmd.run(args()) == 2
    assert "internal error" in capsys.readouterr().err


def test_hints_show_only_for_failures(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    probes = fake_probes("bpf-lsm", "btf", "bpf-programs", "lsm")
    probes["fmod-ret"] = ProbeResult("fmod-ret", False, "load failed: EPERM", "try fanotify")
    probes["kernel"] = ProbeResult("kernel", True, "6.18", "never shown")
    monkeypatch.setattr(probe, "run_probes", lambda compile, timeout=None: probes)
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


def test_probe_timeout_flag_and_environment_reach_the_probes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = []

    def record(compile: bool, timeout: object = None) -> Dict[str, ProbeResult]:
        seen.append(timeout)
        return fake_probes("fanotify-exec")

    monkeypatch.setattr(probe, "run_probes", record)
    monkeypatch.delenv("EXECGUARD_PROBE_TIMEOUT", raising=False)
    assert doctor_cmd.run(args()) == 0
    monkeypatch.setenv("EXECGUARD_PROBE_TIMEOUT", "240")
    assert doctor_cmd.run(args()) == 0
    capsys.readouterr()
    assert doctor_cmd.run(args(probe_timeout=90.0)) == 0  # the flag wins over the variable
    assert seen == [30.0, 240.0, 90.0]
    assert json.loads(capsys.readouterr().out)["probe_timeout_s"] == 90.0


@pytest.mark.parametrize("bad", ["soon", "0", "-5", "nan", "inf", "99999"])
def test_bad_probe_timeout_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    monkeypatch.setattr(probe, "run_probes", lambda compile, timeout=None: fake_probes())
    monkeypatch.setenv("EXECGUARD_PROBE_TIMEOUT", bad)
    assert doctor_cmd.run(args()) == 2
    err = capsys.readouterr().err
    assert "EXECGUARD_PROBE_TIMEOUT" in err and repr(bad) in err
    with pytest.raises(argparse.ArgumentTypeError, match="--probe-timeout"):
        doctor_cmd.probe_seconds(bad)


def test_doctor_says_which_backends_can_protect_the_agent() -> None:
    """Issue 10: fanotify and kill cannot refuse root's signals; doctor says so, and says
    bpf-lsm can (the VM suite shows it doing so: tests/vm/test_tamper_vm.py)."""
    for backend in ("fanotify-exec", "kill", "audit-only", None):
        t = doctor_cmd.tamper_resistance(backend)
        assert t["self_protection"] is False and "fail-open" in t["detail"], backend
    t = doctor_cmd.tamper_resistance("fmod-ret")  # pinned, but root's kill or rm ends it
    assert t["self_protection"] is False and "rm of the pins" in t["detail"]
    t = doctor_cmd.tamper_resistance("bpf-lsm")
    assert t["self_protection"] is True and "keep-enforcing" in t["detail"]
    assert t["orphans"] == []  # no agent of this host's suite ever pins (no BPF LSM here)
