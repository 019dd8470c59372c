"""The BCC child's records are explained clearly, and a hung child is killed by its deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from agent.sensors import bcc_probe
from agent.sensors.probe import ProbeResult

RELEASE = "6.18.44-test"
HEADERS_OK = ProbeResult("kernel-headers", True, "fine")
WITH_BPF = ("lockdown", "capability", "bpf")


def rec(ok: bool, **kw: Any) -> Dict[str, Any]:
    return {"event": "result", "ok": ok, "ms": 3, "log": "", **kw}


def good(*names: str) -> Dict[str, Dict[str, Any]]:
    out = {"bcc": rec(True, version="0.26.0", path="/x/bcc/__init__.py")}
    out.update({n: rec(True) for n in names})
    return out


def explain(records: Dict[str, Dict[str, Any]], **kw: Any) -> Dict[str, ProbeResult]:
    args: Dict[str, Any] = {
        "died_in": None,
        "why": "child exited with status 0: ",
        "compiled": True,
        "root": True,
        "lsms": WITH_BPF,
        "headers": HEADERS_OK,
        "release": RELEASE,
    }
    args.update(kw)
    return bcc_probe.interpret(records, **args)


def test_all_good_gives_one_result_per_probe_in_order() -> None:
    out = explain(good(*bcc_probe.COMPILE_DEPENDENT))
    assert tuple(out) == bcc_probe.ALL_NAMES
    assert all(r.ok for r in out.values())
    assert out["bcc"].detail.startswith("bcc 0.26.0 imports")


def test_missing_headers_are_loud_and_later_steps_not_attempted() -> None:
    log = (
        "Unable to find kernel headers. Try rebuilding kernel with CONFIG_IKHEADERS=m\n"
        "<built-in>:1:10: fatal error: './include/linux/kconfig.h' file not found\n"
    )
    records = good()
    records["bcc-compile"] = rec(False, error="Failed to compile BPF module <text>", log=log)
    out = explain(records)
    assert (
        out["bcc-compile"].detail == f"BCC CANNOT COMPILE: no usable kernel headers for {RELEASE}"
    )
    for name in bcc_probe.LOAD_DEPENDENT:
        assert out[name].detail == "not attempted: BCC cannot compile"
        assert out[name].hint == "fix bcc-compile first"


def test_eperm_on_load_names_the_errno() -> None:
    records = good("bcc-compile", "tracepoint", "raw-tracepoint", "send-signal", "fmod-ret")
    records["bpf-lsm"] = rec(
        False,
        error="Need super-user privileges to run",
        errno=1,
        log="bpf: Failed to load program: Operation not permitted\n\n",
    )
    out = explain(records)
    res = out["bpf-lsm"]
    assert not res.ok
    assert res.detail.startswith("load failed: EPERM (Operation not permitted)")
    assert "log:" not in res.detail  # BCC's bare "Failed to load program" line is noise
    assert res.hint is not None


def test_attach_failure_is_reported_as_attach() -> None:
    records = good("bcc-compile")
    records["tracepoint"] = rec(False, error="Failed to attach BPF program", errno=2)
    assert explain(records)["tracepoint"].detail.startswith("attach failed: ENOENT")


def test_lsm_attached_but_bpf_not_active_is_the_silent_case() -> None:
    out = explain(good(*bcc_probe.COMPILE_DEPENDENT), lsms=("lockdown", "capability", "apparmor"))
    res = out["bpf-lsm"]
    assert not res.ok
    assert "never run (silent failure)" in res.detail
    assert "lockdown,capability,apparmor" in res.detail
    assert out["fmod-ret"].ok


def test_lsm_attached_with_unknown_lsm_list_is_not_trusted() -> None:
    out = explain(good(*bcc_probe.COMPILE_DEPENDENT), lsms=None)
    assert not out["bpf-lsm"].ok and "(unknown)" in out["bpf-lsm"].detail


def test_old_bcc_without_kmod_ret() -> None:
    records = good("bcc-compile")
    records["fmod-ret"] = rec(
        False, error="Failed to compile BPF module <text>", log="error: unknown type KMOD_RET\n"
    )
    assert explain(records)["fmod-ret"].hint == "needs BCC >= 0.19"


def test_bcc_import_failure_blocks_everything() -> None:
    records = {"bcc": rec(False, error="No module named 'bcc'")}
    out = explain(records)
    assert out["bcc"].detail == "import bcc failed: No module named 'bcc'"
    assert out["bcc"].hint is not None and "system-site-packages" in out["bcc"].hint
    for name in bcc_probe.COMPILE_DEPENDENT:
        assert out[name].detail == "not attempted: bcc does not import"


def test_no_compile_marks_every_bpf_probe_not_probed() -> None:
    out = explain(good(), compiled=False)
    for name in bcc_probe.COMPILE_DEPENDENT:
        assert out[name].detail == "not probed (--no-compile)"


def test_not_root_compiles_but_does_not_load() -> None:
    out = explain(good("bcc-compile"), root=False)
    assert out["bcc-compile"].ok
    for name in bcc_probe.LOAD_DEPENDENT:
        assert out[name].detail == "needs root to load BPF programs"


def test_a_crash_names_the_step() -> None:
    out = explain(
        good("bcc-compile", "tracepoint"),
        died_in="raw-tracepoint",
        why="child exited with status -11: ",
    )
    assert out["tracepoint"].ok
    assert out["raw-tracepoint"].detail == (
        "probe child child exited with status -11:  during 'raw-tracepoint'"
    )
    assert out["send-signal"].detail.startswith("not attempted: probe child")


def _fake_child(script: str) -> bcc_probe.Child:
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return bcc_probe.Child(proc, compile=True, load=True)


def test_the_budget_given_to_the_child_wins_over_the_default() -> None:
    script = "import time\ntime.sleep(60)\n"
    child = _fake_child(script)
    child.timeout = 0.5
    t0 = time.monotonic()
    _, _, why = bcc_probe._collect(child)
    assert time.monotonic() - t0 < 10
    assert why.startswith("timed out after 0.5 s") and "EXECGUARD_PROBE_TIMEOUT" in why


def test_a_hung_child_is_killed_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bcc_probe, "CHILD_TIMEOUT", 1.0)
    tag = bcc_probe.TAG
    lines = [
        tag + json.dumps({"event": "start", "name": "bcc"}),
        tag + json.dumps({"event": "result", "name": "bcc", "ok": True, "version": "x"}),
        tag + json.dumps({"event": "start", "name": "bcc-compile"}),
    ]
    script = f"import sys, time\nprint({chr(10).join(lines)!r}, flush=True)\ntime.sleep(60)\n"
    child = _fake_child(script)
    t0 = time.monotonic()
    records, died_in, why = bcc_probe._collect(child)
    assert time.monotonic() - t0 < 10
    assert records["bcc"]["ok"] is True
    assert died_in == "bcc-compile"
    assert why.startswith("timed out after 1 s (raise it with --probe-timeout")
    assert child.proc is not None and child.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(child.proc.pid, 0)


def test_garbage_and_foreign_lines_are_ignored() -> None:
    script = f"print('Unable to find kernel headers.')\nprint({bcc_probe.TAG!r} + '{{torn')\n"
    records, died_in, _ = bcc_probe._collect(_fake_child(script))
    assert records == {} and died_in is None


def test_child_that_cannot_start() -> None:
    out = bcc_probe.finish(
        bcc_probe.Child(None, compile=True, load=True, error="cannot start /nope: ENOENT"),
        lsms=WITH_BPF,
        root=True,
    )
    assert not out["bcc"].ok
    assert "cannot start /nope" in out["bcc"].detail


def test_headers_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(bcc_probe, "MODULES_DIR", str(tmp_path))
    monkeypatch.setattr(bcc_probe, "KHEADERS", str(tmp_path / "kheaders.tar.xz"))
    res = bcc_probe.probe_headers(RELEASE)
    assert not res.ok
    assert res.detail.startswith(f"NO KERNEL HEADERS for {RELEASE}")
    assert res.hint is not None and f"{tmp_path}/{RELEASE}/build" in res.hint


def _tree(root: Path, release: str, *, kconfig: bool = True) -> Path:
    (root / "include/generated").mkdir(parents=True)
    (root / "include/generated/utsrelease.h").write_text(f'#define UTS_RELEASE "{release}"\n')
    if kconfig:
        (root / "include/linux").mkdir(parents=True)
        (root / "include/linux/kconfig.h").write_text("")
    return root


def test_headers_debian_split_build_and_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(bcc_probe, "MODULES_DIR", str(tmp_path))
    kdir = tmp_path / RELEASE
    _tree(kdir / "build", RELEASE, kconfig=False)
    (kdir / "source/include/linux").mkdir(parents=True)
    (kdir / "source/include/linux/kconfig.h").write_text("")
    res = bcc_probe.probe_headers(RELEASE)
    assert res.ok, res
    assert "(build+source)" in res.detail


def test_headers_build_alone_without_kconfig_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(bcc_probe, "MODULES_DIR", str(tmp_path))
    monkeypatch.setattr(bcc_probe, "KHEADERS", str(tmp_path / "kheaders.tar.xz"))
    _tree(tmp_path / RELEASE / "build", "6.1.0-50-amd64", kconfig=False)
    assert not bcc_probe.probe_headers(RELEASE).ok


def test_headers_mismatch_is_loud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(_tree(tmp_path / "h", "6.1.0-50-amd64")))
    res = bcc_probe.probe_headers(RELEASE)
    assert not res.ok
    assert res.detail.startswith("MISMATCHED KERNEL HEADERS")
    assert "6.1.0-50-amd64" in res.detail and RELEASE in res.detail


def test_headers_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(_tree(tmp_path / "h", RELEASE)))
    res = bcc_probe.probe_headers(RELEASE)
    assert res.ok and res.detail.endswith(f"release {RELEASE}")
