"""The kill backend on this host's kernel, scoped to tmpfs mounts the tests own.

SAFETY: the kernel kills only files in scope. Every test here keeps every filesystem
without a class out of scope (``ONLY_CLASSED`` guards) and gives a class only to its own
fresh tmpfs; ``scoped_tmpfs`` resets the mode to report-only, drops the class and unmounts
in ``finally``. Each test has a deadline.
"""

from __future__ import annotations

import os

import pytest

from agent.sensors.bpf_exec import BpfExecSensor, SensorConfig, build_cflags, kill_offsets
from agent.sensors.decode import KernelAction, KernelState
from agent.sensors.kernel_layout import VMLINUX_BTF, Btf
from agent.sensors.selftest import private_tmpfs, run_selftest
from tests.bpf_exec_fixtures import (  # noqa: F401  (fixtures are found by name)
    ECHO,
    copy_exe,
    drain,
    enforce,
    reset,
    run,
    scoped_tmpfs,
    sensor_fixture,
    wait_record,
)

pytestmark = pytest.mark.timeout(60)


def test_selftest_passes_on_this_kernel(sensor: BpfExecSensor) -> None:
    before = sensor.stats().kills
    res = run_selftest(sensor)
    assert res.ok, res.detail
    assert res.identity_ok and res.kill_ok and res.mapping_ok
    assert sensor.stats().kills == before + 2  # the exec and the mapping
    assert sensor.mode == (False, False) and sensor.fs_classes == {}  # restored


def test_denied_binary_in_scope_is_killed_before_it_prints(sensor: BpfExecSensor) -> None:
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        bad, good = os.path.join(mnt, "unsigned"), os.path.join(mnt, "signed")
        bad_id, good_id = copy_exe(ECHO, bad), copy_exe(ECHO, good)
        try:
            sensor.set_verdict(bad_id, allow=False)
            sensor.set_verdict(good_id, allow=True)
            enforce(sensor, deny_unknown=False)
            drain(sensor)
            killed = run([bad, "must-not-print"])
            assert (killed.returncode, killed.stdout) == (-9, b"")
            rec = wait_record(sensor, path=bad)
            assert (rec.state, rec.action, rec.in_scope) == (
                KernelState.DENY,
                KernelAction.KILLED,
                True,
            )
            ran = run([good, "ok"])
            assert (ran.returncode, ran.stdout) == (0, b"ok\n")
        finally:
            sensor.forget(bad_id)
            sensor.forget(good_id)
    # scope gone, mode reset: nothing is killed any more


def test_enforce_kills_unknown_in_scope_and_spares_everything_outside(
    sensor: BpfExecSensor,
) -> None:
    with scoped_tmpfs(sensor, in_scope=True) as inside, private_tmpfs() as outside:
        unknown = os.path.join(inside, "new-binary")
        copy_exe(ECHO, unknown)
        denied_outside = os.path.join(outside, "denied-elsewhere")
        out_id = copy_exe(ECHO, denied_outside)
        try:
            sensor.set_verdict(out_id, allow=False)
            enforce(sensor)
            drain(sensor)
            killed = run([unknown, "x"])
            assert (killed.returncode, killed.stdout) == (-9, b"")
            assert wait_record(sensor, path=unknown).action == KernelAction.KILLED

            # Outside the scope: unknown files and even deny verdicts run, unreported.
            true = run(["/bin/true"])
            assert true.returncode == 0
            elsewhere = run([denied_outside, "still runs"])
            assert (elsewhere.returncode, elsewhere.stdout) == (0, b"still runs\n")
            assert not [r for r in sensor.poll(100)
                        if r.event.path in ("/bin/true", denied_outside)]
        finally:
            sensor.forget(out_id)


def test_modified_binary_loses_its_allow(sensor: BpfExecSensor) -> None:
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        exe = os.path.join(mnt, "app")
        ident = copy_exe(ECHO, exe)
        try:
            sensor.set_verdict(ident, allow=True)
            enforce(sensor)
            assert run([exe]).returncode == 0
            with open(exe, "ab") as f:  # tampered after verification
                f.write(b"\0")
            drain(sensor)
            tampered = run([exe, "x"])
            assert (tampered.returncode, tampered.stdout) == (-9, b"")
            assert wait_record(sensor, path=exe).state == KernelState.STALE
        finally:
            sensor.forget(ident)


def test_scope_removed_means_no_kill(sensor: BpfExecSensor) -> None:
    with scoped_tmpfs(sensor, in_scope=True) as mnt:
        exe = os.path.join(mnt, "app")
        ident = copy_exe(ECHO, exe)
        try:
            sensor.set_verdict(ident, allow=False)
            enforce(sensor)
            assert run([exe]).returncode == -9
            sensor.remove_scope_dev(ident.dev)  # unclassified, and unseen filesystems are out
            assert run([exe, "y"]).stdout == b"y\n"
            sensor.add_scope_dev(ident.dev)
            sensor.set_mode(enforce=False, deny_unknown=True)  # monitor: report only
            assert run([exe, "z"]).stdout == b"z\n"
        finally:
            sensor.forget(ident)


def test_kill_still_happens_when_the_ring_is_full() -> None:
    """A lost event must not lose the kill: the program decides before it needs the ring."""
    with BpfExecSensor(SensorConfig(ringbuf_pages=1)) as small, scoped_tmpfs(
        small, in_scope=True
    ) as mnt:
        exe = os.path.join(mnt, "unsigned")
        ident = copy_exe(ECHO, exe)
        filler = os.path.join(mnt, "true")
        copy_exe("/bin/true", filler)
        for _ in range(20):  # fill the one-page ring; nobody drains it
            run([filler])
        small.set_verdict(ident, allow=False)
        enforce(small, deny_unknown=False)
        drops = small.stats().drops
        killed = run([exe, "x"])
        assert (killed.returncode, killed.stdout) == (-9, b"")
        st = small.stats()
        assert st.drops > drops and st.kills == 1


def test_selftest_catches_a_wrong_struct_offset() -> None:
    """What the 6.1 headers would do to ctime here: the identity check must fail, loudly."""
    with open(VMLINUX_BTF, "rb") as f:
        blob = f.read()
    offsets = kill_offsets(Btf(blob), blob)
    offsets["EG_OFF_INODE_CTIME_SEC"] += 8  # the neighbouring field
    assert "-DEG_OFF_INODE_CTIME_SEC=" in " ".join(build_cflags(SensorConfig(), offsets=offsets))
    with BpfExecSensor(offsets=offsets) as wrong:
        res = run_selftest(wrong)
    assert not res.ok and not res.identity_ok and not res.kill_ok
    assert "identity mismatch" in res.detail and "ctime_ns" in res.detail


def test_selftest_refuses_to_run_with_a_scope_configured(sensor: BpfExecSensor) -> None:
    """Its kill part turns kill on: with other filesystems in scope it could kill there
    too."""
    with scoped_tmpfs(sensor, in_scope=True):
        res = run_selftest(sensor)
        assert not res.ok and "before the scope is configured" in res.detail
    reset(sensor)
    assert run_selftest(sensor, kill=False).identity_ok  # identity alone is harmless
    assert sensor.scope == frozenset() and sensor.fs_classes == {}
