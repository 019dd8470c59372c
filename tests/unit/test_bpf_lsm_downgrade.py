"""On this host BPF LSM programs cannot load (EPERM, see `execguard doctor`): asked for
bpf-lsm, the real agent records why and downgrades one level at a time to a backend whose
self-test passes. Scoped to a tmpfs this test owns; the agent is stopped in ``finally``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.agent_fixtures import exec_file, running_agent, scoped_tmpfs

pytestmark = pytest.mark.timeout(120)


def test_bpf_lsm_unavailable_downgrades_and_says_why(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(key)], check=True,
                   capture_output=True, timeout=30)
    pub = tmp_path / "k.pub"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True, timeout=30)
    with scoped_tmpfs("16m") as scope:
        unsigned = scope / "true"
        unsigned.write_bytes(Path("/bin/true").read_bytes())
        unsigned.chmod(0o755)
        with running_agent(tmp_path, "--backend", "bpf-lsm", "--mode", "enforce", "--scope",
                           str(scope), "--key", str(pub), "--audit", "off",
                           expect_state=("degraded",)) as agent:
            status = agent.status()
            skipped = {s["backend"]: s["why"] for s in status["skipped_backends"]}
            assert "bpf-lsm" in skipped and "fmod-ret" in skipped, skipped
            assert "bpf-lsm" in skipped["bpf-lsm"]  # the sensor's own diagnosis
            assert status["backend"] not in ("bpf-lsm", "fmod-ret")
            assert status["backend"] == "fanotify-exec"  # FAN_OPEN_EXEC_PERM works here
            # the downgraded backend decides (not a Go binary: the default rules allow it)
            assert exec_file(unsigned).returncode == 0
            record = agent.wait_decision(str(unsigned))[-1]
            assert record["event"]["backend"] == "fanotify-exec"
