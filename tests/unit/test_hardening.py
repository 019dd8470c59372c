"""agent/hardening: what each host setting closes, read through a fake /proc/sys.

The real /proc/sys of this host is read by tests/integration/test_doctor.py through doctor;
here every value a kernel may show (or not have) is tried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import pytest

from agent.hardening import fuse_marks, ia32_emulation, read_settings, read_sysctl


def settings(values: Dict[str, Optional[str]]) -> Dict[str, object]:
    return {h.name: h for h in read_settings(lambda name: values.get(name))}


@pytest.mark.parametrize("value,ok", [("2", True), ("1", False), ("0", False), (None, False)])
def test_memfd_noexec(value: Optional[str], ok: bool) -> None:
    h = settings({"vm.memfd_noexec": value})["vm.memfd_noexec"]
    assert h.ok is ok  # type: ignore[attr-defined]
    if value is None:
        assert "not on this kernel" in h.detail  # type: ignore[attr-defined]


@pytest.mark.parametrize("values,ok", [
    ({"kernel.unprivileged_userns_clone": "0"}, True),
    ({"kernel.apparmor_restrict_unprivileged_userns": "1"}, True),
    ({"user.max_user_namespaces": "0"}, True),
    ({"kernel.unprivileged_userns_clone": "1", "user.max_user_namespaces": "1000"}, False),
    ({}, False),
])
def test_unprivileged_user_namespaces(values: Dict[str, Optional[str]], ok: bool) -> None:
    assert settings(values)["unprivileged user namespaces"].ok is ok  # type: ignore[attr-defined]


@pytest.mark.parametrize("value,ok", [("3", True), ("2", False), ("1", False), ("0", False),
                                      (None, False)])
def test_ptrace_scope(value: Optional[str], ok: bool) -> None:
    h = settings({"kernel.yama.ptrace_scope": value})["kernel.yama.ptrace_scope"]
    assert h.ok is ok  # type: ignore[attr-defined]


def test_leases_off_means_no_cached_verdicts() -> None:
    h = settings({"fs.leases-enable": "0"})["fs.leases-enable"]
    assert not h.ok and "never caches" in h.detail  # type: ignore[attr-defined]
    assert settings({})["fs.leases-enable"].ok  # type: ignore[attr-defined]


def test_read_sysctl_reads_this_host() -> None:
    assert read_sysctl("kernel.ostype") == "Linux"
    assert read_sysctl("no.such.setting") is None


@pytest.mark.parametrize("cmdline,config,ok", [
    ("quiet", {"CONFIG_IA32_EMULATION": "y"}, False),
    ("quiet ia32_emulation=0", {"CONFIG_IA32_EMULATION": "y"}, True),
    ("quiet", {"CONFIG_IA32_EMULATION": "y", "CONFIG_IA32_EMULATION_DEFAULT_DISABLED": "y"},
     True),
    ("ia32_emulation=1", {"CONFIG_IA32_EMULATION": "y",
                          "CONFIG_IA32_EMULATION_DEFAULT_DISABLED": "y"}, False),
    ("quiet", {"CONFIG_IA32_EMULATION": "n"}, True),
])
def test_ia32_emulation(cmdline: str, config: Dict[str, str], ok: bool) -> None:
    h = ia32_emulation(cmdline, lambda option: config.get(option, "n"))
    assert h.ok is ok and h.matters_for == "kill"


def test_fuse_marks_need_allow_sys_admin_access_on_a_host_with_fuse(tmp_path: Path) -> None:
    param = tmp_path / "allow_sys_admin_access"
    missing = fuse_marks(str(param), fuse_known=True)
    assert not missing.ok and "fusermount3" in missing.detail
    assert fuse_marks(str(param), fuse_known=False).ok  # no FUSE: nothing to mark
    param.write_text("N\n")
    present = fuse_marks(str(param), fuse_known=True)
    assert present.ok and present.value == "N"


@pytest.mark.parametrize("value", [None, "0", "5"])
def test_a_fuse_request_bound_is_reported_and_never_required(value: Optional[str]) -> None:
    h = settings({"fs.fuse.max_request_timeout": value})["fs.fuse.max_request_timeout"]
    assert h.ok is True  # type: ignore[attr-defined]
    assert ("the kernel aborts" in h.detail) is (value == "5")  # type: ignore[attr-defined]
