"""Feature probes and the enforcement-backend choice.

Every probe answers by doing the thing (read the file, make the syscall, load the program),
never from a kernel version number (docs/architecture.md decision 5). Probes are memoized per
process, never raise, and undo what they did. ``choose_backend`` is pure: it sees only
ProbeResults, so tests can hand it any host they can imagine.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, NamedTuple, Tuple

from agent import registry
from agent.registry import AUDIT_ONLY as AUDIT_ONLY
from agent.sensors import fanotify_sys


@dataclass(frozen=True)
class ProbeResult:
    name: str
    ok: bool
    detail: str
    hint: str | None = None


class BackendReason(NamedTuple):
    backend: str
    status: str  # "chosen" | "skipped"
    why: str


@dataclass(frozen=True)
class Choice:
    backend: str | None  # None only when a requested backend is unavailable
    reasons: Tuple[BackendReason, ...]
    requested: str | None = None

    @property
    def enforcing(self) -> bool:
        return self.backend is not None and self.backend != AUDIT_ONLY


# Preference order (decision 5) and the probes each backend needs, all of which must be ok:
# agent/registry.py, the one table the agent's start-up order comes from too.
BACKENDS: Tuple[Tuple[str, Tuple[str, ...], str], ...] = tuple(
    (b.name, b.needs, b.what) for b in registry.BACKENDS)
BACKEND_NAMES: Tuple[str, ...] = registry.NAMES


def _missing(probes: Mapping[str, ProbeResult], needs: Tuple[str, ...]) -> List[str]:
    out = []
    for name in needs:
        res = probes.get(name)
        if res is None:
            out.append(f"{name}: not probed")
        elif not res.ok:
            out.append(f"{name}: {res.detail}")
    return out


def choose_backend(probes: Mapping[str, ProbeResult], requested: str | None = None) -> Choice:
    """Pick the most preferred backend whose probes all passed (or check the requested one).

    ``requested`` of None or "auto" means "best available". A named backend that is not
    available yields ``Choice(backend=None)``: silently enforcing less than the operator
    asked for is worse than refusing to start.
    """
    if requested == "auto":
        requested = None
    if requested is not None and requested not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {requested!r}; known: {', '.join(BACKEND_NAMES)}")
    chosen: str | None = None
    reasons: List[BackendReason] = []
    for name, needs, what in BACKENDS:
        missing = _missing(probes, needs)
        available = not missing
        if chosen is None and available and requested in (None, name):
            chosen = name
            reasons.append(BackendReason(name, "chosen", what))
        elif not available:
            reasons.append(BackendReason(name, "skipped", "unavailable: " + "; ".join(missing)))
        elif requested is not None and requested != name:
            reasons.append(
                BackendReason(name, "skipped", f"available, but {requested} was requested")
            )
        else:
            reasons.append(BackendReason(name, "skipped", f"available, but {chosen} is preferred"))
    return Choice(chosen, tuple(reasons), requested)


# ---------------------------------------------------------------- host probes

SECURITYFS = "/sys/kernel/security"
TRACEFS = "/sys/kernel/tracing"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
MOUNT_TIMEOUT = 5.0
AUDITCTL_TIMEOUT = 3.0

NEEDS_ROOT_HINT = "run execguard doctor as root (sudo) to probe this"


def is_root() -> bool:
    return os.geteuid() == 0


def _guarded(name: str) -> Callable[[Callable[[], ProbeResult]], Callable[[], ProbeResult]]:
    """Memoize a probe and turn any exception into a failed ProbeResult (probes never raise)."""

    def wrap(fn: Callable[[], ProbeResult]) -> Callable[[], ProbeResult]:
        @functools.cache
        def probe() -> ProbeResult:
            try:
                return fn()
            except Exception as exc:  # a probe must report, never crash doctor or the agent
                return ProbeResult(name, False, f"probe error: {exc!r}", "report this as a bug")

        PROBE_CACHES.append(probe.cache_clear)
        return probe

    return wrap


PROBE_CACHES: List[Callable[[], None]] = []


def clear_cache() -> None:
    for clear in PROBE_CACHES:
        clear()


def _mounted_fstype(path: str) -> str | None:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4] == path:
                return right.split()[0]
    return None


def _ensure_mounted(name: str, fstype: str, path: str, why: str) -> ProbeResult:
    if _mounted_fstype(path) == fstype:
        return ProbeResult(name, True, f"{fstype} mounted at {path}")
    if not is_root():
        return ProbeResult(
            name, False, f"{fstype} not mounted at {path}; needs root", NEEDS_ROOT_HINT
        )
    proc = subprocess.run(
        ["mount", "-t", fstype, fstype, path],
        capture_output=True,
        text=True,
        timeout=MOUNT_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        return ProbeResult(
            name, False, f"mount -t {fstype} at {path} failed: {proc.stderr.strip()}", why
        )
    return ProbeResult(
        name, True, f"was not mounted: doctor mounted {fstype} at {path} (left mounted)"
    )


@_guarded("kernel")
def probe_kernel() -> ProbeResult:
    u = os.uname()
    return ProbeResult("kernel", True, f"{u.release} {u.machine} ({u.version})")


@_guarded("root")
def probe_root() -> ProbeResult:
    if is_root():
        return ProbeResult("root", True, "euid 0")
    return ProbeResult(
        "root",
        False,
        f"euid {os.geteuid()}: privileged probes report 'needs root'",
        NEEDS_ROOT_HINT,
    )


@_guarded("securityfs")
def probe_securityfs() -> ProbeResult:
    return _ensure_mounted(
        "securityfs", "securityfs", SECURITYFS, "the LSM list and lockdown mode live there"
    )


@_guarded("tracefs")
def probe_tracefs() -> ProbeResult:
    if _mounted_fstype("/sys/kernel/debug/tracing") == "tracefs":
        return ProbeResult("tracefs", True, "tracefs mounted at /sys/kernel/debug/tracing")
    return _ensure_mounted("tracefs", "tracefs", TRACEFS, "tracepoint ids are read from tracefs")


def _read_security(leaf: str) -> str:
    with open(os.path.join(SECURITYFS, leaf), encoding="utf-8") as f:
        return f.read().strip()


@functools.cache
def lockdown_mode() -> str | None:
    """The bracketed lockdown level, "unsupported" without the lockdown LSM, None if unknown."""
    if not probe_securityfs().ok:
        return None
    try:
        text = _read_security("lockdown")
    except FileNotFoundError:
        return "unsupported"
    except OSError:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


@functools.cache
def active_lsms() -> Tuple[str, ...] | None:
    if not probe_securityfs().ok:
        return None
    try:
        return tuple(x for x in _read_security("lsm").split(",") if x)
    except FileNotFoundError:
        return ()
    except OSError:
        return None


PROBE_CACHES.extend([lockdown_mode.cache_clear, active_lsms.cache_clear])


@_guarded("lockdown")
def probe_lockdown() -> ProbeResult:
    mode = lockdown_mode()
    if mode is None:
        if not is_root():
            return ProbeResult(
                "lockdown", False, "unknown: needs root (mode 0600)", NEEDS_ROOT_HINT
            )
        return ProbeResult("lockdown", False, "unknown: securityfs unreadable", None)
    if mode == "confidentiality":
        return ProbeResult(
            "lockdown",
            True,
            "confidentiality",
            "kprobes, tracefs tracepoints and bpf_probe_read_kernel are blocked; "
            "only BTF-typed programs (LSM, fmod_ret, raw tracepoints) load",
        )
    return ProbeResult("lockdown", True, mode)


@_guarded("lsm")
def probe_lsm() -> ProbeResult:
    lsms = active_lsms()
    if lsms is None:
        return ProbeResult("lsm", False, "active LSM list unknown (securityfs not mounted)")
    listed = ",".join(lsms) or "(empty)"
    if "bpf" in lsms:
        return ProbeResult("lsm", True, f"active: {listed}; bpf is active")
    keep = ",".join(x for x in lsms if x != "capability")
    return ProbeResult(
        "lsm",
        False,
        f"active: {listed}; bpf is NOT active, so BPF LSM programs would never run",
        f"boot with lsm={keep + ',' if keep else ''}bpf (lsm= replaces the whole list)",
    )


@_guarded("btf")
def probe_btf() -> ProbeResult:
    try:
        size = os.stat(BTF_VMLINUX).st_size
    except FileNotFoundError:
        return ProbeResult(
            "btf",
            False,
            f"{BTF_VMLINUX} missing",
            "needs a kernel built with CONFIG_DEBUG_INFO_BTF",
        )
    return ProbeResult("btf", True, f"{BTF_VMLINUX} present ({size} bytes)")


# What every BCC backend compiles at start (agent/sensors/bpf/programs, package data): an
# install that lost them must not report a backend that cannot load.
BPF_PROGRAMS = ("events.h", "exec_verdict.h", "exec_lsm.c", "exec_fmod_ret.c", "exec_sensor.c")


@_guarded("bpf-programs")
def probe_bpf_programs() -> ProbeResult:
    from agent.sensors.bpf.build import BPF_DIR  # lazy: build imports kernel_layout

    missing = [n for n in BPF_PROGRAMS if not os.access(os.path.join(BPF_DIR, n), os.R_OK)]
    if missing:
        return ProbeResult("bpf-programs", False,
                           f"{BPF_DIR}: missing or unreadable: {', '.join(missing)}",
                           "reinstall execguard: the BPF sources are package data "
                           "(agent/sensors/bpf/programs) that BCC compiles at start")
    return ProbeResult("bpf-programs", True, f"{len(BPF_PROGRAMS)} sources in {BPF_DIR}")


def _fanotify(name: str, mask: int, label: str) -> ProbeResult:
    if not is_root():
        return ProbeResult(name, False, "needs root (CAP_SYS_ADMIN)", NEEDS_ROOT_HINT)
    res = fanotify_sys.try_permission_mark(mask)
    if res.ok:
        return ProbeResult(name, True, f"{label} mark added on a private inode, then removed")
    err = fanotify_sys.errno_name(res.errno)
    if res.stage == "init":
        return ProbeResult(
            name, False, f"fanotify_init failed: {err}", "needs CONFIG_FANOTIFY_ACCESS_PERMISSIONS"
        )
    return ProbeResult(name, False, f"fanotify_mark({label}) failed: {err}", None)


@_guarded("fanotify-exec")
def probe_fanotify_exec() -> ProbeResult:
    return _fanotify("fanotify-exec", fanotify_sys.FAN_OPEN_EXEC_PERM, "FAN_OPEN_EXEC_PERM")


@_guarded("fanotify-open")
def probe_fanotify_open() -> ProbeResult:
    return _fanotify("fanotify-open", fanotify_sys.FAN_OPEN_PERM, "FAN_OPEN_PERM")


@_guarded("auditd")
def probe_auditd() -> ProbeResult:
    if not is_root():
        return ProbeResult("auditd", False, "needs root to query audit status", NEEDS_ROOT_HINT)
    try:
        proc = subprocess.run(
            ["auditctl", "-s"],
            capture_output=True,
            text=True,
            timeout=AUDITCTL_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        return ProbeResult("auditd", False, "auditctl not found", "install auditd (audit on Rocky)")
    status = dict(re.findall(r"^(\w+) (\S+)", proc.stdout, re.MULTILINE))
    enabled, pid = status.get("enabled", "?"), status.get("pid", "0")
    if proc.returncode != 0 or "enabled" not in status:
        return ProbeResult("auditd", False, f"auditctl -s failed: {proc.stderr.strip()}")
    if pid == "0" or enabled == "0":
        return ProbeResult(
            "auditd",
            False,
            f"not running (auditctl -s: enabled {enabled}, pid {pid}); "
            "decisions reach the JSON decision log only",
            "start auditd (systemctl start auditd, or run auditd)",
        )
    return ProbeResult("auditd", True, f"running (pid {pid}, enabled {enabled})")


@_guarded("audit-binding")
def probe_audit_binding() -> ProbeResult:
    try:
        import audit  # noqa: F401  (the libaudit SWIG binding from the distro)
    except ImportError as exc:
        return ProbeResult(
            "audit-binding",
            False,
            f"import audit failed: {exc}",
            "install python3-audit and use the venv made from /usr/bin/python3 "
            "with --system-site-packages (scripts/setup.sh)",
        )
    return ProbeResult("audit-binding", True, "import audit works (libaudit binding)")


# ---------------------------------------------------------------- all of them


def run_probes(compile: bool = True, timeout: float | None = None) -> Dict[str, ProbeResult]:
    """Every probe, in display order; a fresh dict each call over the memoized results.
    ``timeout``: seconds for the BCC probe child (None: $EXECGUARD_PROBE_TIMEOUT or 30)."""
    return dict(_run_all(compile, timeout))


@functools.cache
def _run_all(compile: bool, timeout: float | None) -> Dict[str, ProbeResult]:
    """Run every probe once. BCC work runs in a child process while the cheap probes run here."""
    from agent.sensors import bcc_probe  # lazy: bcc_probe imports ProbeResult from here

    out: Dict[str, ProbeResult] = {}
    for p in (probe_kernel, probe_root, probe_securityfs, probe_lockdown, probe_lsm, probe_btf,
              probe_bpf_programs):
        r = p()
        out[r.name] = r
    tracefs = probe_tracefs()  # before the child: tracepoint attach reads ids from tracefs
    out[tracefs.name] = tracefs
    child = bcc_probe.start(compile=compile, load=is_root(),
                            timeout=bcc_probe.resolve_timeout(timeout))
    try:
        host = [probe_fanotify_exec(), probe_fanotify_open(), probe_auditd(), probe_audit_binding()]
        try:
            bcc_results = bcc_probe.finish(child, lsms=active_lsms(), root=is_root())
        except Exception as exc:  # probes never raise: report every BCC probe as failed
            bcc_results = {
                n: ProbeResult(n, False, f"probe error: {exc!r}", "report this as a bug")
                for n in bcc_probe.ALL_NAMES
            }
    finally:
        bcc_probe.stop(child)
    out.update(bcc_results)
    for r in host:
        out[r.name] = r
    return out


PROBE_CACHES.append(_run_all.cache_clear)
