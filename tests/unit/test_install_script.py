"""scripts/install.sh refuses to empty a PREFIX that is not its own venv (``venv --clear``
would delete everything in it). The full DESTDIR install is
tests/integration/test_service_unit.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_install_never_clears_a_foreign_prefix(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    prefix = dest / "srv" / "tools"
    prefix.mkdir(parents=True)
    (prefix / "precious.txt").write_text("someone else's\n")
    # a bad pip option makes a run that got past the check end quickly (after --clear)
    env = {**os.environ, "DESTDIR": str(dest), "PREFIX": "/srv/tools",
           "PIP_OPTS": "--no-such-pip-option"}
    result = subprocess.run(["./scripts/install.sh", "install"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "refusing to clear it" in result.stderr
    assert (prefix / "precious.txt").read_text() == "someone else's\n"
    assert not (dest / "etc").exists()  # nothing else was installed either
