"""A real systemd for the service tests, where PID 1 is not systemd.

This host's PID 1 is the sandbox's own init, so ``systemd-run`` has no manager to talk to.
The nearest real thing: Debian's ``/lib/systemd/systemd`` booted as PID 1 of new PID,
mount, cgroup, UTS and IPC namespaces (``unshare``), with

- its own ``/run`` (a tmpfs) and a cgroup2 hierarchy rooted at a cgroup the test makes;
- ``SYSTEMD_UNIT_PATH`` set to a directory holding only the unit under test, a drop-in and
  empty stubs of the standard targets it depends on, so no host unit (udev, journald,
  getty, ...) is ever started, and no generator runs;
- the host's network namespace (auditd's netlink lives there) and root filesystem.

The manager is the real one: it parses the unit, applies its hardening, reads
``NOTIFY_SOCKET`` messages, enforces ``WatchdogSec`` and ``Restart=``. What it does not do
here: a journal (the drop-in sends the service's output to a file) and the default target's
dependency tree. Teardown SIGKILLs the namespace's PID 1, which kills everything in it; the
cgroups are removed after.

fanotify marks belong to a mount namespace's copy of a mount, so execs that the agent must
see run inside the manager's mount namespace (``nsenter -m``), as any process on a real
host runs in the namespace its systemd runs in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

SYSTEMD = "/lib/systemd/systemd"
REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "packaging" / "execguard.service"
STUB_TARGETS = ("sysinit.target", "basic.target", "shutdown.target")
TEST_TARGET = "execguard-test.target"


def cgroup2_root() -> Path:
    """Where a cgroup2 hierarchy is mounted (``/sys/fs/cgroup`` or its ``unified``)."""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    raise RuntimeError("no cgroup2 hierarchy is mounted: systemd cannot run here")


def write_units(directory: Path, dropin: str, unit: Path = UNIT) -> None:
    """The unit (as shipped, or as an install wrote it), one drop-in, and empty stand-ins for
    the targets it needs."""
    directory.mkdir(parents=True)
    shutil.copy(unit, directory / UNIT.name)
    (directory / f"{UNIT.name}.d").mkdir()
    (directory / f"{UNIT.name}.d" / "test.conf").write_text(dropin)
    for name in STUB_TARGETS:
        (directory / name).write_text(f"[Unit]\nDescription=stub {name}\n"
                                      "DefaultDependencies=no\n")
    (directory / "system.slice").write_text("[Unit]\nDescription=stub system.slice\n"
                                            "DefaultDependencies=no\n")
    (directory / TEST_TARGET).write_text(f"[Unit]\nDescription=execguard test\n"
                                         f"DefaultDependencies=no\nWants={UNIT.name}\n")


BOOT = """#!/bin/sh
# PID 1 of the new namespaces until it execs systemd
set -e
mount -t tmpfs -o mode=0755,size=16m eg-systemd-run /run
mount -t cgroup2 none /sys/fs/cgroup
if [ -e /dev/console ]; then mount --bind "{console}" /dev/console; fi
exec env -i container=execguard-test SYSTEMD_UNIT_PATH="{units}" \\
    SYSTEMD_GENERATOR_PATH="{empty}" SYSTEMD_ENVIRONMENT_GENERATOR_PATH="{empty}" \\
    PATH=/usr/sbin:/usr/bin:/sbin:/bin \\
    {systemd} --system --unit={target} --log-target=console --log-level=info
"""


@dataclass
class Systemd:
    """A booted manager: ``pid1`` is its pid as the host sees it."""

    proc: subprocess.Popen  # type: ignore[type-arg]
    pid1: int
    work: Path
    console: Path
    cgroup: Path
    tracers: List[threading.Thread] = field(default_factory=list)

    def nsenter(self, *cmd: str, pid_ns: bool = False, timeout: float = 30.0,
                check: bool = False) -> subprocess.CompletedProcess[str]:
        args = ["nsenter", "-t", str(self.pid1), "-m"] + (["-p"] if pid_ns else [])
        return subprocess.run([*args, "--", *cmd], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.nsenter("systemctl", "--no-pager", *args, pid_ns=True)

    def show(self, unit: str, *props: str) -> Dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_show(self, unit: str, props: Sequence[str],
                  predicate: Callable[[Dict[str, str]], bool],
                  timeout: float) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        seen: Dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.show(unit, *props)
            if predicate(seen):
                return seen
            if self.proc.poll() is not None:
                break
            time.sleep(0.25)
        raise AssertionError(f"{unit}: condition not met within {timeout}s; last {seen}\n"
                             f"manager log:\n{self.log()[-3000:]}")

    def host_pid(self, ns_pid: int) -> int:
        """The host's pid of a process whose pid in the manager's namespace is ``ns_pid``."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            nspid = _status_field(int(entry), "NSpid")
            if nspid is not None and len(nspid) >= 2 and nspid[-1] == str(ns_pid) \
                    and _in_pid_ns_of(int(entry), self.pid1):
                return int(entry)
        raise AssertionError(f"no host pid for pid {ns_pid} in the manager's namespace")

    def log(self) -> str:
        """The manager's own log: /dev/console (bound to a file) or its stderr."""
        return "".join(p.read_text(errors="replace")
                       for p in (self.console, self.work / "unshare.out") if p.exists())



def _status_field(pid: int, name: str) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return line.split()[1:]
    except OSError:
        return None
    return None


def _in_pid_ns_of(pid: int, other: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{other}/ns/pid")
    except OSError:
        return False


@contextlib.contextmanager
def booted_systemd(dropin: str, boot_timeout: float = 30.0, unit: Path = UNIT
                   ) -> Iterator[Systemd]:
    """systemd as PID 1 of fresh namespaces, the execguard unit ``unit`` (plus ``dropin``) in
    its unit path; killed with everything in it on exit."""
    work = Path(tempfile.mkdtemp(prefix="eg-systemd-"))
    units, empty, console = work / "units", work / "empty", work / "manager.log"
    write_units(units, dropin, unit)
    empty.mkdir()
    console.touch()
    boot = work / "boot.sh"
    boot.write_text(BOOT.format(console=console, units=units, empty=empty, systemd=SYSTEMD,
                                target=TEST_TARGET))
    boot.chmod(0o755)
    cgroup = cgroup2_root() / f"execguard-test-{os.getpid()}-{work.name[-6:]}"
    cgroup.mkdir()

    def enter_cgroup() -> None:  # in the child, before exec: the namespace's cgroup root
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    with open(work / "unshare.out", "wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--cgroup", "--uts",
             "--ipc", "--propagation", "private", str(boot)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=enter_cgroup)
    pid1 = 0
    try:
        deadline = time.monotonic() + boot_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            with contextlib.suppress(OSError):
                kids = children.read_text().split()
                if kids and os.readlink(f"/proc/{kids[0]}/exe") == os.path.realpath(SYSTEMD):
                    pid1 = int(kids[0])
                    break
            time.sleep(0.05)
        if not pid1:
            raise AssertionError(f"systemd did not start: {(work / 'unshare.out').read_text()}")
        sd = Systemd(proc, pid1, work, console, cgroup)
        deadline = time.monotonic() + boot_timeout
        while sd.systemctl("is-system-running").stdout.strip() in ("", "initializing"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"systemd did not come up:\n{sd.log()[-3000:]}")
            time.sleep(0.1)
        yield sd
    finally:
        if pid1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid1, signal.SIGKILL)  # the namespace's init: everything in it dies
        kill = cgroup / "cgroup.kill"  # Linux 5.14+: whatever is left in the cgroup tree
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        _remove_cgroup(cgroup)
        shutil.rmtree(work, ignore_errors=True)


def _remove_cgroup(top: Path) -> None:
    deadline = time.monotonic() + 10
    while top.exists() and time.monotonic() < deadline:
        for dirpath, dirnames, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
            for d in dirnames:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(dirpath, d))
        with contextlib.suppress(OSError):
            os.rmdir(top)
        if top.exists():
            time.sleep(0.1)


# -- freezing one thread -------------------------------------------------------------------
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
WALL = 0x40000000  # __WALL: wait for a traced thread that is not our child


@dataclass
class Frozen:
    """A thread held by ``freeze_thread``; ``release()`` lets it run on."""

    tracer: threading.Thread
    released: threading.Event

    def release(self, timeout: float = 10.0) -> None:
        self.released.set()
        self.tracer.join(timeout)

    def join(self, timeout: float) -> None:
        self.tracer.join(timeout)


def freeze_thread(tid: int) -> Frozen:
    """Stop one thread of another process (PTRACE_SEIZE + PTRACE_INTERRUPT), leaving every
    other thread running: a wedged thread, as a deadlock would leave it. The tracer thread
    then waits until the traced thread exits (a killed process), reaping it so the process
    can end, or until ``release()`` detaches. ptrace requests must come from the thread
    that attached: all of them are made here."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    attached, released = threading.Event(), threading.Event()
    problem: List[str] = []

    def trace() -> None:
        for request in (PTRACE_SEIZE, PTRACE_INTERRUPT):
            if libc.ptrace(request, tid, None, None) != 0:
                problem.append(f"ptrace({request:#x}, {tid}): {os.strerror(ctypes.get_errno())}")
                attached.set()
                return
        attached.set()
        while True:
            try:
                pid, status = os.waitpid(tid, WALL | os.WNOHANG)
            except ChildProcessError:
                return
            if pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                return
            if released.is_set():
                libc.ptrace(PTRACE_DETACH, tid, None, None)
                return
            time.sleep(0.05)

    tracer = threading.Thread(target=trace, name=f"freeze-{tid}", daemon=True)
    tracer.start()
    attached.wait(10)
    if problem:
        raise AssertionError(problem[0])
    return Frozen(tracer, released)


def restore_env(saved: Dict[str, Optional[str]]) -> None:
    """Put back environment variables a test replaced (None: it was unset)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
