"""The kill sensor's exec boundary on this host's kernel: where files are (filesystem
classes, scope directories, path-less files), dynamic loaders run as programs, PROT_EXEC
mappings (sys_enter_mmap, shmat SHM_EXEC), the exempt agent, and what a syscall tracepoint
cannot see (mprotect, int $0x80).

SAFETY: every test keeps every unclassified filesystem out of scope (``ONLY_CLASSED``
guards) and gives a class only to a tmpfs it owns; ``scoped_tmpfs`` resets the mode and
drops the class in ``finally``. Two things are in scope wherever they are, by design:
path-less files (memfd, shmat) and dynamic loaders run as programs; the tests that turn
those checks on keep them on for one run of one program (well under a second).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest

from agent.backends.base import identity_of, stat_key
from agent.backends.kernel_scope import find_loaders
from agent.decision import FileIdentity
from agent.scope import FsClass, ScopeTracker
from agent.sensors.bpf.sensor import Guards
from agent.sensors.bpf_exec import BpfExecSensor
from agent.sensors.decode import KernelAction, KernelState, Op
from agent.sensors.selftest import ONLY_CLASSED, private_tmpfs
from tests.attacks.harness import LDSO, Outcome, Result, run_attack
from tests.bpf_exec_fixtures import (  # noqa: F401  (fixtures are found by name)
    drain,
    enforce,
    scoped_tmpfs,
    sensor_fixture,
    wait_record,
)
from tests.kill_fixtures import build_tools, place

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    return build_tools(tmp_path_factory.mktemp("kill-tools"))


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


def assert_result(outcome: Outcome, want: Result) -> None:
    assert outcome.result is want, str(outcome)


def _ident(path: Path) -> FileIdentity:
    return identity_of(os.stat(path))


# -------------------------------------------------------------------------------- mappings

def test_mmap_of_a_denied_file_in_scope_is_killed_inside_the_mmap(
        sensor: BpfExecSensor, tools: Dict[str, Path]) -> None:
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        blob = place(tools["blob.bin"], Path(mnt) / "lib" / "blob.bin")
        sensor.set_verdict(_ident(blob), allow=False)
        enforce(sensor)
        drain(sensor)
        outcome = run_attack([str(tools["loader"]), "mmap", str(blob)])
        assert_result(outcome, Result.KILLED)
        rec = wait_record(sensor, path="/lib/blob.bin", op=Op.MMAP)  # path within the tmpfs
        assert (rec.state, rec.action, rec.aux & 0x4) == (KernelState.DENY,
                                                          KernelAction.KILLED, 0x4)
        assert rec.event.identity.ino == os.stat(blob).st_ino


def test_mapping_without_a_verdict_is_killed_when_fresh_and_allowed_once_when_old(
        sensor: BpfExecSensor, tools: Dict[str, Path]) -> None:
    """No verdict: a file changed since the agent started is killed on sight; one untouched
    since before runs this once (user space verifies it for the next time), until the whole
    scope has been verified (strict maps); an allow verdict runs and is not even reported."""
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        old = place(tools["blob.bin"], Path(mnt) / "old.bin")
        time.sleep(0.01)
        sensor.set_fresh_after(now_ns())  # "the agent started" after old.bin was written
        time.sleep(0.01)
        fresh = place(tools["blob.bin"], Path(mnt) / "fresh.bin")
        allowed = place(tools["blob.bin"], Path(mnt) / "allowed.bin")
        sensor.set_verdict(_ident(allowed), allow=True)
        enforce(sensor)
        drain(sensor)
        assert_result(run_attack([str(tools["loader"]), "mmap", str(fresh)]), Result.KILLED)
        rec = wait_record(sensor, path="/fresh.bin", op=Op.MMAP)
        assert rec.fresh and rec.action is KernelAction.KILLED
        assert_result(run_attack([str(tools["loader"]), "mmap", str(old)]), Result.RAN)
        rec = wait_record(sensor, path="/old.bin", op=Op.MMAP)
        assert (rec.state, rec.action, rec.fresh) == (KernelState.UNKNOWN, KernelAction.NONE,
                                                      False)
        assert_result(run_attack([str(tools["loader"]), "mmap", str(allowed)]), Result.RAN)
        assert not [r for r in sensor.poll(100) if r.event.path == "/allowed.bin"]
        # once the pre-scan has verified the whole scope, no file gets the benefit
        sensor.set_mode(enforce=True, deny_unknown=True,
                        guards=Guards(maps=True, strict_maps=True, unseen_out=True))
        assert_result(run_attack([str(tools["loader"]), "mmap", str(old)]), Result.KILLED)
        assert_result(run_attack([str(tools["loader"]), "mmap", str(allowed)]), Result.RAN)


def test_a_file_open_for_write_is_killed_at_its_mapping_even_when_allowed(
        sensor: BpfExecSensor, tools: Dict[str, Path]) -> None:
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        blob = place(tools["blob.bin"], Path(mnt) / "blob.bin")
        sensor.set_verdict(_ident(blob), allow=True)
        enforce(sensor)
        drain(sensor)
        with open(blob, "r+b"):  # a writer: the bytes may change under the verdict
            outcome = run_attack([str(tools["loader"]), "mmap", str(blob)])
        assert_result(outcome, Result.KILLED)
        rec = wait_record(sensor, path="/blob.bin", op=Op.MMAP)
        assert rec.writers and rec.state is KernelState.STALE
        assert_result(run_attack([str(tools["loader"]), "mmap", str(blob)]), Result.RAN)


def test_mappings_outside_the_scope_are_never_judged(
        sensor: BpfExecSensor, tools: Dict[str, Path]) -> None:
    with scoped_tmpfs(sensor, in_scope=True), private_tmpfs() as outside:
        blob = place(tools["blob.bin"], Path(outside) / "blob.bin")
        sensor.set_verdict(_ident(blob), allow=False)  # denied, but on no scoped filesystem
        try:
            enforce(sensor)
            assert_result(run_attack([str(tools["loader"]), "mmap", str(blob)]), Result.RAN)
            # a signed-or-not dynamic program from the root filesystem maps its libraries
            assert subprocess.run(["/bin/true"], timeout=10).returncode == 0
        finally:
            sensor.forget(_ident(blob))


def test_shmat_exec_is_killed_as_a_file_without_a_name(
        sensor: BpfExecSensor, tools: Dict[str, Path]) -> None:
    with scoped_tmpfs(sensor, in_scope=True):
        enforce(sensor, deny_unknown=False)  # deny verdicts only: SHM_EXEC is not one
        assert_result(run_attack([str(tools["shmat-exec"]), str(tools["blob.bin"])]),
                      Result.RAN)
        enforce(sensor)
        drain(sensor)
        outcome = run_attack([str(tools["shmat-exec"]), str(tools["blob.bin"])])
        sensor.set_mode(enforce=False, deny_unknown=False, guards=ONLY_CLASSED)
        assert_result(outcome, Result.KILLED)
        rec = next(r for r in sensor.poll(200) if r.op is Op.MMAP and r.pathless)
        assert rec.action is KernelAction.KILLED and rec.event.identity.ino == 0


# -------------------------------------------------------------------------------- execs

def test_a_file_without_a_name_is_in_scope_wherever_it_is(
        sensor: BpfExecSensor, tools: Dict[str, Path]) -> None:
    """memfd: on the kernel's internal shmem mount, which has no class and is out of scope
    under these guards; nlink 0 puts it in scope anyway."""
    with scoped_tmpfs(sensor, in_scope=True):
        enforce(sensor)
        drain(sensor)
        try:
            fexecve = run_attack([str(tools["memfd-exec"]), "fexecve",
                                  str(tools["payload-static"])])
            procfd = run_attack([str(tools["memfd-exec"]), "procfd",
                                 str(tools["payload-static"])])
        finally:
            sensor.set_mode(enforce=False, deny_unknown=False, guards=ONLY_CLASSED)
        assert_result(fexecve, Result.KILLED)
        assert_result(procfd, Result.KILLED)
        recs = [r for r in sensor.poll(200) if r.op is Op.EXEC and r.pathless]
        assert len(recs) >= 2 and all(r.action is KernelAction.KILLED for r in recs), recs


def test_a_dynamic_loader_run_as_a_program_is_killed(
        sensor: BpfExecSensor, tools: Dict[str, Path]) -> None:
    """ld.so ./prog maps prog itself, no exec of it: the loader's own exec is the one to
    refuse, wherever prog is. A program the kernel starts with ld.so as its interpreter
    runs (the ELF loader never execs the interpreter)."""
    tracker = ScopeTracker(())
    tracker.refresh()

    def key_of(fd: int) -> Tuple[int, int]:  # as the kernel sees it (an overlay: agent/scope)
        return tracker.kernel_key(fd) or stat_key(fd) or (0, 0)

    loaders = find_loaders(key_of)
    fd = os.open(LDSO, os.O_RDONLY)
    try:
        assert key_of(fd) in loaders
    finally:
        os.close(fd)
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        payload = place(tools["payload-dyn"], Path(mnt) / "payload")
        sensor.set_loaders(loaders)
        try:
            sensor.set_mode(enforce=True, deny_unknown=False,
                            guards=Guards(loader=True, unseen_out=True))
            drain(sensor)
            outcome = run_attack([LDSO, str(payload)])
            dynamic = subprocess.run(["/bin/true"], timeout=10)
        finally:
            sensor.set_mode(enforce=False, deny_unknown=False, guards=ONLY_CLASSED)
            sensor.set_loaders(())
        assert_result(outcome, Result.KILLED)
        assert dynamic.returncode == 0
        rec = wait_record(sensor, path=LDSO)
        assert rec.loader and rec.denied and rec.action is KernelAction.KILLED
        assert not rec.in_scope  # killed as a loader, not for where it is


@contextlib.contextmanager
def bind(src: str, dst: str) -> Iterator[str]:
    subprocess.run(["mount", "--bind", src, dst], check=True, timeout=10)
    try:
        yield dst
    finally:
        if subprocess.run(["umount", dst], timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", dst], timeout=10)


def test_a_partial_filesystem_is_judged_by_the_directories_above_the_file(
        sensor: BpfExecSensor, tools: Dict[str, Path]) -> None:
    """PARTIAL: only files below a scope directory (dev, ino) are in scope. The kernel walks
    d_parent, not mounts, so a bind mount of the directory elsewhere and another mount
    namespace reach the same ancestors."""
    with scoped_tmpfs(sensor, in_scope=False) as mnt, \
            tempfile.TemporaryDirectory(prefix="eg-bind-") as view:
        app, other = Path(mnt) / "app", Path(mnt) / "other"
        inside = place(tools["payload-static"], app / "deep" / "er" / "payload")
        outside = place(tools["payload-static"], other / "payload")
        dev = os.stat(mnt).st_dev
        sensor.set_fs_class(dev, FsClass.PARTIAL)
        sensor.set_scope_dirs([(dev, os.stat(app).st_ino)])
        try:
            enforce(sensor)
            drain(sensor)
            assert_result(run_attack([str(inside)]), Result.KILLED)
            assert_result(run_attack([str(outside)]), Result.RAN)
            with bind(str(app), view):
                assert_result(run_attack([f"{view}/deep/er/payload"]), Result.KILLED)
            assert_result(run_attack(["unshare", "-m", str(inside)]), Result.KILLED)
        finally:
            sensor.set_mode(enforce=False, deny_unknown=False, guards=ONLY_CLASSED)
            sensor.set_scope_dirs(())
        rec = wait_record(sensor, path=str(inside))
        assert rec.in_scope and rec.action is KernelAction.KILLED


def test_the_agent_and_the_programs_it_starts_are_exempt(tools: Dict[str, Path]) -> None:
    """A sensor of its own: an exempt tgid stays in the map until the sensor closes."""
    helper_code = ("import mmap, os, subprocess, sys\n"
                   "sys.stdin.readline()\n"
                   "r = subprocess.run([sys.argv[1]], capture_output=True).returncode\n"
                   "fd = os.open(sys.argv[2], os.O_RDONLY)\n"
                   "mmap.mmap(fd, 0, prot=mmap.PROT_READ | mmap.PROT_EXEC)\n"
                   "print('child', r, 'mapped')\n")
    with BpfExecSensor() as own, private_tmpfs() as mnt:
        os.chmod(mnt, 0o755)
        own.add_scope_dev(os.stat(mnt).st_dev)
        payload = place(tools["payload-static"], Path(mnt) / "payload")
        blob = place(tools["blob.bin"], Path(mnt) / "blob.bin")
        own.set_verdict(_ident(blob), allow=False)
        helper = subprocess.Popen([sys.executable, "-c", helper_code, str(payload),
                                   str(blob)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        try:
            own.exempt(helper.pid)
            own.set_mode(enforce=True, deny_unknown=True,
                         guards=Guards(maps=True, unseen_out=True))
            out, _ = helper.communicate("go\n", timeout=30)
            stranger = run_attack([str(payload)])  # not the agent's: killed
        finally:
            own.set_mode(enforce=False, deny_unknown=False, guards=ONLY_CLASSED)
            if helper.poll() is None:
                helper.kill()
        assert out.strip() == "child 0 mapped", out
        assert_result(stranger, Result.KILLED)


# -------------------------------------------------------------------------------- limits

def test_what_a_syscall_tracepoint_cannot_see(
        sensor: BpfExecSensor, tools: Dict[str, Path]) -> None:
    """Known limits, stated in docs/sensors.md: mprotect(PROT_EXEC) of a file mapping (no
    VMA at sys_enter_mprotect without bpf_find_vma, whose callback BCC 0.26 cannot load),
    and mmap2 through int $0x80 (32-bit syscalls fire no syscalls:* tracepoint). If one of
    these starts being killed, the docs and tests/attacks expectations must change."""
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        blob = place(tools["blob.bin"], Path(mnt) / "blob.bin")
        sensor.set_verdict(_ident(blob), allow=False)
        enforce(sensor)
        assert_result(run_attack([str(tools["loader"]), "mprotect", str(blob)]), Result.RAN)
        assert_result(run_attack([str(tools["mmap-int80"]), str(blob)]), Result.RAN)
        assert_result(run_attack([str(tools["loader"]), "mmap", str(blob)]), Result.KILLED)
