"""BCC probes, run in a child process: the only module that imports ``bcc``.

A compile can take seconds and a bad program can crash libbcc, so the caller starts
``python -m agent.sensors.bcc_probe`` with a deadline and reads one JSON line per step. The
child announces each step before it starts, so a timeout or crash names the step. Every
program is harmless while attached (returns 0 / allows), and the child's exit detaches them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Tuple

from agent.sensors.probe import NEEDS_ROOT_HINT, ProbeResult

CHILD_TIMEOUT = 30.0  # default seconds for the whole child; each step takes ~0.3 s here
# Under emulation (qemu TCG on a shared CPU) one BCC compile takes 6-30 s: the budget is a
# knob (doctor/run --probe-timeout, or this variable for harnesses that cannot pass flags).
TIMEOUT_ENV = "EXECGUARD_PROBE_TIMEOUT"
TIMEOUT_MAX = 3600.0
TAG = "execguard-bcc-probe "  # marks our lines on stdout
EXEC_TP = "sched:sched_process_exec"

# One module for the classic programs: each is loaded and attached on its own. The
# context is void * so BCC needs no tracefs format file to compile it (non-root can).
PROGRAM_TRACING = r"""
int eg_tp_exec(void *ctx) { return 0; }
int eg_rawtp_exec(void *ctx) { return 0; }
int eg_signal_exec(void *ctx)
{
    /* Never true (an exec'ing task is never tgid 0), and signal 0 only checks
     * permission: the helper must load, nothing must ever be signalled. */
    if ((bpf_get_current_pid_tgid() >> 32) == 0)
        bpf_send_signal(0);
    return 0;
}
"""
# LSM_PROBE autoloads and attaches in the BPF() constructor; it only passes on earlier verdicts.
PROGRAM_LSM = r"""
struct linux_binprm;
LSM_PROBE(bprm_check_security, struct linux_binprm *bprm, int ret) { return ret; }
"""
# fmod_ret returning 0 leaves security_bprm_check to run as usual.
PROGRAM_FMOD_RET = r"""
struct linux_binprm;
KMOD_RET(security_bprm_check, struct linux_binprm *bprm, int ret) { return 0; }
"""

COMPILE_DEPENDENT = (
    "bcc-compile",
    "tracepoint",
    "raw-tracepoint",
    "send-signal",
    "bpf-lsm",
    "fmod-ret",
)
LOAD_DEPENDENT = COMPILE_DEPENDENT[1:]
ALL_NAMES = ("bcc", "kernel-headers", *COMPILE_DEPENDENT)


# ---------------------------------------------------------------- child side


class _Step:
    """Run one step with fds 1 and 2 sent to a temp file, so BCC's C++ chatter is captured."""

    def __init__(self, out: IO[str], name: str) -> None:
        self.out, self.name = out, name

    def run(self, body: Callable[[], Dict[str, Any]]) -> bool:
        import ctypes

        self._emit({"event": "start"})
        t0 = time.monotonic()
        rec: Dict[str, Any] = {"event": "result", "ok": True}
        with tempfile.TemporaryFile() as log:
            saved = os.dup(1), os.dup(2)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            ctypes.set_errno(0)
            try:
                rec.update(body())
            except Exception as exc:  # report, never die: the next step may still work
                rec.update(ok=False, error=str(exc), errno=ctypes.get_errno() or None)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            log.seek(0)
            rec["log"] = log.read()[-4000:].decode("utf-8", "replace")
        rec["ms"] = round((time.monotonic() - t0) * 1000)
        self._emit(rec)
        return bool(rec["ok"])

    def _emit(self, rec: Dict[str, Any]) -> None:
        rec["name"] = self.name
        self.out.write(TAG + json.dumps(rec) + "\n")
        self.out.flush()


def child_main(argv: List[str]) -> int:
    out = os.fdopen(os.dup(1), "w")
    want_compile = "--compile" in argv
    want_load = "--load" in argv
    mods: Dict[str, Any] = {}

    def do_import() -> Dict[str, Any]:
        import bcc

        mods["bcc"] = bcc
        return {"version": getattr(bcc, "__version__", "unknown"), "path": bcc.__file__}

    if not _Step(out, "bcc").run(do_import) or not want_compile:
        return 0
    BPF = mods["bcc"].BPF
    objs: List[Any] = []  # kept open until exit: programs stay attached, then all go together

    def compile_tracing() -> Dict[str, Any]:
        objs.append(BPF(text=PROGRAM_TRACING.encode()))
        return {}

    if not _Step(out, "bcc-compile").run(compile_tracing) or not want_load:
        return 0
    b = objs[0]

    def attach(fn: str, raw: bool) -> Callable[[], Dict[str, Any]]:
        def body() -> Dict[str, Any]:
            if raw:
                b.load_func(fn, BPF.RAW_TRACEPOINT)
                b.attach_raw_tracepoint(tp=EXEC_TP.split(":")[1], fn_name=fn)
            else:
                b.load_func(fn, BPF.TRACEPOINT)
                b.attach_tracepoint(tp=EXEC_TP, fn_name=fn)
            return {}

        return body

    _Step(out, "tracepoint").run(attach("eg_tp_exec", raw=False))
    _Step(out, "raw-tracepoint").run(attach("eg_rawtp_exec", raw=True))
    _Step(out, "send-signal").run(attach("eg_signal_exec", raw=False))

    def lsm() -> Dict[str, Any]:
        objs.append(BPF(text=PROGRAM_LSM.encode()))
        return {}

    def fmod_ret() -> Dict[str, Any]:
        fb = BPF(text=PROGRAM_FMOD_RET.encode())
        objs.append(fb)
        fn = fb.load_func(b"kmod_ret__security_bprm_check", BPF.TRACING)
        # BCC < 0.35 has no attach_fmod_ret(); the kfunc attach takes fmod_ret programs.
        fd = mods["bcc"].lib.bpf_attach_kfunc(fn.fd)
        if fd < 0:
            raise RuntimeError("Failed to attach fmod_ret program")
        return {}

    _Step(out, "bpf-lsm").run(lsm)
    _Step(out, "fmod-ret").run(fmod_ret)
    return 0


# ---------------------------------------------------------------- parent side


def parse_timeout(text: str, source: str) -> float:
    """Seconds in (0, TIMEOUT_MAX]; ValueError naming ``source`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{source}: {text!r} is not a number of seconds") from None
    if not 0 < value <= TIMEOUT_MAX:  # also refuses nan and inf
        raise ValueError(f"{source}: {text!r} must be more than 0 and at most "
                         f"{TIMEOUT_MAX:.0f} seconds")
    return value


def resolve_timeout(given: float | None = None) -> float:
    """The probe child's budget: ``given`` (a CLI flag), else $EXECGUARD_PROBE_TIMEOUT, else
    CHILD_TIMEOUT. ValueError when the variable is malformed (callers report it)."""
    if given is not None:
        return parse_timeout(repr(given), "--probe-timeout")
    env = os.environ.get(TIMEOUT_ENV)
    if env is not None and env.strip():
        return parse_timeout(env.strip(), TIMEOUT_ENV)
    return CHILD_TIMEOUT


@dataclass
class Child:
    proc: subprocess.Popen[str] | None
    compile: bool
    load: bool
    started: float = field(default_factory=time.monotonic)
    error: str | None = None
    timeout: float | None = None  # None: CHILD_TIMEOUT


def start(*, compile: bool, load: bool, timeout: float | None = None) -> Child:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "agent.sensors.bcc_probe"]
    cmd += ["--compile"] if compile else []
    cmd += ["--load"] if load and compile else []
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
            env=env,
            start_new_session=True,  # so a timeout kills the whole group
        )
    except OSError as exc:
        return Child(None, compile, load, error=f"cannot start {cmd[0]}: {exc}", timeout=timeout)
    return Child(proc, compile, load, timeout=timeout)


def stop(child: Child) -> None:
    if child.proc is not None and child.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait()


def _collect(child: Child) -> Tuple[Dict[str, Dict[str, Any]], str | None, str]:
    """Records by step name, the step that was running when the child died (if any), why."""
    if child.proc is None:
        return {}, "bcc", child.error or "child did not start"
    budget = child.timeout if child.timeout is not None else CHILD_TIMEOUT
    left = max(0.1, budget - (time.monotonic() - child.started))
    try:
        stdout, stderr = child.proc.communicate(timeout=left)
        why = f"child exited with status {child.proc.returncode}: {stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        stop(child)
        stdout, stderr = child.proc.communicate()
        why = (f"timed out after {budget:g} s (raise it with --probe-timeout or "
               f"{TIMEOUT_ENV})")
    records: Dict[str, Dict[str, Any]] = {}
    running: str | None = None
    for line in stdout.splitlines():
        if not line.startswith(TAG):
            continue
        try:
            rec = json.loads(line[len(TAG) :])
        except ValueError:
            continue  # a torn last line from a killed child
        if rec["event"] == "start":
            running = rec["name"]
        else:
            records[rec["name"]] = rec
            running = None
    if running is None and child.proc.returncode not in (0, None) and not records:
        running = "bcc"
    return records, running, why


# ---------------------------------------------------------------- kernel headers

MODULES_DIR = "/lib/modules"
KHEADERS = "/sys/kernel/kheaders.tar.xz"


def headers_hint(release: str) -> str:
    return (
        f"install the headers for {release} (Debian/Ubuntu linux-headers-{release}, Rocky "
        f"kernel-devel-{release}). Only where none exist for this kernel (our 6.18 dev VM): "
        f"link Debian's /usr/src/linux-headers-6.1.0-*-amd64 as {MODULES_DIR}/{release}/build "
        "and its -common twin as .../source (the installer does this, doctor never does); "
        "struct offsets then come from 6.1, so the identity self-test must pass"
    )


def _headers_release(tree: str) -> str | None:
    try:
        with open(os.path.join(tree, "include/generated/utsrelease.h"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    start = text.find('"')
    return text[start + 1 : text.rfind('"')] if start >= 0 else None


def probe_headers(release: str) -> ProbeResult:
    """Find headers the way BCC's loader does (BCC_KERNEL_SOURCE, build+source, build)."""
    name, kdir = "kernel-headers", os.path.join(MODULES_DIR, release)
    build = os.path.join(kdir, "build")
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        kpath, generated, how = env, env, "BCC_KERNEL_SOURCE"
    elif os.path.isdir(build) and os.path.isdir(os.path.join(kdir, "source")):
        kpath, generated, how = os.path.join(kdir, "source"), build, "build+source"
    else:
        kpath, generated, how = build, build, "build"
    if not os.path.isfile(os.path.join(kpath, "include/linux/kconfig.h")):
        if os.path.exists(KHEADERS):
            return ProbeResult(name, True, f"BCC will unpack {KHEADERS} (CONFIG_IKHEADERS)")
        return ProbeResult(
            name,
            False,
            f"NO KERNEL HEADERS for {release}: {kpath} has no include/linux/kconfig.h and "
            f"{KHEADERS} is absent, so BCC cannot compile any program",
            headers_hint(release),
        )
    found = _headers_release(generated) or "unknown"
    where = f"{kpath} -> {os.path.realpath(kpath)} ({how})"
    if found != release:
        return ProbeResult(
            name,
            False,
            f"MISMATCHED KERNEL HEADERS: {where} are for {found}, the running kernel is "
            f"{release}; BCC compiles, but struct layouts come from another kernel",
            "use headers built for the running kernel; until then only BTF-typed programs "
            "and the identity self-test can be trusted",
        )
    return ProbeResult(name, True, f"{where}, release {found}")


# ---------------------------------------------------------------- records -> ProbeResults


def _caps_ok() -> bool:
    """Effective CAP_SYS_ADMIN (21) and CAP_BPF (39)? Then EPERM is not a capability problem."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return bool(eff & (1 << 21)) and bool(eff & (1 << 39))
    return False


def _log_excerpt(log: str) -> str:
    lines = [
        ln.strip()
        for ln in log.splitlines()
        if ln.strip() and not ln.startswith(("bpf: Failed to load program", "modprobe:"))
    ]
    text = " | ".join(lines[-2:])
    return text[:240]


def _headers_missing(log: str) -> bool:
    return "kconfig.h" in log or "Unable to find kernel headers" in log


def _failure(name: str, rec: Dict[str, Any], release: str) -> ProbeResult:
    err, log, code = str(rec.get("error", "")), str(rec.get("log", "")), rec.get("errno")
    if "compile" in err.lower() or name == "bcc-compile":
        if _headers_missing(log):
            return ProbeResult(
                name,
                False,
                f"BCC CANNOT COMPILE: no usable kernel headers for {release}",
                "install kernel headers: see the kernel-headers probe",
            )
        if name == "fmod-ret" and "KMOD_RET" in log:
            return ProbeResult(name, False, "this BCC has no KMOD_RET macro", "needs BCC >= 0.19")
        return ProbeResult(name, False, f"compile failed: {_log_excerpt(log) or err}")
    stage = "attach" if "attach" in err.lower() else "load"
    detail = f"{stage} failed"
    if isinstance(code, int) and code:
        detail += f": {errno.errorcode.get(code, str(code))} ({os.strerror(code)})"
    else:
        detail += f": {err}"
    if code == 1 and _caps_ok():
        detail += "; running with CAP_SYS_ADMIN and CAP_BPF, so this kernel refuses the program"
    excerpt = _log_excerpt(log)
    if excerpt:
        detail += f"; log: {excerpt}"
    return ProbeResult(name, False, detail, FAIL_HINTS.get(name))


FAIL_HINTS = {
    "bpf-lsm": "BPF LSM needs BTF, BPF_PROG_TYPE_LSM loads and bpf in lsm=; "
    "fmod-ret or fanotify-exec take over",
    "fmod-ret": "fmod_ret needs BPF trampolines (BTF, x86_64/arm64, 5.7+)",
    "tracepoint": "tracepoints need tracefs (blocked under lockdown=confidentiality)",
    "send-signal": "the kill backend needs bpf_send_signal in a tracepoint program",
}
SUCCESS = {
    "bcc-compile": "compiled a trivial exec program",
    "tracepoint": f"loaded and attached a tracepoint program on {EXEC_TP}",
    "raw-tracepoint": "loaded and attached a raw tracepoint on sched_process_exec",
    "send-signal": f"a {EXEC_TP} program calling bpf_send_signal loaded and attached",
    "bpf-lsm": "LSM_PROBE(bprm_check_security) loaded and attached",
    "fmod-ret": "KMOD_RET(security_bprm_check) loaded and attached",
}


def _bpf_lsm_active(res: ProbeResult, lsms: Tuple[str, ...] | None) -> ProbeResult:
    """Attach succeeds even when bpf is not an active LSM; the program then never runs."""
    if not res.ok or (lsms is not None and "bpf" in lsms):
        return res
    listed = "unknown" if lsms is None else ",".join(lsms) or "(empty)"
    return ProbeResult(
        res.name,
        False,
        f"{res.detail}, but bpf is not in the active LSM list ({listed}): "
        "the program would never run (silent failure)",
        "add bpf to the lsm= boot parameter",
    )


def _bcc_result(rec: Dict[str, Any] | None, why: str) -> ProbeResult:
    if rec is None:
        return ProbeResult("bcc", False, why)
    if rec["ok"]:
        return ProbeResult("bcc", True, f"bcc {rec.get('version')} imports from {rec.get('path')}")
    return ProbeResult(
        "bcc",
        False,
        f"import bcc failed: {rec.get('error')}",
        "install python3-bpfcc (python3-bcc on Rocky) and run from the venv made from "
        "/usr/bin/python3 with --system-site-packages (scripts/setup.sh)",
    )


def finish(child: Child, *, lsms: Tuple[str, ...] | None, root: bool) -> Dict[str, ProbeResult]:
    """Wait for the child (within its deadline) and explain what it found."""
    records, died_in, why = _collect(child)
    release = os.uname().release
    return interpret(
        records,
        died_in=died_in,
        why=why,
        compiled=child.compile,
        root=root,
        lsms=lsms,
        headers=probe_headers(release),
        release=release,
    )


def interpret(
    records: Dict[str, Dict[str, Any]],
    *,
    died_in: str | None,
    why: str,
    compiled: bool,
    root: bool,
    lsms: Tuple[str, ...] | None,
    headers: ProbeResult,
    release: str,
) -> Dict[str, ProbeResult]:
    """One ProbeResult for every BCC probe, in display order, from the child's records."""
    out: Dict[str, ProbeResult] = {}
    died = f"probe child {why} during '{died_in}'" if died_in else ""
    out["bcc"] = _bcc_result(records.get("bcc"), died or why)
    out["kernel-headers"] = headers
    blocked: ProbeResult | None = None  # why the later steps never ran
    if not out["bcc"].ok:
        blocked = ProbeResult("", False, "not attempted: bcc does not import", "fix bcc first")
    for name in COMPILE_DEPENDENT:
        rec = records.get(name)
        if not compiled:
            res = ProbeResult(
                name, False, "not probed (--no-compile)", "run doctor without --no-compile"
            )
        elif rec is not None:
            ms = f" in {rec.get('ms')} ms"
            ok = ProbeResult(name, True, SUCCESS[name] + ms)
            res = ok if rec["ok"] else _failure(name, rec, release)
        elif died_in == name:
            res = ProbeResult(name, False, died, "rerun doctor; report the crash if it repeats")
        elif blocked is not None:
            res = ProbeResult(name, False, blocked.detail, blocked.hint)
        elif not root and name in LOAD_DEPENDENT:
            res = ProbeResult(name, False, "needs root to load BPF programs", NEEDS_ROOT_HINT)
        else:
            res = ProbeResult(name, False, f"not attempted: {died or why}")
        if name == "bcc-compile" and not res.ok and blocked is None:
            blocked = ProbeResult(
                "", False, "not attempted: BCC cannot compile", "fix bcc-compile first"
            )
        if name == "bpf-lsm":
            res = _bpf_lsm_active(res, lsms)
        out[name] = res
    return out


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
