"""Host probes read what they should, explain failures, never raise, and are memoized."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from agent.sensors import probe
from agent.sensors.probe import ProbeResult


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    probe.clear_cache()
    yield
    probe.clear_cache()


@pytest.fixture
def fake_securityfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(probe, "SECURITYFS", str(tmp_path))
    monkeypatch.setattr(probe, "_mounted_fstype", lambda path: "securityfs")
    return tmp_path


def test_lockdown_is_the_bracketed_word(fake_securityfs: Path) -> None:
    (fake_securityfs / "lockdown").write_text("none [integrity] confidentiality\n")
    assert probe.lockdown_mode() == "integrity"
    assert probe.probe_lockdown() == ProbeResult("lockdown", True, "integrity", None)


def test_confidentiality_explains_what_it_blocks(fake_securityfs: Path) -> None:
    (fake_securityfs / "lockdown").write_text("none integrity [confidentiality]\n")
    res = probe.probe_lockdown()
    assert res.ok and res.detail == "confidentiality"
    assert res.hint is not None and "bpf_probe_read_kernel" in res.hint


def test_no_lockdown_file_means_unsupported(fake_securityfs: Path) -> None:
    assert probe.lockdown_mode() == "unsupported"
    assert probe.probe_lockdown().detail == "unsupported"


def test_lsm_list_with_bpf(fake_securityfs: Path) -> None:
    (fake_securityfs / "lsm").write_text("lockdown,capability,landlock,bpf")
    assert probe.active_lsms() == ("lockdown", "capability", "landlock", "bpf")
    assert probe.probe_lsm().ok


def test_lsm_list_without_bpf_says_how_to_add_it(fake_securityfs: Path) -> None:
    (fake_securityfs / "lsm").write_text("lockdown,capability,landlock,yama,apparmor")
    res = probe.probe_lsm()
    assert not res.ok
    assert "bpf is NOT active" in res.detail
    assert (
        res.hint
        == "boot with lsm=lockdown,landlock,yama,apparmor,bpf (lsm= replaces the whole list)"
    )


def test_empty_lsm_file_centos7_style(fake_securityfs: Path) -> None:
    (fake_securityfs / "lsm").write_text("")
    assert probe.active_lsms() == ()
    res = probe.probe_lsm()
    assert not res.ok and "(empty)" in res.detail


def test_unmounted_securityfs_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "_mounted_fstype", lambda path: None)
    monkeypatch.setattr(probe, "is_root", lambda: False)
    res = probe.probe_securityfs()
    assert not res.ok and "needs root" in res.detail
    assert probe.lockdown_mode() is None
    assert probe.active_lsms() is None
    assert not probe.probe_lsm().ok
    assert probe.probe_lockdown().detail == "unknown: needs root (mode 0600)"


def test_fanotify_and_auditd_say_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "is_root", lambda: False)
    for p in (probe.probe_fanotify_exec, probe.probe_fanotify_open, probe.probe_auditd):
        res = p()
        assert not res.ok
        assert "needs root" in res.detail
        assert res.hint == probe.NEEDS_ROOT_HINT


def test_btf_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(probe, "BTF_VMLINUX", str(tmp_path / "vmlinux"))
    res = probe.probe_btf()
    assert not res.ok and res.hint is not None and "CONFIG_DEBUG_INFO_BTF" in res.hint


def test_a_probe_that_raises_reports_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> int:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(os, "geteuid", boom)  # the module probe uses
    res = probe.probe_root()
    assert res == ProbeResult("root", False, "probe error: RuntimeError('kaboom')", res.hint)


def test_probes_are_memoized(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_uname() -> os.uname_result:
        calls.append(1)
        return os.uname_result(("Linux", "h", "9.9.9", "#1", "x86_64"))

    monkeypatch.setattr(os, "uname", fake_uname)
    first = probe.probe_kernel()
    assert probe.probe_kernel() is first
    assert len(calls) == 1
    assert first.detail.startswith("9.9.9 x86_64")


def test_mountinfo_parser_finds_real_mounts() -> None:
    assert probe._mounted_fstype("/proc") == "proc"
    assert probe._mounted_fstype("/definitely/not/a/mount") is None


def test_auditd_status_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    def fake_run(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(["auditctl"], 0, "enabled 1\nfailure 1\npid 4242\n", "")

    monkeypatch.setattr(probe, "is_root", lambda: True)
    monkeypatch.setattr(subprocess, "run", fake_run)
    res = probe.probe_auditd()
    assert res.ok and res.detail == "running (pid 4242, enabled 1)"


def test_the_bpf_programs_the_backends_compile_are_found_in_the_package() -> None:
    res = probe.probe_bpf_programs()
    assert res.ok, res
    assert res.detail.endswith(os.path.join("agent", "sensors", "bpf", "programs"))


def test_an_install_without_the_bpf_programs_says_which_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.sensors.bpf import build

    (tmp_path / "events.h").write_text("/* only this one */\n")
    monkeypatch.setattr(build, "BPF_DIR", str(tmp_path))
    res = probe.probe_bpf_programs()
    assert not res.ok
    assert res.detail == (f"{tmp_path}: missing or unreadable: exec_verdict.h, exec_lsm.c, "
                          "exec_fmod_ret.c, exec_sensor.c")
    assert res.hint is not None and "reinstall" in res.hint
    # and no BCC backend is offered on such a host: they all need these sources
    choice = probe.choose_backend({**{n: ProbeResult(n, True, "yes") for n in
                                      ("btf", "lsm", "bpf-lsm", "fmod-ret", "send-signal")},
                                   "bpf-programs": res}, None)
    assert choice.backend == "audit-only"
    why = {r.backend: r.why for r in choice.reasons}
    assert "bpf-programs" in why["bpf-lsm"] and "bpf-programs" in why["kill"]
