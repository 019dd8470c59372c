"""Why the service keeps CAP_LEASE (packaging/execguard.service): the writers probe takes a
read lease, which the kernel grants on a file another uid owns only with CAP_LEASE; refused,
it counts as "has writers" (the safe answer), so without the capability no such file is
ever remembered or published and every read-open of one looks like a write-open. Real
kernel, real capability sets (``setpriv --bounding-set``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="capability sets need root")

PROBE = ("import os, sys; from agent.writers import has_writers; "
         "fd = os.open(sys.argv[1], os.O_RDONLY); print(has_writers(fd))")
UNIT_CAPS = ("-all,+sys_admin,+bpf,+perfmon,+dac_read_search,+sys_ptrace,+kill,+lease,"
             "+audit_write")


def probe(path: Path, bounding: str) -> str:
    ran = subprocess.run(["setpriv", f"--bounding-set={bounding}", f"--inh-caps={bounding}",
                          sys.executable, "-c", PROBE, str(path)],
                         capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parents[2])
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.strip()


def test_the_units_capabilities_let_the_writers_probe_see_another_users_file(
        tmp_path: Path) -> None:
    other = tmp_path / "owned-by-nobody"
    other.write_bytes(b"\x7fELF")
    os.chown(other, 65534, 65534)
    assert probe(other, UNIT_CAPS) == "False"  # no writer, and the probe can tell
    assert probe(other, UNIT_CAPS.replace(",+lease", "")) == "True"  # refused: "writers"
