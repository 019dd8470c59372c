"""The backend the agent runs: a named one (``--backend NAME``) is that backend or a failed
start with its reason (exit 2), never a quiet downgrade; ``auto`` takes the best this host
passes and says why it skipped the others. On this host BPF LSM programs cannot load (EPERM,
see `execguard doctor`), which makes bpf-lsm the real unavailable backend. Scoped to a tmpfs
this test owns; every agent is stopped in ``finally``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_fixtures import REPO, exec_file, running_agent, scoped_tmpfs, wait_for

pytestmark = pytest.mark.timeout(180)


def keypair(tmp: Path) -> Path:
    key, pub = tmp / "k.pem", tmp / "k.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(key)], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True, timeout=30)
    return pub


def test_a_named_backend_that_cannot_start_fails_the_start_with_its_reason(
        tmp_path: Path) -> None:
    pub = keypair(tmp_path)
    with scoped_tmpfs("16m") as scope:
        unsigned = scope / "true"
        unsigned.write_bytes(Path("/bin/true").read_bytes())
        unsigned.chmod(0o755)
        done = subprocess.run(
            [sys.executable, "-m", "agent", "run", "--backend", "bpf-lsm", "--mode", "enforce",
             "--scope", str(scope), "--key", str(pub), "--audit", "off", "--state-dir",
             str(tmp_path / "state"), "--log-dir", str(tmp_path / "log"),
             "--status-interval", "0"], capture_output=True, text=True, timeout=150,
            cwd=str(REPO))
        assert done.returncode == 2, done
        err = done.stderr[done.stderr.index("execguard run: "):]
        # the backend's own diagnosis, then what to do
        assert err.startswith("execguard run: --backend bpf-lsm cannot start here: bpf-lsm: "
                              "backend bpf-lsm is unavailable: the kernel refused"), err
        assert "nothing was enforced" in err and "--backend auto" in err, err
        assert "fanotify-exec" not in done.stderr, "no other backend was tried"
        assert not (tmp_path / "state" / "control.sock").exists()
        assert exec_file(unsigned).returncode == 0  # and nothing holds the scope


def test_auto_takes_the_best_backend_this_host_passes_and_says_why(tmp_path: Path) -> None:
    pub = keypair(tmp_path)
    with scoped_tmpfs("16m") as scope:
        unsigned = scope / "true"
        unsigned.write_bytes(Path("/bin/true").read_bytes())
        unsigned.chmod(0o755)
        with running_agent(tmp_path, "--backend", "auto", "--mode", "enforce", "--scope",
                           str(scope), "--key", str(pub), "--audit", "off") as agent:
            status = agent.status()
            skipped = {s["backend"]: s["why"] for s in status["skipped_backends"]}
            assert "bpf-lsm" in skipped and "fmod-ret" in skipped, skipped
            assert status["backend"] == "fanotify-exec" and status["state"] == "ready"
            # it decides (not a Go binary: the default rules allow it)
            assert exec_file(unsigned).returncode == 0
            record = agent.wait_decision(str(unsigned))[-1]
            assert record["event"]["backend"] == "fanotify-exec"
            # its console line reaches a stdout that is a file, not a terminal (journald's
            # case), while it runs: written a line at a time, not held in a block buffer
            wait_for(lambda: any(str(unsigned) in line and "ALLOW" in line
                                 for line in agent.output.read_text().splitlines()), 10)
