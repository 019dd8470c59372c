"""A FUSE filesystem in scope that never answers the agent does not end enforcement
(fanotify-exec; issue 9, points 6 and 7).

For each exec permission event the kernel opens the event's file inside the agent's
``read(2)`` of its fanotify group; on FUSE that open, and every stat and read of the file
after it, is a request to the filesystem's daemon. The daemon here (tests/attacks/
fuse_daemon.py: the real kernel FUSE protocol on /dev/fuse, mounted as root inside the
scope, as a user's ``fusermount3`` mount would be) serves everybody but the agent, whose
requests it reads and never answers. Without a defence the agent's event loop waits in
that open for ever: every exec in scope waits with it, and the agent's watchdog kills the
agent after its stall limit (4 x the deadline + 1 s), which fails open.

The agent must cut such a filesystem off (abort its FUSE connection) before its watchdog
would act: the attacker's exec is denied, the signed program keeps running, an unsigned
one stays denied, the agent lives on, and the abort is on record.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import pytest

from tests.agent_fixtures import (
    REPO,
    RunningAgent,
    exec_file,
    running_agent,
    scoped_tmpfs,
    wait_for,
)
from tests.flood_fixtures import NOBODY, as_user, enforce_policy
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify and FUSE mounts need root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.timeout(240),
]

DEADLINE_MS = 500  # the policy's; the watchdog's stall limit is then 3 s
UNIT = REPO / "packaging" / "execguard.service"


def as_the_unit() -> Dict[str, Any]:
    """running_agent() arguments that run this checkout's agent with the shipped unit's
    capability bounding set, as the service runs it (a user's fusectl abort file needs
    CAP_DAC_OVERRIDE: found in review, when the tests ran the agent with every capability)."""
    line = next(x for x in UNIT.read_text().splitlines()
                if x.startswith("CapabilityBoundingSet="))
    caps = ",".join("+" + c.lower()[len("cap_"):] for c in line.split("=", 1)[1].split())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return {"execguard": ("setpriv", f"--bounding-set=-all,{caps}", sys.executable, "-m",
                          "agent"), "env": env}


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


@contextlib.contextmanager
def stalling_fuse(mnt: Path, payload: Path, stall_pid: int, stall: str = "all",
                  uid: Optional[int] = None, options: str = "") -> Iterator[Path]:
    """The daemon mounted at ``mnt``, serving ``payload`` under any name (``mnt/prog``,
    ``mnt/prog1``...): as root with mount(2), or as ``uid`` through the setuid fusermount3
    in a directory that user owns. Unmounted (lazily, if it hangs) and killed in finally."""
    mnt.mkdir()
    ready = mnt.parent / f".{mnt.name}.ready"
    cmd = [sys.executable, "-m", "tests.attacks.fuse_daemon", "--mountpoint", str(mnt),
           "--file", str(payload), "--stall-pid", str(stall_pid), "--stall", stall,
           "--ready", str(ready), "--options", options]
    if uid is not None:
        os.chown(mnt, uid, uid)
        os.chmod(mnt.parent, 0o1777)  # the ready file, written as the user
        cmd = [*as_user(uid), *cmd, "--fusermount"]
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, timeout=15)
        assert proc.poll() is None, f"the FUSE daemon did not start: {proc.stderr.read()}"
        yield mnt / "prog"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def fuse_agent(tmp_path: Path, material: Material, mode: str = "enforce"
               ) -> Iterator[Tuple[Path, Path, RunningAgent]]:
    """(scope, payload, agent): fanotify-exec in ``mode`` on a scope of its own, run as the
    unit runs it; the payload (the app's bytes, for a FUSE daemon to serve) readable by all,
    never exec'd from there."""
    with scoped_tmpfs() as scope:
        payload = scope / "payload"
        shutil.copy2(material.bins["app"].path, payload)
        policy = enforce_policy(tmp_path / "policy.toml", scope, material.keys["a"],
                                DEADLINE_MS)
        policy.write_text(policy.read_text().replace('mode = "enforce"', f'mode = "{mode}"'))
        with running_agent(tmp_path, "--policy", str(policy), "--backend", "fanotify-exec",
                           "--audit", "off", **as_the_unit()) as agent:
            yield scope, payload, agent


def fuse_marked(agent: RunningAgent) -> None:
    """Wait for the mount watcher to mark the new FUSE filesystem."""
    wait_for(lambda: any("fuse" in m for m in agent.status()["sensor"]["marked"]), timeout=30)


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_a_fuse_file_that_never_answers_the_agent_is_cut_off_not_waited_for(
        tmp_path: Path, material: Material, who: str) -> None:
    """nobody: the user's own FUSE mount in a directory it owns in scope, made by the
    setuid fusermount3 (no allow_other: root's own lookups there are refused, but the
    kernel's open for the agent's event is still a request to the user's daemon)."""
    uid = NOBODY if who == "nobody" else None
    app = material.bins["app"]
    with fuse_agent(tmp_path, material) as (scope, payload, agent):
        signed = copy_signed(app, scope / "signed", material.private["a"])
        unsigned = copy_signed(app, scope / "unsigned", None)
        assert exec_file(signed).returncode == 0
        with stalling_fuse(scope / "fuse", payload, agent.proc.pid, uid=uid) as prog:
            fuse_marked(agent)
            t0 = time.monotonic()
            attack = subprocess.run([*as_user(uid), "/bin/sh", "-c", 'exec "$0"',
                                     str(prog)], capture_output=True, text=True,
                                    timeout=60)
            waited = time.monotonic() - t0
            assert attack.returncode != 0, "the FUSE file ran"
            # cut off before the watchdog's 3 s, with room for a loaded 2-core host
            assert waited < 10, f"the attacker's exec waited {waited:.1f}s"
            assert exec_file(signed).returncode == 0
            assert exec_file(unsigned).returncode == 126
            time.sleep(4)  # past the watchdog's stall limit
            assert agent.proc.poll() is None, "the agent died"
            assert exec_file(unsigned).returncode == 126
            assert exec_file(signed).returncode == 0
            sensor = agent.status()["sensor"]
            assert sensor["fuse_aborted"] >= 1, sensor
            assert str(scope / "fuse") in sensor["fuse_last_aborted"]
            # the cut-off filesystem answers nobody any more, its owner included
            again = subprocess.run([*as_user(uid), "/bin/sh", "-c", 'exec "$0"',
                                    str(prog)], capture_output=True, text=True,
                                   timeout=60)
            assert "not connected" in again.stderr, again.stderr


def lazy_unmount(mnt: Path, uid: Optional[int]) -> None:
    """Detach the mount at once, as its owner can (fusermount3 -u -z): the filesystem leaves
    every mount table, its connection and the agent's stalled request stay."""
    argv = ["umount", "-l", str(mnt)] if uid is None else \
        [*as_user(uid), "fusermount3", "-u", "-z", str(mnt)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_a_stalled_fuse_file_lazily_unmounted_is_still_cut_off(
        tmp_path: Path, material: Material, who: str) -> None:
    """Found in review: the owner detaches the filesystem (a lazy unmount) while the agent
    waits in its daemon; the filesystem left the mount table, and with it the breaker's
    list of connections, so nothing cut the stalled request off and the agent waited for
    ever. The agent keeps a marked FUSE filesystem on that list after an unmount."""
    uid = NOBODY if who == "nobody" else None
    app = material.bins["app"]
    with fuse_agent(tmp_path, material) as (scope, payload, agent):
        signed = copy_signed(app, scope / "signed", material.private["a"])
        with stalling_fuse(scope / "fuse", payload, agent.proc.pid, uid=uid) as prog:
            fuse_marked(agent)
            t0 = time.monotonic()
            attack = subprocess.Popen([*as_user(uid), "/bin/sh", "-c", 'exec "$0"', str(prog)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.3)  # the agent's open of the event's file is in the daemon now
                lazy_unmount(prog.parent, uid)
                code = attack.wait(60)
            finally:
                attack.kill()
            waited = time.monotonic() - t0
            assert code != 0, "the FUSE file ran"
            assert waited < 10, f"the attacker's exec waited {waited:.1f}s"
            time.sleep(4)  # past the watchdog's stall limit
            assert agent.proc.poll() is None, "the agent died"
            assert agent.status()["sensor"]["fuse_aborted"] >= 1
            assert exec_file(signed).returncode == 0


def test_a_fuse_mount_whose_daemon_never_answers_the_agents_mark_is_cut_off(
        tmp_path: Path, material: Material) -> None:
    """Found in review: with default_permissions the kernel asks the daemon for attributes
    at each permission check, the path lookup of the agent's own fanotify_mark call
    included; a daemon that never answers held that call, and the backend's lock with it,
    so every exec in scope waited. The filesystem is on the breaker's list before the mark
    call is made: cut off, the call fails, and the agent goes on."""
    app = material.bins["app"]
    with fuse_agent(tmp_path, material) as (scope, payload, agent):
        signed = copy_signed(app, scope / "signed", material.private["a"])
        unsigned = copy_signed(app, scope / "unsigned", None)
        with stalling_fuse(scope / "fuse", payload, agent.proc.pid,
                           options="default_permissions"):
            wait_for(lambda: agent.status()["sensor"]["fuse_aborted"] >= 1, timeout=15)
            assert exec_file(signed).returncode == 0
            assert exec_file(unsigned).returncode == 126
            time.sleep(4)  # past the watchdog's stall limit
            assert agent.proc.poll() is None, "the agent died"
            assert exec_file(signed).returncode == 0
            assert str(scope / "fuse") in agent.status()["sensor"]["fuse_last_aborted"]


def test_fuse_reads_that_never_answer_do_not_hold_the_decide_workers(
        tmp_path: Path, material: Material) -> None:
    """The daemon answers the agent's opens and stats but never its reads: the loop goes
    on (each exec gets the deadline's deny) while every decide worker waits hashing a FUSE
    file. Cut off, the workers come back: a file put in scope afterwards is decided on its
    merits, not denied for want of a worker."""
    app = material.bins["app"]
    with fuse_agent(tmp_path, material) as (scope, payload, agent):
        workers = 4  # FanotifyBackend's default
        with stalling_fuse(scope / "fuse", payload, agent.proc.pid, stall="read") as prog:
            fuse_marked(agent)
            names = [prog.with_name(f"prog{i}") for i in range(workers + 2)]
            attacks = [subprocess.Popen(["/bin/sh", "-c", 'exec "$0"', str(p)],
                                        stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL) for p in names]
            try:
                codes = [a.wait(60) for a in attacks]
            finally:
                for a in attacks:
                    a.kill()
            assert all(code != 0 for code in codes), codes
            wait_for(lambda: agent.status()["sensor"]["fuse_aborted"] >= 1, timeout=15)
            # every worker came back: each stuck decision ended, recorded late (the
            # deadline's deny had answered the exec)
            for p in names:
                agent.wait_decision(str(p))
            wait_for(lambda: sum(1 for r in agent.decisions()
                                 if r["extra"].get("late")) >= workers, timeout=15)
            assert all(r["decision"] == "deny" for r in agent.decisions())
            fresh = copy_signed(app, scope / "fresh", None)
            done = exec_file(fresh)
            assert done.returncode == 126
            reasons = [r["reason"] for r in agent.wait_decision(str(fresh))]
            assert reasons == ["no-signature"], reasons
            assert agent.proc.poll() is None


@pytest.mark.parametrize("mode", ["enforce", "monitor"])
def test_a_users_fuse_mount_in_scope_is_marked_and_its_execs_denied_unread(
        tmp_path: Path, material: Material, mode: str) -> None:
    """fusermount3 mounts without allow_other: the filesystem refuses every other user, root
    too, and so refused the agent's fanotify mark (EACCES), and the user's unsigned program
    there ran unjudged (found here; now the mark goes on with fuse's
    allow_sys_admin_access raised for the call). Its execs are then denied without a read:
    the user's daemon could show the agent other bytes than the exec runs (monitor mode
    lets it run and records the would-deny). The daemon answers everybody."""
    param = Path("/sys/module/fuse/parameters/allow_sys_admin_access")
    before = param.read_text().strip() if param.exists() else "N"  # the module's default
    with fuse_agent(tmp_path, material, mode) as (scope, payload, agent):
        with stalling_fuse(scope / "fuse", payload, agent.proc.pid, stall="none",
                           uid=NOBODY) as prog:
            fuse_marked(agent)
            done = subprocess.run([*as_user(NOBODY), "/bin/sh", "-c", 'exec "$0"',
                                   str(prog)], capture_output=True, text=True, timeout=60)
            assert done.returncode == (126 if mode == "enforce" else 0), done
            records = agent.wait_decision(str(prog))
            assert [r["decision"] for r in records] == ["deny"], records
            assert records[0]["enforcement"] == ("fanotify-deny" if mode == "enforce"
                                                 else "monitor"), records
            assert "FUSE filesystem of user 65534" in records[0]["detail"], records
            assert agent.status()["sensor"]["fuse_aborted"] == 0
        assert param.read_text().strip() == before  # raised for the mark call only


def test_a_fuse_file_that_never_answers_the_kill_agent_is_cut_off(
        tmp_path: Path, material: Material) -> None:
    """kill: the kernel kills the exec of a file it has no verdict for at once; the agent's
    poll thread then opens and reads the file to verify it. On a FUSE filesystem whose
    daemon never answers the agent, that thread waited for ever (past any SIGKILL): every
    new signed file in scope stayed unverified, killed at each exec, and the service
    watchdog would have given up on the agent. The kernel scope's breaker aborts such a
    filesystem first (agent/backends/kernel_scope.py)."""
    app = material.bins["app"]
    with scoped_tmpfs() as scope:
        payload = scope / "payload"
        shutil.copy2(app.path, payload)
        policy = enforce_policy(tmp_path / "policy.toml", scope, material.keys["a"],
                                DEADLINE_MS)
        with running_agent(tmp_path, "--policy", str(policy), "--backend", "kill",
                           "--audit", "off", ready_timeout=120, **as_the_unit()) as agent:
            wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=60)
            with stalling_fuse(scope / "fuse", payload, agent.proc.pid) as prog:
                time.sleep(1)  # the mount watcher notes the new filesystem in milliseconds
                attack = subprocess.run(["/bin/sh", "-c", 'exec "$0"', str(prog)],
                                        capture_output=True, text=True, timeout=60)
                assert attack.returncode != 0, "the FUSE file ran"

                def scope_stats() -> Dict[str, Any]:
                    return dict(agent.status()["sensor"]["scope"])

                wait_for(lambda: scope_stats()["fuse_aborted"] >= 1, timeout=15)
                assert str(scope / "fuse") in scope_stats()["fuse_last_aborted"]
                # the poll thread is free: a new signed file is verified (its first exec,
                # unknown to the kernel, is killed) and runs
                fresh = copy_signed(app, scope / "fresh", material.private["a"])
                deadline = time.monotonic() + 30
                while exec_file(fresh).returncode != 0:
                    assert time.monotonic() < deadline, "the new signed file never ran"
                    time.sleep(0.5)
                time.sleep(4)  # past the service watchdog's window
                assert agent.proc.poll() is None, "the agent died"
                assert agent.status()["state"] == "ready"
