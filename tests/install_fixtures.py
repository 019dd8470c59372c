"""execguard as an operator installs it: ``scripts/install.sh install`` (what ``make install``
runs) into a temporary root, so tests run the installed venv, its ``execguard`` script and
the unit it wrote, not this checkout.

``DESTDIR`` stays empty and every directory the script writes to (``PREFIX``, ``UNITDIR``,
``SYSCONFDIR``, ``DATADIR``) is under the test's root: the venv then lives where its
scripts say it does and runs in place. (A ``DESTDIR`` staging install cannot run before it
is copied to its final path; tests/integration/test_service_unit.py checks that layout.)
The script calls ``systemctl daemon-reload`` only where systemd is PID 1, which it is not
here.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 540.0


@dataclass(frozen=True)
class Installed:
    root: Path  # stands in for /
    prefix: Path  # the venv: $PREFIX

    @property
    def execguard(self) -> Path:
        return self.prefix / "bin" / "execguard"

    @property
    def unit(self) -> Path:
        return self.root / "etc" / "systemd" / "system" / "execguard.service"

    @property
    def defaults(self) -> Path:
        return self.root / "etc" / "default" / "execguard"

    def env(self) -> Dict[str, str]:
        """The environment to run it in: nothing that would import this checkout instead."""
        return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def install(root: Path) -> Installed:
    """Run the install script into ``root``; fails with the script's own output."""
    done = Installed(root, root / "opt" / "execguard")
    env = {**done.env(), "DESTDIR": "", "PREFIX": str(done.prefix),
           "UNITDIR": str(done.unit.parent), "SYSCONFDIR": str(root / "etc"),
           "DATADIR": str(root / "usr" / "share")}
    proc = subprocess.run(["./scripts/install.sh", "install"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/install.sh install into {root} exited {proc.returncode}:\n"
                           f"{proc.stdout}{proc.stderr}")
    return done
