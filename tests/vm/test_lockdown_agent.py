"""The agent's own view of each lockdown mode: doctor's report and the BCC exec sensor.

The exec sensor (bpf/exec_sensor.c) is a raw tracepoint that reads task and inode fields
at BTF offsets with ``bpf_probe_read_kernel``: it loads and passes its self-test under
``none`` and ``integrity``; under ``confidentiality`` the verifier refuses it, so the kill
backend is not available there (the BPF LSM backend, which uses BTF direct loads, is).
Doctor's JSON for each mode is kept in the results directory for docs/vm-testing.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from tests.vm.guest_env import REPO, at_least

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def doctor(run_label: str, vm_results: Path) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "agent", "doctor", "--json"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=240, check=False)
    (vm_results / f"doctor-{run_label}.json").write_text(proc.stdout)
    assert proc.returncode in (0, 1), f"doctor exit {proc.returncode}: {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    assert isinstance(report, dict)
    return report


def test_doctor_reports_lockdown_and_bpf_lsm(doctor: Dict[str, Any], lockdown_mode: str) -> None:
    assert doctor["lockdown"] == lockdown_mode
    assert "bpf" in doctor["lsm"]
    assert doctor["probes"]["lockdown"]["detail"] == lockdown_mode
    assert doctor["probes"]["btf"]["ok"]


def test_doctor_finds_a_blocking_backend(doctor: Dict[str, Any]) -> None:
    """Whatever lockdown takes away, an enforcing backend remains (exit 0, enforcing).

    Which one depends on doctor's BCC probes, which get 30 s in all (CHILD_TIMEOUT in
    agent/sensors/bcc_probe.py): under TCG they may time out, and doctor then falls back to
    fanotify. The lockdown facts themselves are proven directly in test_lockdown_bpf.py.
    """
    backend = doctor["backend"]
    assert backend["enforcing"], backend
    assert backend["chosen"] != "audit-only", backend


def test_exec_sensor_selftest(lockdown_mode: str, run_label: str, vm_results: Path) -> None:
    from agent.sensors.bpf_exec import BpfExecSensor
    from agent.sensors.errors import SensorUnavailable
    from agent.sensors.selftest import run_selftest

    outcome = vm_results / f"exec-sensor-{run_label}.txt"
    if at_least(lockdown_mode, "confidentiality"):
        with pytest.raises(SensorUnavailable, match="bpf_probe_read_kernel") as info:
            BpfExecSensor()
        outcome.write_text(f"refused: {info.value}\n")
        return
    try:
        with BpfExecSensor() as sensor:
            result = run_selftest(sensor)
    except SensorUnavailable as exc:
        outcome.write_text(f"unavailable: {exc}\n")
        raise
    outcome.write_text(f"selftest ok={result.ok}: {result.detail}\n")
    assert result.ok, result.detail
    assert result.identity_ok and result.kill_ok
