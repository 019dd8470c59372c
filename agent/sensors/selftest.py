"""The start-up self-test of the kill sensor (docs/architecture.md decision 5).

1. Identity: exec a canary (a copy of ``echo``) on a private tmpfs and check that the
   record the kernel sent matches the child (pid, ppid, uid, auid, comm, path) and
   ``os.stat()`` of the canary (dev, ino, ctime ns, size). This catches wrong struct
   offsets and a wrong dev encoding before anything trusts the sensor.
2. Kill: mark the canary deny, exec it and see it die of SIGKILL before it prints
   anything; mark it allow and see it run; change its content and see the stale verdict
   ignored (the file is unknown again).
3. Mapping (where the sensor has its mmap hook): mark the canary deny and have a child map
   it PROT_EXEC: the child must die of SIGKILL inside the mmap, and the record must name
   the canary's identity and its path within the tmpfs. This proves the descriptor-table
   and dentry offsets, which the exec part never reads.

Only the tmpfs is in scope while the test runs (its class IN; every filesystem without a
class is out, whatever the guards said before), so nothing else on the host can be killed.
The sensor's mode and guards, the verdict and the class are restored or removed afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Protocol, Tuple

from agent.decision import FileIdentity
from agent.sensors.bpf.sensor import Guards
from agent.sensors.decode import ExecRecord, KernelAction, KernelState, Op

CANARY_SOURCES = ("/bin/echo", "/usr/bin/echo")
EXEC_DEADLINE_S = 5.0  # a canary that has not finished by then fails the test
RECORD_DEADLINE_S = 3.0  # its ring record must arrive within this
MARKER = "execguard-canary"
ONLY_CLASSED = Guards(unseen_out=True)  # only the canary's tmpfs has a class: in scope
# A child that maps a file PROT_EXEC (the mapping part); it prints only if it survives.
MAP_CODE = ("import mmap, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "mmap.mmap(fd, 0, prot=mmap.PROT_READ | mmap.PROT_EXEC)\nprint('mapped')\n")
_MNT_DETACH = 2


class Sensor(Protocol):
    """What the self-test needs from a sensor (BpfExecSensor implements it)."""

    mappings: bool  # the PROT_EXEC mapping hook is attached

    @property
    def mode(self) -> Tuple[bool, bool]: ...

    @property
    def guards(self) -> Guards: ...

    @property
    def scope(self) -> FrozenSet[int]: ...

    @property
    def fs_classes(self) -> Dict[int, int]: ...

    def poll(self, timeout_ms: int) -> List[ExecRecord]: ...

    def set_verdict(self, identity: FileIdentity, allow: bool) -> None: ...

    def forget(self, identity: FileIdentity) -> None: ...

    def add_scope_dev(self, st_dev: int) -> None: ...

    def remove_scope_dev(self, st_dev: int) -> None: ...

    def set_mode(self, *, enforce: bool, deny_unknown: bool,
                 guards: Optional[Guards] = None) -> None: ...


@dataclass(frozen=True)
class SelftestResult:
    ok: bool  # every requested part passed: the sensor may report ``enforcing``
    detail: str  # what passed, or the first thing that did not
    identity_ok: bool = False  # the identity part passed: events can be trusted
    kill_ok: bool = False  # the kill part passed
    mapping_ok: bool = False  # the mapping part passed (False too where the hook is absent)


class _Fail(Exception):
    pass


@contextlib.contextmanager
def private_tmpfs(parent: Optional[str] = None) -> Iterator[str]:
    """A fresh tmpfs (its own device) mounted on a new directory; unmounted on exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = tempfile.mkdtemp(prefix="execguard-selftest-", dir=parent)
    try:
        if libc.mount(b"execguard-selftest", path.encode(), b"tmpfs", 0, b"size=8m,mode=0700"):
            err = ctypes.get_errno()
            raise OSError(err, f"mount tmpfs on {path}: {os.strerror(err)}")
        try:
            yield path
        finally:
            libc.umount2(path.encode(), _MNT_DETACH)
    finally:
        os.rmdir(path)


def _loginuid() -> int:
    try:
        with open("/proc/self/loginuid", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0xFFFFFFFF


def _identity(path: str) -> FileIdentity:
    st = os.stat(path)
    return FileIdentity(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns)


class _Runner:
    def __init__(self, sensor: Sensor, canary: str) -> None:
        self.sensor, self.canary = sensor, canary

    def run(self, word: str) -> Tuple[subprocess.CompletedProcess[bytes], ExecRecord]:
        """Exec the canary; return its result and the ring record for its pid."""
        self.sensor.poll(0)  # drain first: a ring left full by host-wide execs drops ours
        try:
            proc = subprocess.run(
                [self.canary, MARKER, word],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=EXEC_DEADLINE_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _Fail(f"canary exec ({word}) failed: {exc}") from exc
        return proc, self._record(proc.args[0])

    def _record(self, path: str) -> ExecRecord:
        return self.wait(lambda r: r.op is Op.EXEC and r.event.path == path, path)

    def wait(self, match: Callable[[ExecRecord], bool], what: str = "the mapping"
             ) -> ExecRecord:
        """The first record that ``match``es, within the deadline."""
        end = time.monotonic() + RECORD_DEADLINE_S
        while time.monotonic() < end:
            for rec in self.sensor.poll(50):
                if match(rec):
                    return rec
        raise _Fail(f"no kernel record for {what} within {RECORD_DEADLINE_S:.0f} s")


def _check_identity(rec: ExecRecord, want: FileIdentity, canary: str) -> None:
    ev, got = rec.event, rec.event.identity
    expect = {
        "ppid": (ev.ppid, os.getpid()),
        "uid": (ev.uid, os.getuid()),
        "auid": (ev.auid, _loginuid()),
        "comm": (ev.comm, os.path.basename(canary)[:15]),
        "dev": (got.dev, want.dev),
        "ino": (got.ino, want.ino),
        "ctime_ns": (got.ctime_ns, want.ctime_ns),
        "size": (got.size, want.size),
    }
    bad = [f"{k} {a} != stat/proc {b}" for k, (a, b) in expect.items() if a != b]
    if rec.read_error:
        bad.insert(0, "kernel read error flagged")
    if bad:
        raise _Fail("identity mismatch (struct offsets or dev encoding?): " + "; ".join(bad))


def _identity_part(run: _Runner, want: FileIdentity) -> None:
    proc, rec = run.run("identity")
    if proc.returncode != 0 or MARKER.encode() not in proc.stdout:
        raise _Fail(f"canary did not run cleanly: status {proc.returncode}")
    if rec.event.pid <= 0:
        raise _Fail(f"event pid {rec.event.pid} is not a pid")
    _check_identity(rec, want, run.canary)


def _kill_part(sensor: Sensor, run: _Runner, want: FileIdentity) -> None:
    sensor.set_verdict(want, allow=False)
    proc, rec = run.run("deny")
    if proc.returncode != -9 or proc.stdout:
        raise _Fail(
            f"denied canary was not killed before printing: status {proc.returncode}, "
            f"output {proc.stdout[:40]!r}, kernel state {rec.state.name}, "
            f"action {rec.action.name} (errno {rec.kill_errno})"
        )
    if rec.state != KernelState.DENY or rec.action != KernelAction.KILLED:
        raise _Fail(f"killed, but the record says {rec.state.name}/{rec.action.name}")
    sensor.set_verdict(want, allow=True)
    proc, rec = run.run("allow")
    if proc.returncode != 0 or rec.state != KernelState.ALLOW:
        raise _Fail(f"allowed canary: status {proc.returncode}, kernel state {rec.state.name}")
    with open(run.canary, "ab") as f:  # a changed file must be unknown again
        f.write(b"\0")
    proc, rec = run.run("stale")
    if rec.state != KernelState.STALE:
        raise _Fail(f"canary changed after its verdict: kernel state {rec.state.name}, not STALE")


def _mapping_part(sensor: Sensor, run: _Runner) -> None:
    """A child maps the denied canary PROT_EXEC and must die inside the mmap."""
    want = _identity(run.canary)  # changed by the kill part
    sensor.set_verdict(want, allow=False)
    run.sensor.poll(0)
    try:
        proc = subprocess.Popen([sys.executable, "-c", MAP_CODE, run.canary],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    except OSError as exc:
        raise _Fail(f"mapping child failed to start: {exc}") from exc
    try:
        out, _ = proc.communicate(timeout=EXEC_DEADLINE_S)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise _Fail(f"mapping child still running after {EXEC_DEADLINE_S:.0f} s") from exc
    rec = run.wait(lambda r: r.op is Op.MMAP and r.event.pid == proc.pid)
    if proc.returncode != -9 or b"mapped" in out:
        raise _Fail(f"a PROT_EXEC mapping of the denied canary was not killed: status "
                    f"{proc.returncode}, output {out[:40]!r}, kernel state "
                    f"{rec.state.name}, action {rec.action.name}")
    got = rec.event.identity
    if (rec.action, got.dev, got.ino) != (KernelAction.KILLED, want.dev, want.ino) \
            or rec.event.path != "/" + os.path.basename(run.canary):
        raise _Fail(f"mapping killed, but the record says {rec.action.name} for "
                    f"{got.dev}:{got.ino} at {rec.event.path!r} (want {want.dev}:{want.ino} "
                    f"at /{os.path.basename(run.canary)}: fd-table or dentry offsets?)")


def run_selftest(
    sensor: Sensor, *, kill: bool = True, workdir: Optional[str] = None
) -> SelftestResult:
    """Identity (always), kill and mapping (when ``kill``) self-tests. Never raises."""
    src = next((p for p in CANARY_SOURCES if os.path.isfile(p)), None)
    if src is None:
        return SelftestResult(False, f"no canary binary: none of {CANARY_SOURCES} exists")
    if kill and sensor.fs_classes:
        # The kill part turns kill on; with filesystems in scope it could kill there too.
        return SelftestResult(False, "run the self-test before the scope is configured "
                              "(filesystem classes are set)")
    identity_ok = kill_ok = False
    saved_mode, saved_guards = sensor.mode, sensor.guards
    try:
        with private_tmpfs(workdir) as mnt:
            canary = os.path.join(mnt, "eg-canary")
            shutil.copy(src, canary)
            os.chmod(canary, 0o700)
            want = _identity(canary)
            run = _Runner(sensor, canary)
            sensor.add_scope_dev(want.dev)  # in scope: records are sent for it
            try:
                # report only, and nothing else in scope
                sensor.set_mode(enforce=False, deny_unknown=False, guards=ONLY_CLASSED)
                _identity_part(run, want)
                identity_ok = True
                if not kill:
                    return SelftestResult(True, "identity ok", identity_ok=True)
                sensor.set_mode(enforce=True, deny_unknown=False)
                _kill_part(sensor, run, want)
                kill_ok = True
                if not sensor.mappings:
                    return SelftestResult(
                        True, "identity ok; denied canary killed before output; allowed "
                        "canary ran; changed canary seen as stale; no mapping hook",
                        identity_ok=True, kill_ok=True)
                sensor.set_mode(enforce=True, deny_unknown=False,
                                guards=Guards(maps=True, unseen_out=True))
                _mapping_part(sensor, run)
            finally:
                sensor.set_mode(enforce=saved_mode[0], deny_unknown=saved_mode[1],
                                guards=saved_guards)
                sensor.remove_scope_dev(want.dev)
                sensor.forget(want)
            return SelftestResult(
                True,
                "identity ok; denied canary killed before output; allowed canary ran; "
                "changed canary seen as stale; PROT_EXEC mapping of a denied file killed",
                identity_ok=True, kill_ok=True, mapping_ok=True)
    except _Fail as exc:
        return SelftestResult(False, str(exc), identity_ok=identity_ok, kill_ok=kill_ok)
    except Exception as exc:  # a self-test never crashes the agent; it reports
        return SelftestResult(False, f"self-test error: {exc!r}", identity_ok=identity_ok,
                              kill_ok=kill_ok)
