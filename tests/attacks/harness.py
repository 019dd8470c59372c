"""Build the attack programs and run one attack with a deadline, as root or as ``nobody``.

Nothing here depends on the host it runs on beyond gcc/objcopy/go at build time (the VM
prebuilds on the host: ``tests/vm/guest_env.py``) and util-linux's ``setpriv`` at run time,
so the host tests and the VM tests share it.

An attack's result is one of:

- ``RAN``: attacker code printed its ``EG-PWNED`` marker (even if it was killed after);
- ``DENIED``: the exec, map, load or injection was refused before any attacker code ran
  (EPERM/EACCES, ld.so's load errors, an ``EG-DENIED`` line from a helper);
- ``KILLED``: SIGKILL before the marker (the kill backend);
- ``ERROR``: anything else, the test itself is broken (``EG-ERROR`` from a helper, a
  deadline, another signal, a file the user cannot reach); the message carries the output.
"""

from __future__ import annotations

import contextlib
import enum
import grp
import hashlib
import os
import pwd
import re
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

PROGS = Path(__file__).resolve().parent / "progs"
MARKER = "EG-PWNED"
DEFAULT_TIMEOUT = 15.0
RETRY_PAUSE = 0.5  # long enough for the agent to verify a small file
CACHE_ENV = "EXECGUARD_ATTACK_CACHE"  # overrides the build cache root
DEFAULT_CACHE = Path("/var/tmp/execguard-attacks")
LDSO = "/lib64/ld-linux-x86-64.so.2"
# The environment every attack runs with: no inherited LD_*, a fixed PATH and locale (the
# denial patterns below are the C locale's messages). EG_LINGER_MS keeps the payload alive a
# little after its marker, so a late kill by user space shows as RAN + killed_after_marker.
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C",
            "EG_LINGER_MS": "200"}
# stderr text that means "refused before attacker code ran" (kernel errno strings, ld.so's
# load failures, the helpers' own EG-DENIED lines)
DENIAL = re.compile(r"EG-DENIED|Operation not permitted|Permission denied|"
                    r"cannot be preloaded|failed to map segment")


class User(enum.Enum):
    ROOT = "root"
    NOBODY = "nobody"


class Result(enum.Enum):
    RAN = "RAN"
    DENIED = "DENIED"
    KILLED = "KILLED"
    ERROR = "ERROR"


@dataclass(frozen=True)
class Outcome:
    result: Result
    detail: str  # why it was classified so
    argv: Tuple[str, ...] = ()
    returncode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    marker: Optional[str] = None  # the EG-PWNED line, when attacker code ran
    killed_after_marker: bool = False  # ran, then SIGKILL (a late kill by user space)
    seconds: float = 0.0

    def __str__(self) -> str:
        late = " (then SIGKILL)" if self.killed_after_marker else ""
        return (f"{self.result.value}{late}: {self.detail}\n  argv: {list(self.argv)}\n"
                f"  rc={self.returncode} in {self.seconds:.2f}s\n  stdout: {self.stdout[-1500:]!r}"
                f"\n  stderr: {self.stderr[-1500:]!r}")


def error(detail: str, *, argv: Sequence[str] = (), stdout: str = "", stderr: str = ""
          ) -> Outcome:
    return Outcome(Result.ERROR, detail, tuple(argv), None, stdout, stderr)


# --- building -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Step:
    out: str  # the file name in the build directory
    argv: Tuple[str, ...]  # {src} = PROGS, {out} = the output path, {tmp} = scratch dir


def _cc(out: str, src: str, *flags: str) -> _Step:
    # no -Werror: a newer gcc's new warning must not fail a run (clean with gcc 12 -Werror)
    return _Step(out, ("gcc", "-O2", "-Wall", "-Wextra", *flags, "-o", "{out}", f"{{src}}/{src}"))


def _blob(out: str, marker: str) -> List[_Step]:
    obj = f"{out}.o"
    return [_Step(obj, ("gcc", "-c", f'-DMARKER="{marker}"', "-o", "{out}", "{src}/blob.S")),
            _Step(out, ("objcopy", "-O", "binary", "-j", ".text", f"{{tmp}}/{obj}", "{out}"))]


# gcc builds: each output from one source. The Go payloads follow (_GO).
_STEPS: Tuple[_Step, ...] = (
    _cc("payload-static", "payload.c", "-static"),
    _cc("payload-dyn", "payload.c"),
    _cc("benign-static", "benign.c", "-static"),
    _cc("benign-dyn", "benign.c"),
    *_blob("blob.bin", f"{MARKER} blob"),
    *_blob("inject.bin", f"{MARKER} ptrace"),
    _cc("loader", "loader.c"),
    _cc("preload.so", "preload.c", "-shared", "-fPIC"),
    _cc("memfd-exec", "memfd_exec.c"),
    _cc("fd-exec", "fd_exec.c"),
    _cc("mount-exec", "mount_exec.c"),
    _cc("mmap-write", "mmap_write.c"),
    _cc("tamper", "tamper.c"),
    _cc("ptrace-inject", "ptrace_inject.c"),
)
# name -> (CGO_ENABLED, extra go build flags)
_GO: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "payload-go": ("0", ()),
    "payload-go-pie": ("0", ("-buildmode=pie",)),
    "payload-go-cgo": ("1", ()),
}
GO_BUILDINFO_MAGIC = b"\xff Go buildinf:"
NOMAGIC = "payload-go-nomagic"  # payload-go with its build-info magic zeroed
STRIPPED = "payload-go-stripped"  # ... and its ELF section headers dropped, as sstrip does


def _go() -> str:
    return shutil.which("go") or "/usr/bin/go"


def _tool_versions() -> str:
    out = []
    for argv in (["gcc", "--version"], [_go(), "version"]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        out.append(proc.stdout.splitlines()[0])
    return "\n".join(out)


def source_hash() -> str:
    """The cache key: every source, this file (the recipe and the post-processing) and the
    compilers' versions."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted(p for p in PROGS.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(PROGS)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(_tool_versions().encode())
    return h.hexdigest()[:24]


def _safe_dir(path: Path) -> Path:
    """Create ``path`` (0755) or accept it only if it is ours and nobody else can write it:
    the cache usually sits in world-writable /var/tmp, and root runs what is in it."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o755)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{path}: not a directory owned by uid {os.geteuid()} and "
                           f"closed to others (mode {st.st_mode:o}, uid {st.st_uid})")
    os.chmod(path, 0o755)  # nobody must be able to reach the programs
    return path


def _run_build(argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
               cwd: Optional[Path] = None) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=600,
                          env=None if env is None else dict(env), cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed: {list(argv)}\n{proc.stdout}\n{proc.stderr}")


def _build_go(out: Path, gocache: Path) -> None:
    src = PROGS / "go"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GO", "CGO_"))}
    for name, (cgo, flags) in _GO.items():
        env = dict(base, CGO_ENABLED=cgo, GOFLAGS="-mod=mod", GOPROXY="off",
                   GOTOOLCHAIN="local", GOENV="off", GOCACHE=str(gocache),
                   GOPATH=str(out.parent / "gopath"), HOME=str(out.parent))
        # -buildvcs=false: the sources sit in this repository's git tree
        _run_build([_go(), "build", "-buildvcs=false", *flags, "-o", str(out / name), "."],
                   env, cwd=src)
    data = (out / "payload-go").read_bytes()
    if data.count(GO_BUILDINFO_MAGIC) != 1:
        raise RuntimeError("payload-go: expected exactly one Go build-info magic")
    nomagic = data.replace(GO_BUILDINFO_MAGIC, b"\0" * len(GO_BUILDINFO_MAGIC))
    (out / NOMAGIC).write_bytes(nomagic)
    (out / STRIPPED).write_bytes(_drop_section_headers(nomagic))


def _drop_section_headers(elf: bytes) -> bytes:
    """e_shoff, e_shnum and e_shstrndx zeroed (ELF64 little-endian): the loader and the Go
    runtime need only the program headers, but ".gopclntab" and ".go.buildinfo" are gone
    as names, so Go detection must find the runtime's tables by content."""
    if elf[:6] != b"\x7fELF\x02\x01":
        raise RuntimeError("payload-go: not a little-endian ELF64")
    out = bytearray(elf)
    struct.pack_into("<Q", out, 0x28, 0)
    struct.pack_into("<HH", out, 0x3C, 0, 0)
    return bytes(out)


def _build_into(out: Path, gocache: Path) -> None:
    scratch = out / ".obj"
    scratch.mkdir()
    for step in _STEPS:
        target = scratch / step.out if step.out.endswith(".o") else out / step.out
        _run_build([a.format(src=PROGS, out=target, tmp=scratch) for a in step.argv])
    _build_go(out, gocache)
    shutil.rmtree(scratch)
    for path in out.iterdir():
        path.chmod(0o755)  # root-owned, readable and runnable by nobody


def names() -> List[str]:
    return sorted({s.out for s in _STEPS if not s.out.endswith(".o")} | set(_GO)
                  | {NOMAGIC, STRIPPED})


def build_all(dest: Optional[Path] = None) -> Dict[str, Path]:
    """Every attack program, built into ``dest/<source hash>/`` unless already there.

    ``dest`` defaults to ``$EXECGUARD_ATTACK_CACHE`` or /var/tmp/execguard-attacks (which
    also keeps Go's build cache, whatever ``dest`` is). Returns
    name -> path (``payload-dyn``, ``loader``, ``blob.bin``, ...). Built in a scratch
    directory and renamed into place, so a half-built cache never counts.
    """
    cache = _safe_dir(Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)))
    root = _safe_dir(dest) if dest is not None else cache
    final = root / source_hash()
    if not final.exists():
        gocache = _safe_dir(cache / "gocache")  # the host's, never in ``dest``
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _build_into(scratch, gocache)
            scratch.chmod(0o755)
            with contextlib.suppress(OSError):  # a concurrent build got there first
                os.rename(scratch, final)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch)
    _safe_dir(final)
    built = {name: final / name for name in names()}
    missing = [str(p) for p in built.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"{final}: incomplete build, missing {missing}; remove it")
    return built


def tools_from_manifest(files: Mapping[str, str], prefix: str = "attack:") -> Dict[str, Path]:
    """The ``build_all`` map back from a VM fixture manifest (``attack:NAME`` entries)."""
    tools = {k[len(prefix):]: Path(v) for k, v in files.items() if k.startswith(prefix)}
    missing = sorted(set(names()) - set(tools))
    if missing:
        raise RuntimeError(f"the manifest lacks attack programs {missing}: prebuild again")
    return tools


# --- users ----------------------------------------------------------------------------------

def uid_gid(user: User) -> Tuple[int, int]:
    if user is User.ROOT:
        return 0, 0
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


def as_user(argv: Sequence[str], user: User) -> List[str]:
    """``argv`` run as ``user``: setpriv drops every id and capability, keeps the env."""
    if user is User.ROOT:
        return list(argv)
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]


def give(path: Path, user: User) -> Path:
    """Make ``path`` belong to ``user`` (the attacker's own files and directories)."""
    uid, gid = uid_gid(user)
    os.chown(path, uid, gid)
    return path


def unreachable(path: Path, user: User) -> Optional[str]:
    """Why ``user`` cannot read ``path`` (every directory above it searchable, the file
    readable), or None. Catches a broken setup before it can pass as a denial."""
    if user is User.ROOT:
        return None
    uid, gid = uid_gid(user)

    def allows(st: os.stat_result, bit: int) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid == gid:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    parts = path.parts
    for i in range(1, len(parts)):
        here = Path(*parts[:i])
        if not allows(os.stat(here), 1):
            return f"{user.value} cannot search {here}"
    if not allows(os.stat(path), 4):
        return f"{user.value} cannot read {path}"
    return None


def _unreachable_args(argv: Sequence[str], user: User) -> Optional[str]:
    for arg in argv:
        if arg.startswith("/") and not arg.startswith("/proc/") and os.path.exists(arg):
            why = unreachable(Path(arg), user)
            if why:
                return why
    return None


# --- running --------------------------------------------------------------------------------

def _env(extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
    env = dict(BASE_ENV)
    env.update(extra or {})
    return env


def classify(argv: Sequence[str], rc: Optional[int], out: str, err: str, seconds: float
             ) -> Outcome:
    """One run's result from its exit status and output (see the module docstring)."""
    marker = next((ln for ln in out.splitlines() if ln.startswith(MARKER)), None)
    args = (tuple(argv), rc, out, err, marker)
    if marker is not None:
        return Outcome(Result.RAN, f"attacker code ran: {marker!r}", *args,
                       killed_after_marker=rc == -signal.SIGKILL, seconds=seconds)
    if rc == -signal.SIGKILL:
        return Outcome(Result.KILLED, "SIGKILL before the marker", *args, seconds=seconds)
    if "EG-ERROR" in err:
        line = next(ln for ln in err.splitlines() if "EG-ERROR" in ln)
        return Outcome(Result.ERROR, f"the attack's own step failed: {line}", *args,
                       seconds=seconds)
    if rc is not None and rc < 0:
        return Outcome(Result.ERROR, f"killed by signal {-rc}", *args, seconds=seconds)
    found = DENIAL.search(err)
    if found:
        line = next(ln for ln in err.splitlines() if found.group(0) in ln)
        return Outcome(Result.DENIED, f"refused: {line.strip()}", *args, seconds=seconds)
    return Outcome(Result.ERROR, "no marker, no kill, no denial", *args, seconds=seconds)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def spawn(argv: Sequence[str], user: User = User.ROOT,
          env: Optional[Mapping[str, str]] = None, stdin: bool = False
          ) -> subprocess.Popen[bytes]:
    """Start ``argv`` as ``user`` in its own session (so a deadline kills the whole group),
    stdout and stderr piped; ``finish`` collects it. For targets and two-phase attacks."""
    return subprocess.Popen(as_user(argv, user), stdin=subprocess.PIPE if stdin else
                            subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(env), start_new_session=True, close_fds=True)


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> Optional[str]:
    """The next stdout line of ``proc``, or None at EOF or the deadline (never blocks
    longer). Reads byte-wise so nothing after the line is swallowed from the pipe."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                return None
            line += byte
    return line.decode(errors="replace").rstrip("\n")


def finish(proc: subprocess.Popen[bytes], timeout: float = DEFAULT_TIMEOUT,
           stdin: Optional[bytes] = None, seen: str = "", started: Optional[float] = None
           ) -> Outcome:
    """Wait for ``proc`` (killing its group at the deadline) and classify it. ``seen`` is
    stdout already consumed with ``read_line``."""
    begin = time.monotonic() if started is None else started
    argv = [str(a) for a in proc.args] if isinstance(proc.args, list) else [str(proc.args)]
    try:
        out, err = proc.communicate(input=stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate(timeout=10)
        return error(f"deadline of {timeout:.0f}s passed", argv=argv,
                     stdout=seen + out.decode(errors="replace"),
                     stderr=err.decode(errors="replace"))
    finally:
        _kill_group(proc)  # nothing the attack started outlives it
    text = seen + out.decode(errors="replace")
    return classify(argv, proc.returncode, text, err.decode(errors="replace"),
                    time.monotonic() - begin)


def run_attack(argv: Sequence[str], as_user: User = User.ROOT,
               timeout: float = DEFAULT_TIMEOUT, env: Optional[Mapping[str, str]] = None,
               stdin: Optional[bytes] = None) -> Outcome:
    """Run one attack as ``as_user`` with a deadline and classify it."""
    why = _unreachable_args(argv, as_user)
    if why:
        return error(f"setup: {why}", argv=argv)
    started = time.monotonic()
    try:
        proc = spawn(argv, as_user, env, stdin=stdin is not None)
    except PermissionError as exc:  # root's own exec of argv[0] refused (EPERM/EACCES)
        return Outcome(Result.DENIED, f"refused: {exc}", tuple(argv))
    return finish(proc, timeout, stdin, started=started)


def run_until_not_killed(argv: Sequence[str], as_user: User = User.ROOT,
                         env: Optional[Mapping[str, str]] = None, attempts: int = 2
                         ) -> Outcome:
    """``run_attack``, repeated (after a pause) while it comes back KILLED: an attacker
    simply tries again, and the kill backend kills a file it has not verified yet at its
    first exec, verifies it, and lets the next exec run on the kernel's verdict."""
    outcome = run_attack(argv, as_user, env=env)
    for _ in range(attempts - 1):
        if outcome.result is not Result.KILLED:
            break
        time.sleep(RETRY_PAUSE)
        outcome = run_attack(argv, as_user, env=env)
    return outcome


# --- mounts ---------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_below(path: Path) -> List[str]:
    """Mount points strictly below ``path`` in this mount namespace, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        points = [_unescape(line.split()[4]) for line in fh]
    return sorted({p for p in points if p.startswith(prefix)}, key=lambda p: -p.count("/"))


def unmount_below(path: Path) -> List[str]:
    """Unmount every mount below ``path`` (lazily if busy); what is left, for the caller to
    report. Teardown for tests that mount inside their own scope or work directory."""
    for point in mounts_below(path):
        for argv in (["umount", point], ["umount", "-l", point]):
            if subprocess.run(argv, capture_output=True, timeout=10).returncode == 0:
                break
    return mounts_below(path)


def _refused(argv: List[str], where: Path) -> bool:
    """Whether the kernel says EPERM to this mount: mount(8)'s messages hide the errno (a
    refused bind of a file reads "mount point is not a directory"), so ask mount(2)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if argv[:1] == ["--bind"]:
        source, fstype, flags, data = argv[1], None, 4096, None  # MS_BIND
    elif argv[:1] == ["-t"]:
        opts = argv[argv.index("-o") + 1] if "-o" in argv else None
        source, fstype, flags, data = argv[-1], argv[1], 0, opts
    else:
        return False
    rc = libc.mount(source.encode(), str(where).encode(),
                    fstype.encode() if fstype else None, flags,
                    data.encode() if data else None)
    if rc == 0:  # it worked this time: undo it, the caller reports the first failure
        libc.umount2(str(where).encode(), 2)
        return False
    return ctypes.get_errno() == 1  # EPERM


@contextlib.contextmanager
def mounted(*argv: str, where: Path) -> Iterator[Path]:
    """``mount ARGV... where`` in this namespace, unmounted (lazily if busy) on exit."""
    proc = subprocess.run(["mount", *argv, str(where)], capture_output=True, text=True,
                          timeout=10)
    if proc.returncode != 0:
        what = f"mount {list(argv)} {where}: {proc.stderr.strip()}"
        if _refused(list(argv), where):
            raise MountRefused(what)
        raise SetupError(what)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True,
                          timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


class SetupError(RuntimeError):
    """A way could not set itself up: its outcome is ERROR, never a denial."""


class MountRefused(SetupError):
    """The kernel refused a mount with EPERM (the BPF backends' mount guard): a denial."""
