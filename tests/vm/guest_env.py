"""Facts about the test VM guest, shared by the conftest, the tests and the host-side prebuild.

Nothing here writes to ``/sys/kernel/security/lockdown``: only ``tests/vm/guest.sh`` raises
lockdown, and only after it has seen the VM marker on the kernel command line.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

VM_MARKER = "execguard.vmtest=1"  # scripts/vm-run.sh puts it on the guest's command line
LOCKDOWN_FILE = "/sys/kernel/security/lockdown"
LEVELS = ("none", "integrity", "confidentiality")  # the kernel's order; raising is one-way
ORIGINS = ("runtime", "boot")  # raised by guest.sh between runs, or set by lockdown= at boot
REPO = Path(__file__).resolve().parents[2]


def kernel_cmdline() -> List[str]:
    with open("/proc/cmdline", encoding="utf-8", errors="replace") as f:
        return f.read().split()


def in_test_vm() -> bool:
    return VM_MARKER in kernel_cmdline()


def read_lockdown() -> Optional[str]:
    """The active lockdown level (the bracketed word), or None without the lockdown LSM."""
    try:
        with open(LOCKDOWN_FILE, encoding="ascii") as f:
            text = f.read()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    raise ValueError(f"{LOCKDOWN_FILE}: no [active] level in {text!r}")


def at_least(mode: str, level: str) -> bool:
    """True when lockdown ``mode`` blocks everything that ``level`` blocks."""
    return LEVELS.index(mode) >= LEVELS.index(level)


def active_lsms() -> List[str]:
    with open("/sys/kernel/security/lsm", encoding="ascii") as f:
        return [s for s in f.read().strip().split(",") if s]


# --- prebuilt fixtures: Go toolchains crawl under TCG, so the host builds them once ---------

MANIFEST = "manifest.json"


def prebuild(out: Path) -> Dict[str, str]:
    """Host side (scripts/vm-run.sh): build the policy test material into ``out``.

    The same Go programs and OpenSSL P-256 keys as tests/policy_fixtures.py, so a VM test can
    use exactly what the host integration tests use; and the agent as ``make install`` puts it
    (the guest sees the host's root file system, so the venv runs there unchanged).
    """
    from tests.policy_fixtures import _build  # the host tests' own builder

    out.mkdir(parents=True, exist_ok=True)
    work = out / "build"
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
    bins = _build(work)
    files: Dict[str, str] = {f"bin:{name}": str(b.path) for name, b in bins.items()}
    for name in ("a", "b"):
        priv, pub = out / f"{name}.pem", out / f"{name}.pub"
        for cmd in (["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                     "ec_paramgen_curve:P-256", "-out", str(priv)],
                    ["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        files[f"private:{name}"], files[f"key:{name}"] = str(priv), str(pub)
    script = out / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    files["script"] = str(script)
    from tests.attacks.harness import build_all  # the attack suite's programs (gcc, go)

    files.update({f"attack:{n}": str(p) for n, p in build_all(out / "attacks").items()})
    from tests.install_fixtures import install  # `make install`'s script, into out/installed

    installed = out / "installed"
    if installed.exists():
        subprocess.run(["rm", "-rf", str(installed)], check=True)
    files["installed:root"] = str(install(installed).root)
    (out / MANIFEST).write_text(json.dumps(files, indent=1, sort_keys=True) + "\n")
    return files


def load_manifest(out: Path) -> Dict[str, str]:
    path = out / MANIFEST
    try:
        files = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: prebuilt VM fixtures missing or unreadable ({exc}); "
                           "scripts/vm-run.sh builds them on the host before boot") from exc
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise RuntimeError(f"{path}: not a name -> path map")
    missing = [p for p in files.values() if not os.path.exists(p)]
    if missing:
        raise RuntimeError(f"{path}: listed files are missing: {missing}")
    return files


if __name__ == "__main__":  # python -m tests.vm.guest_env prebuild OUTDIR
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "prebuild":
        sys.exit("usage: python -m tests.vm.guest_env prebuild OUTDIR")
    for key, value in sorted(prebuild(Path(sys.argv[2]).resolve()).items()):
        print(f"{key}\t{value}")
