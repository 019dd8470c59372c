"""The lockdown suite runs ONLY inside the test VM that scripts/vm-run.sh boots.

Outside it (no ``execguard.vmtest=1`` on the kernel command line) the run is refused with a
usage error: these tests load kernel modules and expect a given lockdown level, which the
host must never be put through. Inside, ``--lockdown-mode`` must name the level that is
really active, so a run can never pass under the wrong mode.

Fixtures for VM tests (the LSM tests in ``test_lsm_*.py`` included):
- ``lockdown_mode``: ``none`` | ``integrity`` | ``confidentiality`` (checked against the kernel)
- ``lockdown_origin``: ``runtime`` (raised by guest.sh between runs) or ``boot`` (``lockdown=``)
- ``vm_material``: ``tests.policy_fixtures.Material`` built on the host before boot (Go
  binaries ``app``, ``app-dirty``, ``tool``; P-256 keys ``a``, ``b``; a shell script). Sign
  a copy with ``tests.policy_fixtures.copy_signed``.
- ``vm_results``: the host-shared results directory (writable; survives the guest).
- ``run_label``: ``none`` | ``integrity`` | ``confidentiality`` | ``confidentiality-boot``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.goinfo import parse_bytes
from tests.policy_fixtures import GoBin, Material
from tests.vm.guest_env import (
    LEVELS,
    LOCKDOWN_FILE,
    ORIGINS,
    VM_MARKER,
    in_test_vm,
    kernel_cmdline,
    load_manifest,
    read_lockdown,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("execguard-vm", "execguard lockdown VM suite")
    group.addoption("--lockdown-mode", choices=LEVELS, default=None,
                    help="the lockdown level guest.sh set for this run (checked)")
    group.addoption("--lockdown-origin", choices=ORIGINS, default="runtime",
                    help="how that level was reached: raised at runtime or lockdown= at boot")
    group.addoption("--vm-results", default=None,
                    help="the results directory shared with the host (holds fixtures/)")


def pytest_configure(config: pytest.Config) -> None:
    if not in_test_vm():
        raise pytest.UsageError(
            f"tests/vm runs only inside the execguard test VM ({VM_MARKER} is not on the "
            f"kernel command line: {' '.join(kernel_cmdline())[:200]}). Run `make vm-test`.")
    mode = config.getoption("--lockdown-mode", default=None)
    if mode is None:
        raise pytest.UsageError("tests/vm needs --lockdown-mode (guest.sh passes it)")
    actual = read_lockdown()
    if actual != mode:
        raise pytest.UsageError(
            f"--lockdown-mode={mode} but {LOCKDOWN_FILE} says {actual!r}: refusing to run")
    if config.getoption("--lockdown-origin") == "boot" and f"lockdown={mode}" not in (
            kernel_cmdline()):
        raise pytest.UsageError(f"--lockdown-origin=boot but lockdown={mode} is not on the "
                                "kernel command line")
    if config.getoption("--vm-results") is None:
        raise pytest.UsageError("tests/vm needs --vm-results (guest.sh passes it)")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:  # type: ignore[type-arg]
    """``@pytest.mark.lockdown_runs("integrity", "confidentiality-boot")``: the test belongs
    to those runs (labels as ``run_label``) only and is deselected (not skipped) in the
    others: to keep the four runs inside the CI budget, and for a test whose traces outlive
    it (pinned BPF programs stay until the VM powers off), to run where nothing follows."""
    mode = config.getoption("--lockdown-mode")
    label = mode if config.getoption("--lockdown-origin") == "runtime" else f"{mode}-boot"
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("lockdown_runs")
        (drop if marker is not None and label not in marker.args else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def lockdown_mode(pytestconfig: pytest.Config) -> str:
    mode = pytestconfig.getoption("--lockdown-mode")
    assert isinstance(mode, str)
    return mode


@pytest.fixture(scope="session")
def lockdown_origin(pytestconfig: pytest.Config) -> str:
    origin = pytestconfig.getoption("--lockdown-origin")
    assert isinstance(origin, str)
    return origin


@pytest.fixture(scope="session")
def run_label(lockdown_mode: str, lockdown_origin: str) -> str:
    """The run's name in result files: the mode, with ``-boot`` for the boot-time run."""
    return lockdown_mode if lockdown_origin == "runtime" else f"{lockdown_mode}-boot"


@pytest.fixture(scope="session")
def vm_results(pytestconfig: pytest.Config) -> Path:
    return Path(str(pytestconfig.getoption("--vm-results")))


@pytest.fixture(scope="session")
def vm_material(vm_results: Path) -> Material:
    try:
        files = load_manifest(vm_results / "fixtures")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    bins = {}
    for key, path in files.items():
        if key.startswith("bin:"):
            name = key[len("bin:"):]
            bins[name] = GoBin(Path(path), parse_bytes(Path(path).read_bytes(), name))

    def pick(prefix: str) -> dict:  # type: ignore[type-arg]
        return {k[len(prefix):]: Path(v) for k, v in files.items() if k.startswith(prefix)}

    return Material(bins, pick("key:"), pick("private:"), Path(files["script"]))
