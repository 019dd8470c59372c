"""The ways in: each tries to run attacker code from an enforced scope without the policy's
consent, and what each backend is expected to make of it (``EXPECTED``).

A way has ``prepare(stage, user)``, run before the agent starts (so the agent's pre-scan
verifies every file a way relies on, and nothing is written into the scope while it
enforces except by the attack itself), and ``run(stage, user) -> Outcome``. Nothing here is
host-only: paths come from the ``Stage`` (the scope tmpfs and a work directory outside it,
both the test's own), the programs from ``harness.build_all``; no network. Every exec has a
deadline (``harness``), every mount made in this namespace is undone in ``finally``.

The outcome a backend promises is ``BLOCKED`` (denied before any attacker code ran),
``KILLED`` (killed before its first instruction) or ``RUNS`` with the reason: the gap, and
the host setting that closes it where one exists. The fanotify-exec and kill columns are
measured on current main (tests/attacks/test_attacks_host.py); the lead tightens them as
fixes land.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from tests.attacks.harness import (
    DEFAULT_TIMEOUT,
    LDSO,
    MountRefused,
    Outcome,
    Result,
    SetupError,
    User,
    error,
    finish,
    give,
    mounted,
    read_line,
    run_attack,
    run_until_not_killed,
    spawn,
    uid_gid,
)
from tests.attacks.policies import ALL_SIGNED, GO_DEFAULT, PATH_RULE, PATH_RULE_DIR
from tests.policy_fixtures import sign

BACKENDS: Tuple[str, ...] = ("fanotify-exec", "kill", "bpf-lsm", "fmod-ret")
HOST_BACKENDS: Tuple[str, ...] = ("fanotify-exec", "kill")
CONTROL_DEADLINE = 10.0  # a signed program must run within this (kill: verify, then run)


@dataclass(frozen=True)
class Stage:
    """Where the ways play: all of it the test's own."""

    scope: Path  # the enforced scope: a tmpfs mount point
    work: Path  # outside the scope, on another filesystem, searchable by nobody
    tools: Mapping[str, Path]  # harness.build_all()
    private_key: Path  # signs what the policy must allow (PEM, P-256)
    # time the agent gets to judge a file again after a close-after-write (mmap-shared-
    # prearmed): a small file takes milliseconds on the host, seconds under qemu TCG
    judge_pause: float = 1.0

    def shared(self, name: str) -> Path:
        """Read-only material in the scope, the same for every way."""
        return self.scope / "shared" / name

    def home(self, way: str, user: User) -> Path:
        """This way's own directory in the scope (owned by ``user``)."""
        return self.scope / way / user.value

    def away(self, way: str, user: User) -> Path:
        """This way's own directory outside the scope (owned by ``user``)."""
        return self.work / way / user.value


Prepare = Callable[[Stage, User], None]
Run = Callable[[Stage, User], Outcome]


@dataclass(frozen=True)
class Way:
    name: str
    description: str
    run: Run
    prepare: Optional[Prepare] = None
    # root's variant uses root's privileges (mounts); the nobody variant, where there is
    # one, gets them inside a user namespace (unshare -Urm)
    needs_root: bool = False
    as_nobody: bool = True
    policy: str = ALL_SIGNED  # tests/attacks/policies.py

    @property
    def users(self) -> Tuple[User, ...]:
        return (User.ROOT, User.NOBODY) if self.as_nobody else (User.ROOT,)

    def attempt(self, stage: Stage, user: User) -> Outcome:
        """Run the way; a setup failure is an ERROR outcome, never an exception, but a
        mount the kernel refused (EPERM) is the agent's denial (the no-agent pass proves
        the same mount succeeds without it)."""
        try:
            return self.run(stage, user)
        except MountRefused as exc:
            return Outcome(Result.DENIED, f"refused: {exc}")
        except (SetupError, OSError, subprocess.SubprocessError) as exc:
            return error(f"setup: {type(exc).__name__}: {exc}")


# --- the stage ------------------------------------------------------------------------------

UNSIGNED_SHARED = ("payload-static", "payload-dyn", "payload-go", "payload-go-pie",
                   "payload-go-cgo", "payload-go-nomagic", "payload-go-stripped", "preload.so",
                   "blob.bin")
SIGNED_SHARED = ("benign-dyn", "benign-static")
SCRIPT = "#!/bin/sh\necho 'EG-PWNED script'\n"
# The payload padded (sparse) to 160 MiB, under the default 256 MiB max_file_bytes: with a
# decoy .sig beside it the agent must hash all of it before it can say "bad-signature", so
# where the only defence is the agent's kill after verification, the payload's marker is
# out long before (a race the attacker wins on purpose, so the outcome is deterministic).
FAT_SIZE = 160 << 20
DECOY_SIG = "benign-static.sig"  # a real signature by the trusted key, over other bytes


def place(src: Path, dst: Path, user: User = User.ROOT, mode: int = 0o755) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)
    return give(dst, user)


def place_fat(src: Path, dst: Path, user: User = User.ROOT) -> Path:
    place(src, dst, user)
    os.truncate(dst, FAT_SIZE)
    return dst


def place_signed(stage: Stage, src: Path, dst: Path, user: User = User.ROOT) -> Path:
    place(src, dst, user)
    give(sign(dst, stage.private_key), user)
    return dst


def own_dir(path: Path, user: User) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return give(path, user)


def make_stage(scope: Path, work: Path, tools: Mapping[str, Path], private_key: Path,
               judge_pause: float = 1.0) -> Stage:
    """A Stage whose programs are copies in ``work/tools``: nobody can always reach those,
    wherever ``tools`` were built (a 0700 pytest directory, the VM's shared results)."""
    work.chmod(0o755)
    copies = {name: place(path, work / "tools" / name) for name, path in tools.items()}
    (work / "tools").chmod(0o755)
    return Stage(scope, work, copies, private_key, judge_pause)


def prepare_stage(stage: Stage, ways: Sequence[Way]) -> None:
    """Everything every way needs, before the agent starts."""
    for name in UNSIGNED_SHARED:
        place(stage.tools[name], stage.shared(name))
    for name in SIGNED_SHARED:
        place_signed(stage, stage.tools[name], stage.shared(name))
    place_fat(stage.tools["payload-static"], stage.shared("payload-fat"))
    stage.shared("script.sh").write_text(SCRIPT)
    stage.shared("script.sh").chmod(0o755)
    for way in ways:
        for user in way.users:
            own_dir(stage.home(way.name, user), user)
            own_dir(stage.away(way.name, user), user)
            if way.prepare is not None:
                way.prepare(stage, user)


# --- small steps ----------------------------------------------------------------------------

def control(path: Path, user: User, args: Sequence[str] = ()) -> None:
    """The signed program runs as itself before the attack: otherwise a denial of the attack
    would prove nothing. The kill backend may kill a not-yet-verified file once."""
    deadline = time.monotonic() + CONTROL_DEADLINE
    last: Optional[Outcome] = None
    while time.monotonic() < deadline:
        last = run_attack([str(path), *args], user)
        if last.returncode == 0 and "EG-BENIGN" in last.stdout:
            return
        time.sleep(0.3)
    raise SetupError(f"control: the signed {path} did not run as {user.value}: {last}")


def step(argv: Sequence[str], user: User = User.ROOT, expect: str = "") -> None:
    """A step of the attack that must work (a write, a rename): else the way is an ERROR."""
    out = run_attack(argv, user)
    if out.returncode != 0 or expect not in out.stdout:
        raise SetupError(f"step {list(argv)} as {user.value} failed: {out}")


def userns(*argv: str) -> List[str]:
    """``argv`` in a new user and mount namespace (root of it: the nobody variants)."""
    return ["unshare", "-Urm", *argv]


def userns_sh(script: str, *args: str) -> List[str]:
    """A shell script in a new user + mount namespace; its setup failures say EG-ERROR, so
    they are never mistaken for a denial."""
    return userns("sh", "-c", script, "sh", *args)


def own_ns_sh(user: User, script: str, *args: str) -> List[str]:
    """A shell script that mounts and execs in a mount namespace of its own: root's a private
    one (``unshare -m``: its mounts never propagate back), nobody's in a new user namespace
    too. One namespace for the mount and the exec makes the outcome deterministic: no agent
    can race the exec by reading its own mount table, which never shows the mount."""
    if user is User.NOBODY:
        return userns_sh(script, *args)
    return ["unshare", "-m", "sh", "-c", script, "sh", *args]


def fail(what: str) -> str:
    return f'|| {{ echo "EG-ERROR {what}" >&2; exit 70; }}'


def mount_or_refused(what: str, command: str) -> str:
    """A mount in a shell step: a refusal (EPERM: "permission denied", as the no-agent pass
    shows the same mount succeeds) is the agent's denial, anything else a broken step."""
    return (f'if ! {command} 2>"$TMPDIR/mount.err"; then\n'
            f'  if grep -qi "permission denied\\|not permitted" "$TMPDIR/mount.err"; then '
            f'echo "EG-DENIED {what}: $(cat "$TMPDIR/mount.err")" >&2; exit 77; fi\n'
            f'  cat "$TMPDIR/mount.err" >&2; echo "EG-ERROR {what}" >&2; exit 70\nfi\n')


def tool(stage: Stage, name: str) -> str:
    return str(stage.tools[name])


# --- the ways -------------------------------------------------------------------------------

def run_direct(stage: Stage, user: User) -> Outcome:
    return run_until_not_killed([str(stage.shared("payload-static"))], user)


def ldso(payload: str) -> Run:
    def run(stage: Stage, user: User) -> Outcome:
        return run_until_not_killed([LDSO, str(stage.shared(payload))], user)
    return run


def loader(mode: str) -> Run:
    def run(stage: Stage, user: User) -> Outcome:
        return run_attack([tool(stage, "loader"), mode, str(stage.shared("blob.bin"))], user)
    return run


def run_dlopen(stage: Stage, user: User) -> Outcome:
    code = "import ctypes, sys; ctypes.CDLL(sys.argv[1])"
    return run_attack(["python3", "-c", code, str(stage.shared("preload.so"))], user)


def run_preload(stage: Stage, user: User) -> Outcome:
    target = stage.shared("benign-dyn")
    control(target, user)
    # through env(1): only the signed target gets LD_PRELOAD, not setpriv on the way
    return run_attack(["env", f"LD_PRELOAD={stage.shared('preload.so')}", str(target)], user)


def memfd(mode: str) -> Run:
    def run(stage: Stage, user: User) -> Outcome:
        return run_attack([tool(stage, "memfd-exec"), mode, str(stage.shared("payload-static"))],
                          user)
    return run


def run_tmpfile(stage: Stage, user: User) -> Outcome:
    return run_attack([tool(stage, "fd-exec"), "tmpfile", str(stage.home("tmpfile-exec", user)),
                       str(stage.shared("payload-static"))], user)


def run_opath(stage: Stage, user: User) -> Outcome:
    return run_until_not_killed([tool(stage, "fd-exec"), "opath",
                                 str(stage.shared("payload-static"))], user)


def prepare_unlinked(stage: Stage, user: User) -> None:
    place(stage.tools["payload-static"], stage.home("execveat-unlinked", user) / "payload", user)


def run_unlinked(stage: Stage, user: User) -> Outcome:
    payload = stage.home("execveat-unlinked", user) / "payload"
    if not payload.exists():
        raise SetupError(f"{payload} is gone: this way runs once per agent")
    return run_attack([tool(stage, "fd-exec"), "unlinked", str(payload)], user)


def prepare_mountpoint(way: str) -> Prepare:
    def prepare(stage: Stage, user: User) -> None:
        own_dir(stage.home(way, user) / "mnt", user)
    return prepare


def run_tmpfs_in_scope(stage: Stage, user: User) -> Outcome:
    mnt = stage.home("tmpfs-in-scope", user) / "mnt"
    fat, decoy = stage.shared("payload-fat"), stage.shared(DECOY_SIG)
    return run_until_not_killed(own_ns_sh(
        user, 'TMPDIR=$(mktemp -d)\n'
        + mount_or_refused("mount", 'mount -t tmpfs -o size=8m eg-attack "$1"')
        + f'cp --sparse=always "$2" "$1/payload" {fail("cp")}\n'
        f'cp "$3" "$1/payload.sig" {fail("cp sig")}\n'
        'exec "$1/payload"', str(mnt), str(fat), str(decoy)), user)


def run_unshare(stage: Stage, user: User) -> Outcome:
    payload = str(stage.shared("payload-static"))
    argv = ["unshare", "-m", payload] if user is User.ROOT else userns(payload)
    return run_until_not_killed(argv, user)


def prepare_overlay(stage: Stage, user: User) -> None:
    for sub in ("upper", "work", "merged"):
        own_dir(stage.away("overlay-lower", user) / sub, user)


def run_overlay(stage: Stage, user: User) -> Outcome:
    away = stage.away("overlay-lower", user)
    lower, merged = stage.scope / "shared", away / "merged"
    opts = f"lowerdir={lower},upperdir={away / 'upper'},workdir={away / 'work'}"
    return run_until_not_killed(own_ns_sh(
        user, 'TMPDIR=$(mktemp -d)\n'
        + mount_or_refused("mount overlay", 'mount -t overlay eg-attack -o "$1" "$2"')
        + 'exec "$2/payload-static"', opts, str(merged)), user)


def run_overlay_copy_up(stage: Stage, user: User) -> Outcome:
    """An overlay over the way's own directory in the scope (a signed app): the app is run
    through it first (so the BPF backends have paired the overlay file with its signed
    layer file: exec_verdict.h eg_note_layer), then the payload is written over it through
    the overlay (a copy-up: the bytes go to the upper layer, outside the scope) and exec'd
    there. The first run is no control: the kill backend cannot verify a file of a
    filesystem only another mount namespace shows, and kills the signed app every time
    (said in docs/threat-model.md). Each try on a fresh overlay: a retry must not start
    from the last try's upper layer."""
    way = "overlay-copy-up"
    return run_until_not_killed(own_ns_sh(
        user, 'TMPDIR=$(mktemp -d)\n'
        f'D=$(mktemp -d -p "$1") {fail("mktemp")}\n'
        f'mkdir "$D/u" "$D/w" "$D/m" {fail("mkdir")}\n'
        + mount_or_refused("mount overlay", 'mount -t overlay eg-attack -o '
                           '"lowerdir=$2,upperdir=$D/u,workdir=$D/w" "$D/m"')
        + 'i=0\n'
        'until "$D/m/app" 2>/dev/null | grep -q EG-BENIGN || [ $i -ge 8 ]; do\n'
        '  i=$((i + 1)); sleep 0.25\n'
        'done\n'
        f'cat "$3" > "$D/m/app" {fail("copy-up write")}\n'
        'exec "$D/m/app"', str(stage.away(way, user)), str(stage.home(way, user)),
        str(stage.shared("payload-dyn"))), user)


def prepare_overlay_copy_up(stage: Stage, user: User) -> None:
    prepare_signed_app("overlay-copy-up")(stage, user)
    own_dir(stage.away("overlay-copy-up", user), user)


def prepare_bind_scope(stage: Stage, user: User) -> None:
    own_dir(stage.away("bind-scope", user) / "view", user)


def run_bind_scope(stage: Stage, user: User) -> Outcome:
    view = stage.away("bind-scope", user) / "view"
    with mounted("--bind", str(stage.scope), where=view):
        return run_until_not_killed([str(view / "shared" / "payload-static")], user)


def prepare_signed_app(way: str) -> Prepare:
    """A signed program of this way's own (it gets overwritten or mounted over), big enough
    to hold the dynamic payload, owned by the attacker (who may write it)."""
    def prepare(stage: Stage, user: User) -> None:
        place_signed(stage, stage.tools["benign-static"], stage.home(way, user) / "app", user)
    return prepare


def bind_over(way: str, foreign: bool) -> Run:
    """The scope's payload bound over the signed app in this namespace (the agent sees the
    mount; the file's filesystem is in scope anyway), or a payload of another filesystem
    bound over it in a private namespace (the bound filesystem is outside every scope, and
    the agent never sees the mount that puts it there: deterministic, see ``own_ns_sh``)."""
    def run(stage: Stage, user: User) -> Outcome:
        app = stage.home(way, user) / "app"
        control(app, user)
        source = stage.shared("payload-static")
        if not foreign:
            with mounted("--bind", str(source), where=app):
                return run_until_not_killed([str(app)], user)
        # the payload from another filesystem (fat: app.sig is the decoy)
        source = place_fat(source, stage.away(way, user) / "payload")
        argv = [tool(stage, "mount-exec"), "bind", str(source), str(app)]
        return run_until_not_killed(
            ["unshare", "-m", *argv] if user is User.ROOT else userns(*argv), user)
    return run


def run_open_tree(stage: Stage, user: User) -> Outcome:
    argv = [tool(stage, "mount-exec"), "open-tree", str(stage.scope / "shared"),
            "payload-static"]
    return run_until_not_killed(argv if user is User.ROOT else userns(*argv), user)


def run_fsmount(stage: Stage, user: User) -> Outcome:
    argv = [tool(stage, "mount-exec"), "fsmount", str(stage.shared("payload-static"))]
    return run_attack(argv if user is User.ROOT else userns(*argv), user)


def run_proc_root(stage: Stage, user: User) -> Outcome:
    """Reach the scope through another mount namespace's /proc/PID/root, from outside it."""
    holder_argv = ["unshare", "-m", "sleep", "30"] if user is User.ROOT else \
        userns("sleep", "30")
    holder = spawn(holder_argv, user)
    try:
        mine = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == mine:
            if time.monotonic() > deadline or holder.poll() is not None:
                raise SetupError(f"the holder never entered its own mount namespace: "
                                 f"{finish(holder, 1)}")
            time.sleep(0.02)
        path = f"/proc/{holder.pid}/root{stage.shared('payload-static')}"
        return run_until_not_killed([path], user)
    finally:
        holder.kill()
        finish(holder, 5)


def mmap_plain(stage: Stage, user: User) -> Outcome:
    app = stage.home("mmap-shared-write", user) / "app"
    control(app, user)
    step([tool(stage, "mmap-write"), "plain", str(app), str(stage.shared("payload-dyn"))],
         user, "EG-WRITTEN")
    return run_until_not_killed([str(app)], user)


def _identity(path: Path) -> Tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size


def mmap_prearmed(stage: Stage, user: User) -> Outcome:
    app = stage.home("mmap-shared-prearmed", user) / "app"
    control(app, user)
    writer = spawn([tool(stage, "mmap-write"), "prearmed", str(app),
                    str(stage.shared("payload-dyn"))], user, stdin=True)
    try:
        if read_line(writer, DEFAULT_TIMEOUT) != "EG-ARMED":
            raise SetupError(f"the writer did not arm: {finish(writer, 1)}")
        time.sleep(stage.judge_pause)  # judged again after the arming: still signed bytes
        before = _identity(app)
        written = finish(writer, DEFAULT_TIMEOUT, stdin=b"go\n")
    finally:
        finish(writer, 1)
    if written.returncode != 0 or "EG-WRITTEN" not in written.stdout:
        raise SetupError(f"the armed write failed: {written}")
    if _identity(app) != before:
        raise SetupError(f"the armed write changed {app}'s identity: {before} -> "
                         f"{_identity(app)}")
    return run_until_not_killed([str(app)], user)


def tamper(mode: str) -> Run:
    way = f"tamper-{mode}"

    def run(stage: Stage, user: User) -> Outcome:
        home = stage.home(way, user)
        app = home / "app"
        control(app, user)
        source = home / "drop" if mode == "rename-over" else stage.shared("payload-dyn")
        extra = [str(home / "link")] if mode == "hardlink" else []
        step([tool(stage, "tamper"), mode, str(app), str(source), *extra], user, "EG-TAMPERED")
        return run_until_not_killed([str(app)], user)
    return run


def prepare_tamper(mode: str) -> Prepare:
    signed_app = prepare_signed_app(f"tamper-{mode}")

    def prepare(stage: Stage, user: User) -> None:
        signed_app(stage, user)
        if mode == "rename-over":  # the unsigned file to rename over the signed one
            place(stage.tools["payload-dyn"], stage.home(f"tamper-{mode}", user) / "drop", user)
    return prepare


def inject(mode: str) -> Run:
    def run(stage: Stage, user: User) -> Outcome:
        target = stage.shared("benign-dyn")
        control(target, user)
        victim = spawn([str(target), "30"], user)
        try:
            seen = read_line(victim, DEFAULT_TIMEOUT)
            if seen != "EG-BENIGN":
                raise SetupError(f"the signed target did not start: {finish(victim, 1)}")
            _wait_sleeping(victim.pid)
            attack = run_attack([tool(stage, "ptrace-inject"), mode, str(victim.pid),
                                 tool(stage, "inject.bin")], user)
            if attack.result is not Result.ERROR or "EG-INJECTED" not in attack.stdout:
                return attack  # refused (DENIED), killed, or broken
            return finish(victim, DEFAULT_TIMEOUT, seen=seen + "\n")
        finally:
            finish(victim, 1)
    return run


def _wait_sleeping(pid: int) -> None:
    """Until ``pid`` blocks in clock_nanosleep/nanosleep (where the injection expects it).
    /proc/PID/syscall needs the right to attach, which the BPF backends refuse for a program
    in scope (root's included): then the process state says it sleeps."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall", encoding="ascii") as fh:
                if fh.read().split(" ", 1)[0] in ("230", "35"):
                    return
        except PermissionError:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                if fh.read().rsplit(")", 1)[-1].split()[0] == "S":
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise SetupError(f"pid {pid} never slept")


def run_script(stage: Stage, user: User) -> Outcome:
    return run_attack(["sh", str(stage.shared("script.sh"))], user)


def run_script_direct(stage: Stage, user: User) -> Outcome:
    return run_attack([str(stage.shared("script.sh"))], user)


def prepare_shebang(stage: Stage, user: User) -> None:
    script = stage.home("shebang-unsigned-interpreter", user) / "run.sh"
    script.write_text(f"#!{stage.shared('payload-static')}\n")
    script.chmod(0o755)
    give(sign(script, stage.private_key), user)
    give(script, user)


def run_shebang(stage: Stage, user: User) -> Outcome:
    script = stage.home("shebang-unsigned-interpreter", user) / "run.sh"
    return run_until_not_killed([str(script)], user)


def prepare_symlink(stage: Stage, user: User) -> None:
    link = stage.away("symlink-from-outside", user) / "link"
    link.symlink_to(stage.shared("payload-static"))
    os.lchown(link, *uid_gid(user))


def run_symlink(stage: Stage, user: User) -> Outcome:
    return run_until_not_killed([str(stage.away("symlink-from-outside", user) / "link")], user)


def run_go(name: str) -> Run:
    def run(stage: Stage, user: User) -> Outcome:
        return run_until_not_killed([str(stage.shared(name))], user)
    return run


def prepare_dir_rename(stage: Stage, user: User) -> None:
    base = stage.scope / PATH_RULE_DIR / user.value
    for sub in ("", "allowed", "allowed/kit", "denied"):  # the renamer owns every level
        own_dir(base / sub, user)
    place(stage.tools["payload-static"], base / "allowed" / "kit" / "payload", user)


def run_dir_rename(stage: Stage, user: User) -> Outcome:
    base = stage.scope / PATH_RULE_DIR / user.value
    first = run_until_not_killed([str(base / "allowed" / "kit" / "payload")], user)
    if first.result is not Result.RAN:  # allowed by its path: it must run there first
        raise SetupError(f"the path rule did not allow the file before the rename: {first}")
    step(["mv", "-T", str(base / "allowed" / "kit"), str(base / "denied" / "kit")], user)
    return run_until_not_killed([str(base / "denied" / "kit" / "payload")], user)


# Ordered: ways under the default policy first, then the ones that need another policy (the
# host tests switch policies as few times as this order allows).
WAYS: Tuple[Way, ...] = (
    Way("direct-exec", "baseline: exec the unsigned payload in the scope directly", run_direct),
    Way("ldso-dynamic-c", "ld.so as a program runs an unsigned dynamic C program",
        ldso("payload-dyn")),
    Way("ldso-go-pie", "ld.so as a program runs an unsigned PIE Go program",
        ldso("payload-go-pie")),
    Way("ldso-go-cgo", "ld.so as a program runs an unsigned cgo Go program",
        ldso("payload-go-cgo")),
    Way("loader-mmap", "a loader maps an unsigned code file PROT_EXEC and jumps to it",
        loader("mmap")),
    Way("loader-mprotect", "a loader maps an unsigned code file PROT_READ, mprotects it "
        "PROT_EXEC and jumps to it", loader("mprotect")),
    Way("loader-read-implies-exec", "a loader sets personality(READ_IMPLIES_EXEC) and maps "
        "an unsigned code file PROT_READ: the kernel makes it executable", loader("readexec")),
    Way("dlopen-python", "an interpreter outside the scope dlopens an unsigned library in it",
        run_dlopen),
    Way("ld-preload", "LD_PRELOAD of an unsigned library in the scope into a signed program",
        run_preload),
    Way("memfd-fexecve", "copy the payload into a memfd and fexecve it", memfd("fexecve")),
    Way("memfd-procfd", "copy the payload into a memfd and exec /proc/self/fd/N",
        memfd("procfd")),
    Way("tmpfile-exec", "O_TMPFILE in the scope, write the payload, fexecve the unlinked file",
        run_tmpfile),
    Way("execveat-opath", "regression: execveat(AT_EMPTY_PATH) on an O_PATH fd of the payload",
        run_opath),
    Way("execveat-unlinked", "regression: open the payload, unlink it, fexecve the fd",
        run_unlinked, prepare_unlinked),
    Way("tmpfs-in-scope", "mount a tmpfs inside the scope after the agent started, exec a "
        "payload copied there (root: in a private mount namespace; nobody: in a user "
        "namespace)", run_tmpfs_in_scope,
        prepare_mountpoint("tmpfs-in-scope"), needs_root=True),
    Way("unshare-exec", "exec the scope's own unsigned file from a new mount namespace "
        "(root: unshare -m; nobody: unshare -Urm)", run_unshare),
    Way("overlay-lower", "overlayfs whose lower layer is the scope, mounted outside it; exec "
        "the payload through it (root: in a private mount namespace; nobody: in a user "
        "namespace)", run_overlay, prepare_overlay,
        needs_root=True),
    Way("overlay-copy-up", "overlayfs over a signed program in the scope: it runs through the "
        "overlay, then the payload is written over it there (a copy-up into the upper layer, "
        "outside the scope) and exec'd through the overlay (root: in a private mount "
        "namespace; nobody: in a user namespace)", run_overlay_copy_up,
        prepare_overlay_copy_up, needs_root=True),
    Way("bind-scope", "bind mount of the scope elsewhere; exec the payload there",
        run_bind_scope, prepare_bind_scope, needs_root=True, as_nobody=False),
    Way("bind-file-over-signed", "bind mount of the scope's unsigned file over a signed path "
        "in the scope", bind_over("bind-file-over-signed", foreign=False),
        prepare_signed_app("bind-file-over-signed"), needs_root=True, as_nobody=False),
    Way("bind-foreign-over-signed", "bind mount of an unsigned file from another filesystem "
        "over a signed path in the scope (in a private mount namespace)",
        bind_over("bind-foreign-over-signed", foreign=True),
        prepare_signed_app("bind-foreign-over-signed"), needs_root=True, as_nobody=False),
    Way("open-tree-clone", "open_tree(OPEN_TREE_CLONE): a detached copy of the scope's mount, "
        "in no mount table; exec the payload through it (nobody: in a user namespace)",
        run_open_tree, needs_root=True),
    Way("fsmount-detached", "fsopen/fsmount a detached tmpfs (no path anywhere), copy the "
        "payload in, exec it (nobody: in a user namespace)", run_fsmount, needs_root=True),
    Way("proc-root-other-ns", "exec the scope's payload through /proc/PID/root of a process in "
        "another mount namespace, from the initial one (nobody: its own userns process)",
        run_proc_root),
    Way("mmap-shared-write", "write the payload into an allowed binary through a MAP_SHARED "
        "mapping, then exec it", mmap_plain, prepare_signed_app("mmap-shared-write")),
    Way("mmap-shared-prearmed", "MAP_SHARED pages made writable before the binary is judged "
        "again; the payload written through them later changes no ctime/mtime/size",
        mmap_prearmed, prepare_signed_app("mmap-shared-prearmed")),
    Way("ptrace-inject", "PTRACE_ATTACH to a running signed program, shellcode at RIP, detach",
        inject("ptrace")),
    Way("procmem-inject", "shellcode written through /proc/PID/mem of a running signed "
        "program (no ptrace(2) call)", inject("procmem")),
    Way("script-interpreter", "an unsigned script in the scope given to /bin/sh as an argument",
        run_script),
    Way("script-direct", "exec an unsigned #! script in the scope itself (its interpreter, "
        "/bin/sh, is outside every scope)", run_script_direct),
    Way("shebang-unsigned-interpreter", "regression: a signed script whose #! names the "
        "scope's unsigned payload", run_shebang, prepare_shebang),
    Way("symlink-from-outside", "regression: exec a symlink outside the scope that points at "
        "the payload in it", run_symlink, prepare_symlink),
    *(Way(f"tamper-{mode}", f"regression: {what} an allowed binary, then exec it",
          tamper(mode), prepare_tamper(mode))
      for mode, what in (("write", "write(2) the payload over"),
                         ("truncate", "O_TRUNC and write the payload into"),
                         ("copy-range", "copy_file_range the payload over"),
                         ("hardlink", "hard-link, then write the payload through the link of"),
                         ("rename-over", "rename the unsigned payload over"))),
    Way("go-unsigned", "control for go-magic-zeroed: an unsigned Go binary under the default "
        "policy in enforce mode", run_go("payload-go"), policy=GO_DEFAULT),
    Way("go-magic-zeroed", "an unsigned Go binary with its build-info magic zeroed, under the "
        "default policy in enforce mode (go = false: not judged)", run_go("payload-go-nomagic"),
        policy=GO_DEFAULT),
    Way("go-stripped-nomagic", "as go-magic-zeroed, and the ELF section headers dropped too "
        "(no .gopclntab or .go.buildinfo by name)", run_go("payload-go-stripped"),
        policy=GO_DEFAULT),
    Way("dir-rename-path-rule", "a directory of files allowed by a path rule, renamed into a "
        "path the rule does not allow", run_dir_rename, prepare_dir_rename, policy=PATH_RULE),
)
BY_NAME: Dict[str, Way] = {w.name: w for w in WAYS}


# --- expected outcomes ----------------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    outcome: str  # "BLOCKED" | "KILLED" | "RUNS"
    reason: str = ""  # mandatory for RUNS: the gap, and the host setting that closes it

    def __post_init__(self) -> None:
        if self.outcome not in _RESULT:
            raise ValueError(f"unknown outcome {self.outcome!r}")
        if self.outcome in ("RUNS", "LATE") and not self.reason.strip():
            raise ValueError(f"a {self.outcome} expectation needs its reason")

    @property
    def result(self) -> Result:
        return _RESULT[self.outcome]

    def matches(self, outcome: Outcome) -> bool:
        if self.outcome == "LATE":  # detected: the agent kills it after verifying, before
            # or after its first words, or after it exited (the test then looks for the
            # denial in the agent's records: tests/attacks/test_attacks_host.py)
            return outcome.result in (Result.KILLED, Result.RAN)
        return outcome.result is self.result


_RESULT = {"BLOCKED": Result.DENIED, "KILLED": Result.KILLED, "RUNS": Result.RAN,
           "LATE": Result.KILLED}
BLOCKED = Expect("BLOCKED")
KILLED = Expect("KILLED")


def LATE(reason: str) -> Expect:  # the table's word, so upper case
    return Expect("LATE", reason)


def RUNS(reason: str) -> Expect:  # the table's word, so upper case
    return Expect("RUNS", reason)


NOT_MEASURED = RUNS("not measured yet")


def row(fanotify: Expect, kill: Expect, lsm: Expect = NOT_MEASURED,
        fmod: Optional[Expect] = None) -> Dict[str, Expect]:
    """One way's outcomes; fmod-ret shares bpf-lsm's verdict logic (exec_verdict.h), so
    it defaults to the same expectation."""
    return {"fanotify-exec": fanotify, "kill": kill, "bpf-lsm": lsm,
            "fmod-ret": fmod if fmod is not None else lsm}


# Reasons name the gap, what the agent logged, and the host setting that closes it (if any).
_NOT_EXEC = ("no exec of the file at all: {how}, so there is no FAN_OPEN_EXEC_PERM or "
             "sched_process_exec for it (the agent logged nothing). No host setting closes "
             "it for this backend; the BPF backends' mmap_file/file_mprotect hooks would "
             "(issue 9, point 3)")
_LDSO = RUNS(_NOT_EXEC.format(how="ld.so (outside the scope) is the exec'd program and maps "
                              "the scope file with mmap(PROT_EXEC)"))
_LOADER = RUNS(_NOT_EXEC.format(how="the loader maps the scope file PROT_EXEC (or mprotects it "
                                "so) and jumps into it"))
_DLOPEN = RUNS(_NOT_EXEC.format(how="python3 (outside the scope) dlopens the scope library"))
_PRELOAD = RUNS(_NOT_EXEC.format(how="the signed program's exec is judged and allowed (logged: "
                                 "that allow), then ld.so maps the unsigned LD_PRELOAD library "
                                 "into it"))
_MEMFD = RUNS("a memfd lives on the kernel's internal shmem mount, which no scope covers (no "
              "mark, no scoped device; the agent logged nothing). Closed host-wide by "
              "vm.memfd_noexec=2 (kernel 6.3+; this host: 0)")
_FSMOUNT = RUNS("fsopen/fsmount makes a new tmpfs attached nowhere: another device, no path "
                "in any scope, no mark (the agent logged nothing). Closed only by denying the "
                "attacker CAP_SYS_ADMIN; for nobody, by user.max_user_namespaces=0")
_FSMOUNT_FAN = RUNS("fsopen/fsmount makes a new tmpfs attached nowhere: a filesystem no mount "
                    "table shows, so fanotify-exec never marks it (the agent logged nothing). "
                    "Closed only by denying the attacker CAP_SYS_ADMIN; for nobody, by "
                    "kernel.unprivileged_userns_clone=0 or user.max_user_namespaces=0")
_PTRACE = RUNS("the signed program's exec was judged and allowed (logged: that allow); code "
               "written into the running process is invisible to an exec hook. Closed by Yama: "
               "kernel.yama.ptrace_scope=1 or 2 for the nobody variant (the injector is not the "
               "target's ancestor), 3 for root too (this host's kernel has no Yama); "
               "/proc/PID/mem writes go through the same ptrace access check")
_SCRIPT = RUNS("/bin/sh (outside the scope) reads the script as data; the script is never "
               "exec'd (the agent logged nothing). No host setting closes it; a policy on the "
               "interpreters themselves would")
_GO_MAGIC = RUNS("with its build-info magic zeroed the binary counts as not Go, and the "
                 "default policy's rule not-go allows it (logged: allow, rule not-go). Closed "
                 "by a policy that requires signatures on every file (go = \"any\"), or by "
                 "Go detection from the runtime's pclntab/moduledata (issue 9, point 5)")
_USERNS = "; user.max_user_namespaces=0 (no unprivileged user namespaces) closes the nobody variant"
_FAN_OTHER_NS = ("fanotify-exec marks the filesystems its own mount table shows in scope (a "
                 "new one when the mount watcher sees it); {what}, so the exec never waits "
                 "for the agent (logged nothing). Closed for nobody by "
                 "kernel.unprivileged_userns_clone=0 (Debian, Ubuntu) or "
                 "kernel.apparmor_restrict_unprivileged_userns=1 (Ubuntu), or "
                 "user.max_user_namespaces=0 (execguard doctor reports them); for root only by "
                 "denying the attacker CAP_SYS_ADMIN. The same mount in the agent's own "
                 "namespace is marked (after the watcher's window: docs/fanotify.md)")
_KILL_LATE = ("{what} another device, outside the kernel's kill scope; the agent sees the exec "
              "of a path in the scope, verifies the file and only then kills (logged: deny "
              "no-signature or bad-signature, post-exec-kill, killed_by 'agent, after "
              "verification' or 'nobody: it had exited'): the payload ran first. The way pads "
              "it (sparse, 160 MiB) behind a decoy .sig, so verification is slow enough for the "
              "race to go the attacker's way every time. Nothing but denying the attacker "
              "CAP_SYS_ADMIN closes it for root")
_ISSUE = "issue 9 measured this on bpf-lsm in the VM (lockdown=confidentiality): {}"

# way -> backend -> Expect, for every user; "way/nobody" overrides a way's row for nobody.
# kill: measured on main (4c0ff04) with tests/attacks/measure.py; fanotify-exec: measured
# with filesystem marks, placement and no ignore marks (docs/fanotify.md).
EXPECTED: Dict[str, Dict[str, Expect]] = {
    "direct-exec": row(BLOCKED, KILLED, BLOCKED),
    "ldso-dynamic-c": row(_LDSO, _LDSO, RUNS(_ISSUE.format("runs, no mmap_file hook yet"))),
    "ldso-go-pie": row(_LDSO, _LDSO, RUNS(_ISSUE.format("runs, no mmap_file hook yet"))),
    "ldso-go-cgo": row(_LDSO, _LDSO, RUNS(_ISSUE.format("runs, no mmap_file hook yet"))),
    "loader-mmap": row(_LOADER, _LOADER, RUNS(_ISSUE.format("runs, no mmap_file hook yet"))),
    "loader-mprotect": row(_LOADER, _LOADER),
    "loader-read-implies-exec": row(_LOADER, _LOADER),
    "dlopen-python": row(_DLOPEN, _DLOPEN),
    "ld-preload": row(_PRELOAD, _PRELOAD, RUNS(_ISSUE.format("runs, no mmap_file hook yet"))),
    "memfd-fexecve": row(_MEMFD, _MEMFD, RUNS(_ISSUE.format("runs, memfd is in no scope"))),
    "memfd-procfd": row(_MEMFD, _MEMFD, RUNS(_ISSUE.format("runs, memfd is in no scope"))),
    # the O_TMPFILE lives on the scope's own mount and device: judged like any scope file
    "tmpfile-exec": row(BLOCKED, KILLED),
    "execveat-opath": row(BLOCKED, KILLED, BLOCKED),
    "execveat-unlinked": row(BLOCKED, KILLED, BLOCKED),
    "tmpfs-in-scope": row(
        RUNS(_FAN_OTHER_NS.format(what="a tmpfs mounted inside the scope in another mount "
                                       "namespace is a filesystem that table never shows")),
        RUNS(_KILL_LATE.format(what="a tmpfs mounted inside the scope after start is")
             + _USERNS),
        RUNS(_ISSUE.format("runs, the new tmpfs is not a scoped device"))),
    # the scope's filesystem is marked as a whole: the exec waits whatever mount or
    # namespace it comes through, and a mount no table of ours names is in scope
    "unshare-exec": row(BLOCKED, KILLED, BLOCKED),
    # overlayfs opens the lower file itself (through its private clone of the layer's
    # mount): the scope's filesystem mark sees that open, in any namespace
    "overlay-lower": row(
        BLOCKED,
        RUNS("the overlay file has the overlay's own device and a path outside the scope, so "
             "neither the kernel map nor the agent judges it (logged nothing). Nothing but "
             "denying the attacker CAP_SYS_ADMIN closes it for root" + _USERNS),
        RUNS(_ISSUE.format("runs, overlayfs is another device"))),
    "overlay-copy-up": row(
        RUNS("the copy-up put the payload in the overlay's upper layer, a directory outside "
             "every scope on a filesystem fanotify-exec does not mark, and the exec through the "
             "overlay opens that file, not the scope's (logged: only the allow of the signed "
             "program run through the overlay before the write). The same as running the "
             "payload from the upper directory itself, which no scope covers: a scope over the "
             "upper directories (a runtime's storage) closes it. bpf-lsm and fmod-ret hold "
             "every file of an overlay with a layer in scope in scope"),
        KILLED),
    "bind-scope": row(BLOCKED, KILLED, BLOCKED),
    "bind-file-over-signed": row(BLOCKED, KILLED, BLOCKED),
    "bind-foreign-over-signed": row(
        RUNS("the bound file is on a filesystem outside every scope (the root filesystem), "
             "and the bind mount that puts it on a scope path exists only in a private mount "
             "namespace, which fanotify-exec never reads: that filesystem stays unmarked and "
             "the exec never waits for the agent (logged nothing). Closed only by denying the "
             "attacker CAP_SYS_ADMIN. In the agent's own namespace the mount makes the root "
             "filesystem partly in scope, and the watcher marks it (docs/fanotify.md)"),
        RUNS(_KILL_LATE.format(what="the bound file is on")),
        RUNS(_ISSUE.format("runs, the bound file is on another device"))),
    "open-tree-clone": row(BLOCKED, KILLED),
    "fsmount-detached": row(_FSMOUNT_FAN, _FSMOUNT),
    "proc-root-other-ns": row(BLOCKED, KILLED),
    # no ignore marks; on tmpfs every open reaches the loop, and a write-open makes the
    # agent forget the inode before it is answered (agent/sensors/fanotify_writes.py)
    "mmap-shared-write": row(BLOCKED, KILLED, BLOCKED),
    "mmap-shared-prearmed": row(
        BLOCKED,
        RUNS("the pages were dirtied (ctime changed) before a close-after-write had the agent "
             "verify the still-signed bytes and put an allow for the new (dev, ino, ctime, "
             "size) in the kernel map; the payload then went in without a fault, changing "
             "none of them, so the kernel allows its exec (logged: only the earlier allow). "
             "No host setting closes it (issue 9, point 4)"),
        RUNS(_ISSUE.format("runs, identity unchanged"))),
    "ptrace-inject": row(_PTRACE, _PTRACE, RUNS(_ISSUE.format("runs, no ptrace hook"))),
    "procmem-inject": row(_PTRACE, _PTRACE),
    "script-interpreter": row(_SCRIPT, _SCRIPT),
    # the exec opens the script itself (fanotify-exec sees it; bprm_check runs for it);
    # the kill backend's tracepoint sees only the interpreter and names the script
    "script-direct": row(
        BLOCKED,
        LATE("sched_process_exec sees the interpreter (outside the scope), not the script: "
             "the kernel names the script (EG_MSG_SCRIPT) and the agent judges the file at "
             "that name and kills the interpreter after (logged: deny, post-exec-kill, "
             "killed_by). A short script has finished by then. bpf-lsm and fmod-ret refuse "
             "it at bprm_check"),
        BLOCKED),
    # the kernel opens the #! interpreter for exec too: judged like a direct exec
    "shebang-unsigned-interpreter": row(BLOCKED, KILLED),
    "symlink-from-outside": row(BLOCKED, KILLED, BLOCKED),
    **{f"tamper-{mode}": row(BLOCKED, KILLED, BLOCKED)
       for mode in ("write", "truncate", "copy-range", "hardlink", "rename-over")},
    "go-unsigned": row(BLOCKED, KILLED, BLOCKED),
    # Go-ness from the runtime's pclntab/moduledata (agent/goinfo): rule go-signed denies
    "go-magic-zeroed": row(BLOCKED, _GO_MAGIC, RUNS(_ISSUE.format("runs, counted as not Go"))),
    "go-stripped-nomagic": row(BLOCKED, _GO_MAGIC),
    "dir-rename-path-rule": row(
        BLOCKED,  # with path rules nothing is remembered: every exec is decided
        RUNS("the kernel verdict earned under the path rule is keyed by (dev, ino, ctime, "
             "size), and renaming the parent directory changes none of them: the exec in the "
             "denied path is a kernel map hit (logged: only the allow by rule path-allowed "
             "before the rename). A documented residual risk (docs/backends.md); no host "
             "setting closes it (issue 9, point 4)"),
        BLOCKED),
}


# The BPF backends (bpf-lsm, fmod-ret: exec_verdict.h), measured in the test VM under
# every lockdown mode (tests/vm/test_attacks_vm.py). One column: they share the verdict
# logic; a way missing here is an error, not a default.
_BPF_SCRIPT = RUNS("/bin/sh (outside the scope) reads the script as data: no exec and no "
                   "mapping of it (the agent logged nothing). Out of reach of every exec "
                   "hook; interpreters that ask the kernel first (execveat AT_EXECVE_CHECK "
                   "with SECBIT_EXEC_RESTRICT_FILE, Linux 6.14+) would close it, Debian's do "
                   "not yet")
BPF_EXPECTED: Dict[str, Expect] = {
    **dict.fromkeys((
        "direct-exec", "tmpfile-exec", "execveat-opath", "execveat-unlinked",
        "script-direct", "shebang-unsigned-interpreter", "symlink-from-outside", "go-unsigned",
        "go-magic-zeroed", "go-stripped-nomagic", "dir-rename-path-rule",
        # a dynamic loader run as a program (loaders map)
        "ldso-dynamic-c", "ldso-go-pie", "ldso-go-cgo",
        # PROT_EXEC mappings of files in scope (mmap_file, file_mprotect)
        "loader-mmap", "loader-mprotect", "loader-read-implies-exec", "dlopen-python",
        "ld-preload",
        # files with no name (nlink 0) and filesystems the agent has not placed
        "memfd-fexecve", "memfd-procfd", "fsmount-detached",
        # the directory ancestry within the filesystem, whatever the mount or namespace
        "unshare-exec", "bind-scope", "open-tree-clone", "proc-root-other-ns",
        # a new filesystem the agent has not placed is in scope; the mount guard refuses
        # mounts onto scope paths that reach the agent's namespace; an overlay of a scope
        # layer is in scope
        "tmpfs-in-scope", "bind-file-over-signed", "overlay-lower",
        # an overlay file without a verdict of its own is judged by its layer file's, paired
        # at the overlay's open of it: a copy-up pairs it with the new upper file
        "overlay-copy-up",
        # writers: the open for write drops the verdict, nothing identity-keyed is trusted
        # after that
        "mmap-shared-write", "mmap-shared-prearmed",
        # ptrace_access_check: attach, /proc/PID/mem (and /proc/PID/syscall) refused
        "ptrace-inject", "procmem-inject",
        *(f"tamper-{mode}" for mode in ("write", "truncate", "copy-range", "hardlink",
                                        "rename-over"))), BLOCKED),
    "script-interpreter": _BPF_SCRIPT,
    "bind-foreign-over-signed": RUNS(
        "the bound file is on a filesystem outside every scope (the root filesystem), and the "
        "bind mount that shows it at a scope path exists only in the attacker's private mount "
        "namespace. Mounts there are allowed (boundary.mounts refuses those that reach the "
        "agent's namespace), so that container runtimes can build a rootfs in scope; what "
        "runs is judged by where its file is in its filesystem, and this one is outside every "
        "scope: it runs as it would at its own path (logged nothing), and nobody outside that "
        "namespace sees it at the scope path. In the agent's namespace, or onto a shared "
        "mount, the bind is refused (mount-into-scope)"),
}
BPF_BACKENDS = ("bpf-lsm", "fmod-ret")


# The kill backend after it placed files like the BPF backends (the same exec_verdict.h,
# sched_process_exec and sys_enter_mmap): these rows override EXPECTED's kill column.
_KILL_MPROTECT = RUNS("mprotect(PROT_EXEC) is a syscall the kill backend cannot judge: "
                      "finding the mapping's file needs bpf_find_vma, whose callback BCC 0.26 "
                      "cannot load (verifier: R3 type=scalar expected=func). No host setting "
                      "closes it; bpf-lsm and fmod-ret judge file_mprotect")
_KILL_BIND_FOREIGN = RUNS("the bound file belongs to a filesystem outside every scope and the "
                          "bind mount exists only in a private mount namespace: the kill "
                          "backend has no mount hook and judges files, not the paths they "
                          "are seen at (logged nothing). Only denying the attacker "
                          "CAP_SYS_ADMIN closes it; bpf-lsm and fmod-ret refuse such a mount "
                          "where it reaches the agent's namespace")
_KILL_DIR_RENAME = LATE("under path rules the kill backend writes no verdict into the kernel "
                        "(it has no rename hook): the agent decides the exec at its path of "
                        "the moment and kills a denied one after verifying it, so the "
                        "program may run first (logged: deny, post-exec-kill). bpf-lsm and "
                        "fmod-ret drop verdicts at the rename")
KILL_EXPECTED: Dict[str, Expect] = {
    **dict.fromkeys((
        "ldso-dynamic-c", "ldso-go-pie", "ldso-go-cgo", "loader-mmap",
        "loader-read-implies-exec", "dlopen-python",
        "ld-preload", "memfd-fexecve", "memfd-procfd", "tmpfs-in-scope", "overlay-lower",
        "fsmount-detached", "go-magic-zeroed", "go-stripped-nomagic"), KILLED),
    "loader-mprotect": _KILL_MPROTECT,
    "bind-foreign-over-signed": _KILL_BIND_FOREIGN,
    "dir-rename-path-rule": _KILL_DIR_RENAME,
    "mmap-shared-prearmed": RUNS(
        "on tmpfs a read fault maps a shared page writable at once, so the payload written "
        "through the armed mapping changes no ctime, mtime or size, and the kill backend has "
        "no hook on the open for write that would drop the file's verdict (tracepoints see "
        "no open; io_uring opens no syscall at all): the exec is a kernel map hit on the "
        "allow from before the arming (logged: that allow). On filesystems whose first write "
        "to a page updates the times (ext4, xfs, btrfs) the stamp moves and the exec is "
        "killed; bpf-lsm and fmod-ret drop the verdict at the open for write"),
}


def expected(way: str, backend: str, user: User) -> Expect:
    if backend in BPF_BACKENDS:
        return BPF_EXPECTED[way]
    if backend == "kill" and way in KILL_EXPECTED:
        return KILL_EXPECTED[way]
    row = EXPECTED.get(f"{way}/{user.value}") or EXPECTED[way]
    return row[backend]
