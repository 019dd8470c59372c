"""A real container runtime (runc) starting a real overlay rootfs: what "nothing breaks" means
for containers (issue 9, point 8), shared by the host and the VM tests.

An image is a directory with a static busybox as ``/bin/busybox``; ``run_container`` mounts
an overlay of it (the way containerd and podman lay out a rootfs: layers below, a private
upper on top), writes an OCI bundle, and has ``runc run`` start ``/bin/busybox echo …`` in
it. Everything lives below the test's own directories; the overlay is unmounted and the
container deleted in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static (scripts/setup.sh)
RUNC = "runc"


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str

    @property
    def said_hello(self) -> bool:
        return self.returncode == 0 and "hello-from-container" in self.stdout


def make_image(where: Path, sign_with: Optional[Path] = None) -> Path:
    """An image layer at ``where``: /bin/busybox (and /bin/sh), signed when a key is given."""
    from tests.policy_fixtures import sign

    (where / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, where / "bin" / "busybox")
    (where / "bin" / "busybox").chmod(0o755)
    (where / "bin" / "sh").symlink_to("busybox")
    if sign_with is not None:
        sign(where / "bin" / "busybox", sign_with)
    return where


def _spec(bundle: Path) -> None:
    subprocess.run([RUNC, "spec"], cwd=bundle, check=True, capture_output=True, timeout=30)
    config_file = bundle / "config.json"
    config = json.loads(config_file.read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/busybox", "echo", "hello-from-container"]
    config_file.write_text(json.dumps(config))


@contextlib.contextmanager
def bundle_of(image: Path, work: Path) -> Iterator[Path]:
    """An OCI bundle whose rootfs is an overlay of ``image`` mounted below ``work`` (which
    must be on a filesystem an overlay can use as its upper layer: a tmpfs, ext4): mounted
    until the block ends, so several containers can run from it."""
    base = work / f"eg-bundle-{uuid.uuid4().hex[:8]}"
    upper, scratch, bundle = base / "upper", base / "work", base / "bundle"
    rootfs = bundle / "rootfs"
    for d in (upper, scratch, rootfs):
        d.mkdir(parents=True)
    opts = f"lowerdir={image},upperdir={upper},workdir={scratch}"
    subprocess.run(["mount", "-t", "overlay", "eg-container", "-o", opts, str(rootfs)],
                   check=True, capture_output=True, timeout=10)
    try:
        _spec(bundle)
        yield bundle
    finally:
        subprocess.run(["umount", "-l", str(rootfs)], capture_output=True, timeout=10)


def runc_run(bundle: Path, timeout: float = 60.0) -> Ran:
    """``runc run`` of ``/bin/busybox echo hello-from-container`` in ``bundle``."""
    name = f"eg-test-{uuid.uuid4().hex[:8]}"
    try:
        proc = subprocess.run([RUNC, "run", name], cwd=bundle, capture_output=True, text=True,
                              timeout=timeout)
        return Ran(proc.returncode, proc.stdout, proc.stderr)
    finally:
        subprocess.run([RUNC, "delete", "--force", name], capture_output=True, timeout=30)


def run_container(image: Path, work: Path, timeout: float = 60.0) -> Ran:
    """One container on a fresh overlay of ``image``."""
    with bundle_of(image, work) as bundle:
        return runc_run(bundle, timeout)
