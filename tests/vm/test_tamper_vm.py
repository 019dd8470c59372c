"""Tamper resistance on bpf-lsm (issue 10), as root inside the test VM under each lockdown
mode: an agent whose policy says ``on_agent_exit = "keep-enforcing"`` pins its programs
and refuses everyone else its process, its BPF objects, its pins and its files.

Every attempt below is made the way an attacker would (signals, strace/gdb, prlimit,
renice, bpftool on its links and maps by id and by pinned path, rm/mv/umount of bpffs,
writes to its state, keys and policy, loading a tracing program). After each: the attempt
failed, an unsigned binary in scope is still denied, a signed one still runs, and a
``tamper`` record exists (decision log and auditd). Then the authorized stop (a break-glass
token with grant ``stop``, tests/integration/test_authorized_stop.py has the refusals)
removes every program and pin, and the unsigned binary runs.

It runs under ``integrity`` (raised at runtime) and ``confidentiality`` (from boot): with
lockdown off root changes the kernel itself. In the boot-time run (a boot of its own, so
what it leaves behind cannot touch another run) a second agent is killed through a way
the LSM cannot refuse (``cgroup.kill``): its pinned programs go on enforcing, and a
restarted agent reports the denials they made alone. The orphan stays until the VM powers
off; its policy keeps it to its own tmpfs (kept mounted, so its device number is never
reused) and it judges neither loaders nor unseen filesystems.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Set

import pytest

from tests.agent_fixtures import RunningAgent, cli, exec_file, keygen, running_agent, wait_for
from tests.policy_fixtures import Material, copy_signed
from tests.rearm_fixtures import write_policy
from tests.record_fixtures import Auditd, auditd_running, wait_in_log
from tests.vm.guest_env import load_manifest

# the lockdown levels that keep root out of the kernel (with none, root loads a module), once
# each: integrity raised at runtime, confidentiality from boot (the strictest; ~4 min a run)
pytestmark = [pytest.mark.timeout(900),
              pytest.mark.lockdown_runs("integrity", "confidentiality-boot")]
EPERM_RC = 126
PIN_ROOT = Path("/sys/fs/bpf/execguard")



def run(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def keep_enforcing_policy(path: Path, scope: Path, material: Material, contained: bool) -> None:
    write_policy(path, mode="enforce", scopes=[scope], keys=[material.keys["a"]],
                 deadline_ms=15000)
    text = path.read_text().replace('mode = "enforce"\n', 'mode = "enforce"\n'
                                    'on_agent_exit = "keep-enforcing"\n', 1)
    if contained:  # an orphan that outlives the test judges its own tmpfs only
        text += '\n[boundary]\nloader = "allow"\nunseen_filesystems = "out-of-scope"\n'
    path.write_text(text)


class Rig(NamedTuple):
    agent: RunningAgent
    scope: Path
    ok: Path
    bad: Path
    policy: Path
    auditd: Auditd
    tokens: List[Path]


def stop_tokens(tmp: Path, count: int) -> List[Path]:
    """Break-glass keys pinned for the agent, and ``count`` stop tokens for this host."""
    keys = tmp / "bg-keys"
    keys.mkdir()
    key = keygen(keys / "ops")  # ops.pub is the pinned key
    host = cli("breakglass", "host-id").stdout.strip()
    out = []
    for i in range(count):
        token = tmp / f"stop-{i}.token"
        done = cli("breakglass", "issue", "--host", host, "--seconds", "3600", "--reason",
                   f"tamper test stop {i}", "--key", str(key), "--grant", "stop",
                   "-o", str(token))
        assert done.returncode == 0, done.stderr
        out.append(token)
    return out


def authorized_stop(agent: RunningAgent, token: Path) -> subprocess.CompletedProcess[str]:
    done = cli("stop", "--token", str(token), "--state-dir", str(agent.state_dir), "--json")
    if done.returncode == 0:
        agent.proc.wait(timeout=60)
    return done


@contextlib.contextmanager
def protected_agent(tmp: Path, material: Material, auditd: Auditd, scope: Path,
                    contained: bool) -> Iterator[Rig]:
    ok = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
    bad = copy_signed(material.bins["app"], scope / "bad", None)
    tokens = stop_tokens(tmp, 2)
    policy = tmp / "policy.toml"
    keep_enforcing_policy(policy, scope, material, contained)
    with running_agent(tmp, "--policy", str(policy), "--backend", "bpf-lsm",
                       "--breakglass-keys", str(tmp / "bg-keys"), ready_timeout=240) as agent:
        rig = Rig(agent, scope, ok, bad, policy, auditd, tokens)
        try:
            wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=120)
            try:
                wait_for(lambda: bool(tamper(rig).get("protected")), timeout=30)
            except AssertionError:
                raise AssertionError(f"not protected: {tamper(rig)}\n"
                                     f"{agent.output.read_text()[-3000:]}") from None
            yield rig
        finally:
            if agent.proc.poll() is None:  # a failed test must not leave it protected
                authorized_stop(agent, tokens[-1])


def tamper(rig: Rig) -> Dict[str, Any]:
    out: Dict[str, Any] = rig.agent.status()["sensor"]["tamper"]
    return out


def still_enforcing(rig: Rig, what: str) -> None:
    assert rig.agent.proc.poll() is None, f"after {what}: the agent died"
    assert exec_file(rig.bad).returncode == EPERM_RC, f"after {what}: unsigned binary ran"
    assert exec_file(rig.ok).returncode == 0, f"after {what}: signed binary denied"


def attempts(rig: Rig) -> Set[str]:
    return {d.get("extra", {}).get("attempt") for d in rig.agent.decisions()
            if d["reason"] == "tamper"}


def refused(rig: Rig, attempt: str) -> None:
    wait_for(lambda: attempt in attempts(rig), timeout=15)


def failed(done: subprocess.CompletedProcess[str], what: str) -> None:
    assert done.returncode != 0, f"{what} succeeded: {done.stdout} {done.stderr}"


def load_tracing_program() -> int:
    """BPF_PROG_LOAD of a two-instruction kprobe program: 0 when it loaded, else errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = (ctypes.c_uint64 * 2)(0xB7, 0x95)  # r0 = 0; exit
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1] = 2, 2  # BPF_PROG_TYPE_KPROBE, insn_cnt
    ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(insns)
    ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(license_)
    fd = libc.syscall(321, 5, ctypes.byref(attr), ctypes.sizeof(attr))  # bpf(BPF_PROG_LOAD)
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return 0


def map_fd_by_id(map_id: int, readonly: bool) -> Any:
    """BPF_MAP_GET_FD_BY_ID: errno on failure, else the map's name ("stats" for the
    counters, which may be read)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 4)(map_id, 0, 1 << 3 if readonly else 0, 0)
    fd = libc.syscall(321, 14, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return ctypes.get_errno()
    try:
        info = (ctypes.c_uint8 * 88)()
        iattr = (ctypes.c_uint32 * 4)(fd, 88, 0, 0)
        ctypes.c_uint64.from_buffer(iattr, 8).value = ctypes.addressof(info)
        assert libc.syscall(321, 15, ctypes.byref(iattr), ctypes.sizeof(iattr)) == 0
        return bytes(info[24:40]).split(b"\0")[0].decode()  # bpf_map_info.name
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, vm_material: Material) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("tamper")
    scope = Path(tempfile.mkdtemp(prefix="eg-tamper-scope-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "eg-tamper", str(scope)],
                   check=True, timeout=10)
    try:
        with auditd_running() as auditd, \
                protected_agent(tmp, vm_material, auditd, scope, contained=False) as rig:
            yield rig
    finally:
        subprocess.run(["umount", "-l", str(scope)], capture_output=True, timeout=10)


def test_the_agent_refuses_signals_ptrace_and_limits(rig: Rig) -> None:
    pid = rig.agent.proc.pid
    for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        with pytest.raises(PermissionError):
            os.kill(pid, sig)
    os.kill(pid, 0)  # existence is no secret
    refused(rig, "signal")
    # SIGIO with F_SETSIG: the kernel sends it without security_task_kill
    a, b = socket.socketpair()
    try:
        fcntl.fcntl(a, fcntl.F_SETOWN, pid)
        fcntl.fcntl(a, 10, signal.SIGKILL)  # F_SETSIG
        fcntl.fcntl(a, fcntl.F_SETFL, os.O_ASYNC)
        b.send(b"x")
        time.sleep(1)
    finally:
        a.close()
        b.close()
    assert rig.agent.proc.poll() is None, "SIGIO killed the agent"
    # its children (the fanotify watchdog) hold what it holds
    children = [int(p) for p in run("pgrep", "-P", str(pid)).stdout.split()]
    assert children, "the agent has no child to attack (fanotify watchdog?)"
    for child in children:
        with pytest.raises(PermissionError):
            os.kill(child, signal.SIGKILL)
        failed(run("gdb", "-batch", "-p", str(child), "-ex", "detach", timeout=60),
               "gdb -p on the agent's child")
    failed(run("strace", "-p", str(pid), "-e", "trace=none", timeout=20), "strace -p")
    failed(run("gdb", "-batch", "-p", str(pid), "-ex", "detach", timeout=60), "gdb -p")
    refused(rig, "ptrace")
    failed(run("prlimit", f"--pid={pid}", "--nofile=16:16"), "prlimit --nofile")
    failed(run("renice", "-n", "19", "-p", str(pid)), "renice")
    refused(rig, "task")
    still_enforcing(rig, "signals, ptrace and limits")


def test_bpftool_cannot_reach_its_links_maps_or_programs(rig: Rig) -> None:
    ids = tamper(rig)["guarded_ids"]
    assert ids["links"] and ids["maps"] and ids["programs"], ids
    for link in ids["links"][:3]:
        failed(run("bpftool", "link", "detach", "id", str(link)), f"bpftool link detach {link}")
    refused(rig, "bpf-id")
    for m in ids["maps"][:3]:
        failed(run("bpftool", "map", "update", "id", str(m), "key", "hex", "00", "00", "00",
                   "00", "value", "hex", *(["00"] * 8)), f"bpftool map update {m}")
        failed(run("bpftool", "map", "delete", "id", str(m), "key", "hex", "00", "00", "00",
                   "00"), f"bpftool map delete {m}")
    for prog in ids["programs"][:3]:
        failed(run("bpftool", "prog", "dump", "xlated", "id", str(prog)), "bpftool prog dump")
    pins = sorted(Path(tamper(rig)["pin_directory"]).glob("link_*"))
    assert pins, tamper(rig)
    failed(run("bpftool", "link", "detach", "pinned", str(pins[0])), "bpftool detach pinned")
    refused(rig, "pin")
    for m in ids["maps"]:  # read-only is no way in either: a program of one's own writes it
        assert map_fd_by_id(m, readonly=True) in (errno.EPERM, "stats"), m
    assert load_tracing_program() == errno.EPERM
    refused(rig, "bpf-load")
    still_enforcing(rig, "bpftool")


def test_its_pins_and_bpffs_stay(rig: Rig) -> None:
    directory = Path(tamper(rig)["pin_directory"])
    pin = sorted(directory.glob("link_*"))[0]
    with pytest.raises(PermissionError):
        pin.unlink()
    with pytest.raises(PermissionError):
        pin.rename(directory / "moved")
    with pytest.raises(PermissionError):
        (directory / "new").mkdir()
    with pytest.raises(PermissionError):
        directory.rmdir()
    failed(run("rm", "-rf", str(PIN_ROOT)), "rm -rf the pin root")
    failed(run("umount", "/sys/fs/bpf"), "umount bpffs")
    failed(run("umount", "-l", "/sys/fs/bpf"), "umount -l bpffs")
    refused(rig, "umount")
    assert pin.exists()
    still_enforcing(rig, "rm, mv and umount of its pins")


def test_its_state_keys_and_policy_cannot_be_changed(rig: Rig, vm_material: Material) -> None:
    state = rig.agent.state_dir
    attempts_: Dict[str, Callable[[], object]] = {
        "create in its state dir": lambda: (state / "planted").write_text("x"),
        "rewrite its policy": lambda: rig.policy.write_text('mode = "monitor"\n'),
        "unlink its policy": lambda: rig.policy.unlink(),
        "append to its trusted key": lambda: vm_material.keys["a"].open("a").close(),
        "rename its policy": lambda: os.rename(rig.policy, rig.policy.with_suffix(".old")),
        "truncate its decision log": lambda: (rig.agent.log_dir / "decisions.jsonl")
        .write_text(""),
    }
    st = rig.policy.stat()
    info = tamper(rig)
    assert [st.st_dev, st.st_ino, 4] in info["guarded_inodes"], (st, info)
    ran = []
    for name, attempt in attempts_.items():
        try:
            attempt()
        except PermissionError:
            continue
        except OSError as exc:  # it got past the guard and failed for another reason
            ran.append(f"{name} ({exc})")
            continue
        ran.append(name)
    assert not ran, f"not refused: {ran}; before: {info}; after: {tamper(rig)}"
    refused(rig, "file")
    chattr = run("chattr", "+i", str(rig.policy))
    assert chattr.returncode != 0 and "not permitted" in chattr.stderr, chattr
    with pytest.raises(PermissionError):
        os.setxattr(rig.policy, "user.eg", b"1")
    # the directories above its files: not moved, not mounted over
    above = state.parent.parent
    decoy = Path(tempfile.mkdtemp(prefix="eg-decoy-"))
    failed(run("mount", "--bind", str(decoy), str(above)), "mount over a parent of its state")
    # from a namespace of its own whose copy propagates back (a shared peer): refused too
    where = run("findmnt", "-no", "TARGET", "-T", str(above)).stdout.strip()
    was = run("findmnt", "-no", "PROPAGATION", where).stdout.strip()
    assert run("mount", "--make-shared", where).returncode == 0  # as on a systemd host
    try:
        failed(run("unshare", "-m", "--propagation", "unchanged", "mount", "--bind",
                   str(decoy), str(above)), "mount over a parent of its state, shared")
        # a slave copy is the namespace's alone (systemd's ProtectSystem= for a unit)
        slave = run("unshare", "-m", "--propagation", "slave", "mount", "--bind", str(decoy),
                    str(above))
        assert slave.returncode == 0, f"a private namespace's own mount refused: {slave}"
    finally:
        if was and was != "shared":
            run("mount", f"--make-{was.split(',')[0]}", where)
    with pytest.raises(PermissionError):
        os.rename(above, str(above) + "-moved")
    decoy.rmdir()
    assert 'on_agent_exit = "keep-enforcing"' in rig.policy.read_text()  # reading is fine
    still_enforcing(rig, "writes to its files")
    wait_in_log(rig.auditd.log_file, "reason=tamper", timeout=30)


def test_the_authorized_stop_removes_every_program_and_pin(rig: Rig, vm_results: Path,
                                                           tmp_path: Path) -> None:
    """As a package upgrade does it (packaging/service-ctl, the installed copy, which the
    .deb's prerm and the RPM's %pre run): refused at once without a token, and the agent
    keeps enforcing; with one, the agent stops and takes every program and pin with it."""
    directory = Path(tamper(rig)["pin_directory"])
    links = tamper(rig)["guarded_ids"]["links"]
    root = Path(load_manifest(vm_results / "fixtures")["installed:root"])
    ctl = root / "opt" / "execguard" / "share" / "execguard" / "service-ctl"
    defaults = tmp_path / "execguard.default"  # the unit's options file: where the agent is
    defaults.write_text(f'EXECGUARD_STOP_OPTS="--state-dir {rig.agent.state_dir}"\n')
    env = {"PATH": os.environ["PATH"], "EXECGUARD_DEFAULTS": str(defaults),
           "EXECGUARD_STOP_TOKEN": str(tmp_path / "no.token")}
    refused = subprocess.run([str(ctl), "stopping", "upgrade"], capture_output=True,
                             text=True, timeout=60, env=env)
    assert refused.returncode == 1 and "put a break-glass token of grant stop" in \
        refused.stderr, refused
    still_enforcing(rig, "a package's stop without a token")
    env["EXECGUARD_STOP_TOKEN"] = str(rig.tokens[0])
    done = subprocess.run([str(ctl), "stopping", "upgrade"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    rig.agent.proc.wait(timeout=60)
    assert not directory.exists()
    shown = json.loads(run("bpftool", "-j", "link", "show").stdout or "[]")
    assert not {link["id"] for link in shown} & set(links)
    assert exec_file(rig.bad).returncode == 0  # enforcement ended with the agent
    assert load_tracing_program() == 0


def test_fmod_ret_pins_outlive_its_agent_but_root_can_remove_them(
        tmp_path_factory: pytest.TempPathFactory, vm_material: Material) -> None:
    """fmod-ret pins its links too, so its enforcement outlives a crash; its tracing
    programs have no hook to refuse signals or bpf(), so root's kill -9 and rm of the pins
    work (doctor and status say so: self_protection false)."""
    tmp = tmp_path_factory.mktemp("fmodret")
    scope = Path(tempfile.mkdtemp(prefix="eg-fmodret-scope-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "eg-fmodret",
                    str(scope)], check=True, timeout=10)
    try:
        ok = copy_signed(vm_material.bins["app"], scope / "ok", vm_material.private["a"])
        bad = copy_signed(vm_material.bins["app"], scope / "bad", None)
        policy = tmp / "policy.toml"
        keep_enforcing_policy(policy, scope, vm_material, contained=False)
        with running_agent(tmp, "--policy", str(policy), "--backend", "fmod-ret",
                           ready_timeout=240) as agent:
            wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=120)
            t = agent.status()["sensor"]["tamper"]
            assert t["keep_enforcing"] and not t["self_protection"] and not t["protected"], t
            directory = Path(t["pin_directory"])
            os.kill(agent.proc.pid, signal.SIGKILL)  # nothing refuses it
            agent.proc.wait(timeout=30)
            assert exec_file(bad).returncode == EPERM_RC  # the pinned links enforce
            assert exec_file(ok).returncode == 0
            assert run("rm", "-rf", str(directory)).returncode == 0  # nothing guards them
            wait_for(lambda: exec_file(bad).returncode == 0, timeout=20)
    finally:
        subprocess.run(["umount", "-l", str(scope)], capture_output=True, timeout=10)


@pytest.mark.lockdown_runs("confidentiality-boot")  # a boot of its own: the orphan stays
def test_enforcement_outlives_an_agent_killed_past_its_guards(
        tmp_path_factory: pytest.TempPathFactory, vm_material: Material) -> None:
    tmp = tmp_path_factory.mktemp("orphan")
    scope = Path(tempfile.mkdtemp(prefix="eg-orphan-scope-"))  # never unmounted
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "eg-orphan",
                    str(scope)], check=True, timeout=10)
    cg = Path(tempfile.mkdtemp(prefix="eg-cgroup-"))
    subprocess.run(["mount", "-t", "cgroup2", "none", str(cg)], check=True, timeout=10)
    with auditd_running() as auditd, \
            protected_agent(tmp, vm_material, auditd, scope, contained=True) as rig:
        directory = Path(tamper(rig)["pin_directory"])
        group = cg / f"eg-orphan-{os.getpid()}"
        group.mkdir()
        (group / "cgroup.procs").write_text(str(rig.agent.proc.pid))
        (group / "cgroup.kill").write_text("1")  # SIGKILL from the kernel: no task_kill
        rig.agent.proc.wait(timeout=30)
        assert directory.exists()
        assert exec_file(rig.bad).returncode == EPERM_RC  # the pinned programs enforce
        assert exec_file(rig.ok).returncode == 0  # from the verdicts they hold
        time.sleep(1)  # the process is freed (task_free) once reaped: it enforces alone
        assert exec_file(rig.bad).returncode == EPERM_RC
        with pytest.raises(PermissionError):
            sorted(directory.glob("link_*"))[0].unlink()
        # a restarted agent cannot adopt the orphan: it reports it and its denials, and
        # pins and protects itself beside it (the orphan lets it load, pin and write)
        again = tmp / "again"
        again.mkdir()
        with running_agent(again, "--policy", str(rig.policy), "--backend", "bpf-lsm",
                           "--breakglass-keys", str(tmp / "bg-keys"),
                           ready_timeout=240) as second:
            t = second.status()["sensor"]["tamper"]
            mine = [o for o in t["orphans"] if o["directory"] == str(directory)]
            assert mine and mine[0]["counters"]["orphan_denied"] >= 1, t["orphans"]
            wait_for(lambda: bool(second.status()["sensor"]["tamper"]["protected"]), 60)
            with pytest.raises(PermissionError):
                os.kill(second.proc.pid, signal.SIGKILL)
            done = authorized_stop(second, rig.tokens[0])
            assert done.returncode == 0, (done.stdout, done.stderr)
        assert exec_file(rig.bad).returncode == EPERM_RC  # the orphan stays until reboot
