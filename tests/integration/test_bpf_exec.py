"""The kill sensor on this host's kernel: what it reports for real execs in scope.

Every field is checked against the source of truth: the child's pid from Popen, our own
pid and credentials, ``os.stat()`` of the file. The sensor reads struct fields at offsets
from the running kernel's BTF, so these tests are what proves them (the headers BCC
compiles with here are 6.1's). Only files in scope are reported: each test puts a tmpfs of
its own in scope (report only: nothing is killed here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agent.decision import FileIdentity
from agent.scope import ScopeTracker
from agent.sensors.bpf_exec import BpfExecSensor, SensorConfig, kill_offsets, print_bpf
from agent.sensors.decode import KernelAction, KernelState
from agent.sensors.errors import SensorMapError, SensorUnavailable
from agent.sensors.kernel_layout import VMLINUX_BTF, Btf
from tests.bpf_exec_fixtures import (  # noqa: F401  (fixtures are found by name)
    ECHO,
    copy_exe,
    drain,
    run,
    scoped_tmpfs,
    sensor_fixture,
    wait_record,
)

pytestmark = pytest.mark.timeout(60)


def _loginuid() -> int:
    with open("/proc/self/loginuid", encoding="ascii") as f:
        return int(f.read())


def this_kernels_offsets() -> dict:  # type: ignore[type-arg]
    with open(VMLINUX_BTF, "rb") as f:
        blob = f.read()
    return kill_offsets(Btf(blob), blob)


def test_exec_event_fields_match_child_and_stat(sensor: BpfExecSensor) -> None:
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        exe = os.path.join(mnt, "a-rather-long-program-name")
        ident = copy_exe(ECHO, exe)
        drain(sensor)
        before = time.time_ns()
        proc = subprocess.Popen([exe, "hi"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        out, _ = proc.communicate(timeout=10)
        rec = wait_record(sensor, path=exe, pid=proc.pid)
    ev = rec.event
    assert out == b"hi\n"
    assert (ev.pid, ev.ppid, ev.uid, ev.auid) == (proc.pid, os.getpid(), os.getuid(), _loginuid())
    assert ev.comm == "a-rather-long-p"  # TASK_COMM_LEN 16, NUL included
    assert ev.identity == ident  # dev in stat() encoding, ino, ctime ns, size
    assert ev.backend == "kill"
    assert not rec.read_error and rec.in_scope and not rec.denied
    assert rec.state == KernelState.UNKNOWN and rec.action == KernelAction.NONE
    # wall-clock conversion of the kernel's boot clock: a sanity bound, not a timing test
    assert before - 10**9 <= ev.timestamp_ns <= time.time_ns() + 10**9


def test_identity_on_root_filesystem_and_dev_encoding(sensor: BpfExecSensor) -> None:
    """The root filesystem (on this host ext4 on a block device, major != 0: the MKDEV ->
    st_dev conversion matters here) is in scope for the test (report only: kill is off).
    The kernel's (dev, ino) is the one ScopeTracker.kernel_key reads from fdinfo: stat()
    differs on an overlay root (the test VM), where it names the layer's file."""
    tracker = ScopeTracker(())
    tracker.refresh()
    fd = os.open("/bin/true", os.O_RDONLY)
    try:
        dev, ino = tracker.kernel_key(fd) or (0, 0)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    sensor.add_scope_dev(dev)
    try:
        drain(sensor)
        proc = run(["/bin/true"])
        rec = wait_record(sensor, path="/bin/true")
    finally:
        sensor.remove_scope_dev(dev)
    assert proc.returncode == 0
    assert (rec.event.identity.dev, rec.event.identity.ino) == (dev, ino)
    assert (rec.event.identity.ctime_ns, rec.event.identity.size) == (st.st_ctime_ns, st.st_size)


def test_gid_is_the_real_gid_not_the_egid(sensor: BpfExecSensor) -> None:
    """A setgid file run with real gid 4321: after the exec the egid is the file's group
    (5555), and the event carries the real gid (bpf_get_current_uid_gid's high half)."""
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        exe = os.path.join(mnt, "sgid")
        copy_exe(ECHO, exe)
        os.chown(exe, 0, 5555)
        os.chmod(exe, 0o2755)
        drain(sensor)
        proc = subprocess.run(["setpriv", "--regid=4321", "--clear-groups", exe, "hi"],
                              capture_output=True, timeout=10, check=True)
        rec = wait_record(sensor, path=exe)
    assert proc.stdout == b"hi\n"
    assert rec.event.gid == 4321 and rec.event.uid == os.getuid()


def test_auid_is_the_login_uid_and_unset_without_audit_offsets(sensor: BpfExecSensor) -> None:
    """A child sets its loginuid (root may, once); the exec after it carries that auid."""
    offsets = this_kernels_offsets()
    del offsets["EG_OFF_TASK_LOGINUID"]  # what a kernel without CONFIG_AUDIT gives
    with scoped_tmpfs(sensor, in_scope=True) as mnt, BpfExecSensor(offsets=offsets) as no_audit:
        no_audit.add_scope_dev(os.stat(mnt).st_dev)
        exe = os.path.join(mnt, "after-login")
        copy_exe(ECHO, exe)
        drain(sensor)
        script = f"echo 4321 > /proc/self/loginuid && exec {exe}"
        assert run(["/bin/sh", "-c", script]).returncode == 0
        assert wait_record(sensor, path=exe).event.auid == 4321
        assert wait_record(no_audit, path=exe).event.auid == 0xFFFFFFFF


def test_relative_path_is_reported_as_given_and_hard_link_shares_identity(
    sensor: BpfExecSensor,
) -> None:
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        exe = os.path.join(mnt, "prog")
        ident = copy_exe(ECHO, exe)
        os.link(exe, os.path.join(mnt, "link"))
        drain(sensor)
        subprocess.run(["./link"], cwd=mnt, capture_output=True, timeout=10, check=True)
        rec = wait_record(sensor, path="./link")
    assert rec.event.identity.dev == ident.dev and rec.event.identity.ino == ident.ino


def test_verdict_map_states_allow_deny_stale_and_forget(sensor: BpfExecSensor) -> None:
    """Report-only mode (in scope, kill off): states are reported and nothing is killed."""
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        exe = os.path.join(mnt, "prog")
        ident = copy_exe(ECHO, exe)
        try:
            sensor.set_verdict(ident, allow=True)
            drain(sensor)
            assert run([exe]).returncode == 0
            assert wait_record(sensor, path=exe).state == KernelState.ALLOW

            sensor.set_verdict(ident, allow=False)
            assert run([exe]).returncode == 0  # kill off: reported only
            rec = wait_record(sensor, path=exe)
            assert (rec.state, rec.denied) == (KernelState.DENY, True)
            assert rec.action == KernelAction.NONE

            with open(exe, "ab") as f:  # content change: ctime and size move
                f.write(b"\0")
            assert run([exe]).returncode == 0
            assert wait_record(sensor, path=exe).state == KernelState.STALE

            sensor.forget(ident)
            sensor.forget(ident)  # forgetting twice is fine
            assert run([exe]).returncode == 0
            assert wait_record(sensor, path=exe).state == KernelState.UNKNOWN
        finally:
            sensor.forget(ident)


def test_stats_count_execs_and_no_drops(sensor: BpfExecSensor) -> None:
    """Every exec on the host is counted; only those in scope are decoded."""
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        exe = os.path.join(mnt, "true")
        copy_exe("/bin/true", exe)
        drain(sensor)  # the ring fills up between tests when other sessions exec a lot
        before = sensor.stats()
        for _ in range(20):
            run([exe])
        run(["/bin/true"])  # out of scope: counted, never reported
        drain(sensor)
        after = sensor.stats()
    assert after.execs >= before.execs + 21
    assert after.decoded >= before.decoded + 20 and after.in_scope >= before.in_scope + 20
    assert after.drops == before.drops
    assert after.short_records == 0 and after.unknown_records == 0


def test_full_ring_counts_drops() -> None:
    """A one-page ring buffer that nobody drains fills up; the lost events are counted."""
    with BpfExecSensor(SensorConfig(ringbuf_pages=1)) as small, \
            scoped_tmpfs(small, in_scope=True) as mnt:
        exe = os.path.join(mnt, "true")
        copy_exe("/bin/true", exe)
        for _ in range(30):  # 336-byte records: a 4 KiB ring holds 12
            run([exe])
        st = small.stats()
        assert st.drops >= 30 - 12
        assert st.execs >= 30
        assert len(small.poll(0)) <= 12


def test_bad_knobs_are_rejected_before_compiling() -> None:
    with pytest.raises(ValueError, match="power of two"):
        BpfExecSensor(SensorConfig(ringbuf_pages=3))
    with pytest.raises(ValueError, match="verdict_max"):
        SensorConfig(verdict_max=0).cflags()


def test_missing_btf_is_sensor_unavailable() -> None:
    from agent.sensors.bpf_exec import build_cflags

    with pytest.raises(SensorUnavailable) as err:
        build_cflags(SensorConfig(), btf_path="/nonexistent/vmlinux")
    assert err.value.backend == "kill" and "BTF" in (err.value.hint or "")


def test_print_bpf_shows_cflags_and_source() -> None:
    text = print_bpf()
    assert "-DEG_OFF_INODE_CTIME_SEC=" in text and "RAW_TRACEPOINT_PROBE" in text


def test_full_verdict_map_and_closed_sensor_are_clear_errors() -> None:
    s = BpfExecSensor(SensorConfig(verdict_max=1))
    try:
        s.set_verdict(FileIdentity(os.makedev(8, 1), 1, 0, 0), allow=True)
        with pytest.raises(SensorMapError, match="set_verdict failed") as err:
            s.set_verdict(FileIdentity(os.makedev(8, 1), 2, 0, 0), allow=True)
        assert err.value.backend == "kill"
    finally:
        s.close()
    s.close()  # idempotent
    with pytest.raises(SensorUnavailable):
        s.poll(0)
    with pytest.raises(SensorMapError, match="closed"):
        s.set_mode(enforce=True, deny_unknown=True)


def test_compile_error_becomes_sensor_unavailable_with_the_compiler_message() -> None:
    with pytest.raises(SensorUnavailable) as err:
        BpfExecSensor(offsets={})  # exec_sensor.c refuses to build without BTF offsets
    assert err.value.backend == "kill"
    assert "EG_OFF_" in err.value.cause and "Failed to compile" in err.value.cause
    assert "backend kill is unavailable" in err.value.diagnostics()


def test_unprivileged_load_becomes_sensor_unavailable() -> None:
    code = (
        "from agent.sensors.bpf_exec import BpfExecSensor\n"
        "from agent.sensors.errors import SensorUnavailable\n"
        "try:\n    BpfExecSensor()\n"
        "except SensorUnavailable as e:\n    print('UNAVAILABLE', e.diagnostics())\n"
    )
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [*cmd, sys.executable, "-c", code],
        cwd=repo,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("UNAVAILABLE backend kill is unavailable"), proc.stdout
    assert "hint:" in proc.stdout
