"""Host settings that close what a backend cannot see (docs/threat-model.md, "Host settings").

execguard's backends differ in what they can refuse: fanotify-exec sees execs of the
filesystems its own mount table shows in scope and nothing else, kill sees execs and
mmap(2) but cannot refuse ptrace, and only bpf-lsm/fmod-ret refuse a ptrace attach. A few
sysctls close some of the rest for every process on the host; doctor reads them, and says
what each one left as it is leaves open.
Reading only: doctor never changes a host setting. The running fanotify-exec agent
changes two FUSE ones, for itself (agent/sensors/fanotify_fuse.py): it mounts fusectl where
nothing has, and raises fuse's allow_sys_admin_access for the moment of a mark call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

from agent.sensors.fanotify_fuse import ADMIN_ACCESS

Reader = Callable[[str], Optional[str]]


def read_sysctl(name: str) -> Optional[str]:
    """The value of sysctl ``name`` (dots), or None when this kernel has no such setting."""
    try:
        with open("/proc/sys/" + name.replace(".", "/"), encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class HostSetting:
    name: str
    value: Optional[str]  # None: not on this kernel
    ok: bool  # the setting closes what it can close
    matters_for: str  # the backends that need it
    detail: str  # what it closes, or what it leaves open as it is

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def memfd_noexec(read: Reader) -> HostSetting:
    value = read("vm.memfd_noexec")
    n = _int(value)
    if value is None:
        return HostSetting("vm.memfd_noexec", None, False, "fanotify-exec",
                           "not on this kernel (6.3+): fanotify-exec cannot see the exec of a "
                           "memfd (bpf-lsm, fmod-ret and kill deny it as a file with no path)")
    if n == 2:
        return HostSetting("vm.memfd_noexec", value, True, "fanotify-exec",
                           "2: no memfd can be executed on this host")
    return HostSetting("vm.memfd_noexec", value, False, "fanotify-exec",
                       f"{value}: a memfd can be executed, and fanotify-exec cannot see it; "
                       "2 closes that (bpf-lsm, fmod-ret and kill deny it anyway)")


def user_namespaces(read: Reader) -> HostSetting:
    clone = read("kernel.unprivileged_userns_clone")
    restrict = read("kernel.apparmor_restrict_unprivileged_userns")
    maximum = read("user.max_user_namespaces")
    if clone == "0" or restrict == "1" or maximum == "0":
        which = ("kernel.unprivileged_userns_clone=0" if clone == "0" else
                 "kernel.apparmor_restrict_unprivileged_userns=1" if restrict == "1" else
                 "user.max_user_namespaces=0")
        return HostSetting("unprivileged user namespaces", "off", True, "fanotify-exec",
                           f"{which}: an unprivileged user cannot mount in a namespace of "
                           "its own")
    return HostSetting("unprivileged user namespaces", "on", False, "fanotify-exec",
                       "any user can make a mount namespace of its own (unshare -Urm) and "
                       "mount a tmpfs, or a bind of another filesystem, over a path in scope "
                       "there: a filesystem fanotify-exec never sees (it marks those its own "
                       "mount table shows); kernel.unprivileged_userns_clone=0 (Debian, "
                       "Ubuntu) or "
                       "kernel.apparmor_restrict_unprivileged_userns=1 (Ubuntu) closes it "
                       "(bpf-lsm, fmod-ret and kill judge such files wherever they are)")


def ptrace_scope(read: Reader) -> HostSetting:
    value = read("kernel.yama.ptrace_scope")
    n = _int(value)
    if value is None:
        return HostSetting("kernel.yama.ptrace_scope", None, False, "fanotify-exec, kill",
                           "Yama is not active: any process may ptrace another of its own "
                           "user and inject code into a signed program; only bpf-lsm and "
                           "fmod-ret refuse that")
    if n is not None and n >= 2:
        who = "nobody" if n == 3 else "only root (CAP_SYS_PTRACE)"
        return HostSetting("kernel.yama.ptrace_scope", value, n == 3, "fanotify-exec, kill",
                           f"{value}: {who} may attach with ptrace"
                           + ("" if n == 3 else "; 3 closes it for root too"))
    return HostSetting("kernel.yama.ptrace_scope", value, False, "fanotify-exec, kill",
                       f"{value}: a user may ptrace its own processes (at 1, its "
                       "descendants: a program it starts) and inject code into a signed "
                       "program; 2 (root only) or 3 (nobody) closes it; bpf-lsm and "
                       "fmod-ret refuse it themselves")


def leases(read: Reader) -> HostSetting:
    value = read("fs.leases-enable")
    if value in (None, "1"):
        return HostSetting("fs.leases-enable", value, True, "every backend",
                           "leases work: a verdict is published only while nobody holds the "
                           "file open for write")
    return HostSetting("fs.leases-enable", value, False, "every backend",
                       f"{value}: execguard cannot tell whether a file is open for write, so "
                       "it never caches a verdict: every exec is verified again (slow, "
                       "never wrong); 1 restores the cache")


def fuse_marks(param: str = ADMIN_ACCESS, fuse_known: Optional[bool] = None
               ) -> HostSetting:
    """A user's FUSE mount (the setuid fusermount3 makes them, without allow_other) refuses
    root: fanotify_mark's permission check refused the agent, and execs there ran
    unjudged. fuse's allow_sys_admin_access (6.0+) lets the agent in for the mark."""
    import os

    name = "fuse allow_sys_admin_access"
    if fuse_known is None:
        # /dev/fuse: opening it loads the module, so a host without it loaded has FUSE too
        fuse_known = (os.path.exists("/sys/module/fuse") or _has_filesystem("fuse")
                      or os.path.exists("/dev/fuse"))
    try:
        with open(param, encoding="ascii") as f:
            value: Optional[str] = f.read().strip()
    except OSError:
        value = None
    if value is not None:
        return HostSetting(name, value, True, "fanotify-exec",
                           "present: fanotify-exec raises it for the moment it marks a "
                           "user's FUSE mount in scope, so execs there wait for it too")
    if not fuse_known:
        return HostSetting(name, None, True, "fanotify-exec", "no FUSE on this host")
    return HostSetting(name, None, False, "fanotify-exec",
                       "not on this kernel (6.0+): a user's FUSE mount in scope (made with "
                       "the setuid fusermount3) refuses fanotify-exec's mark, and execs "
                       "there are not judged; removing fusermount3's setuid bit closes it "
                       "(bpf-lsm, fmod-ret and kill judge them)")


def fuse_timeout(read: Reader) -> HostSetting:
    """A FUSE daemon that never answers holds whoever asked, past SIGKILL; fanotify-exec
    cuts off one in scope that holds the agent, the kernel can bound every request."""
    value = read("fs.fuse.max_request_timeout")
    name = "fs.fuse.max_request_timeout"
    if value is None:
        return HostSetting(name, None, True, "fanotify-exec",
                           "not on this kernel (6.15+): fanotify-exec aborts a FUSE "
                           "filesystem in scope that keeps it waiting (docs/fanotify.md)")
    if _int(value):
        return HostSetting(name, value, True, "fanotify-exec",
                           f"{value} s: the kernel aborts a FUSE connection whose request "
                           "waits longer, for every process")
    return HostSetting(name, value, True, "fanotify-exec",
                       "0: no bound; fanotify-exec aborts a FUSE filesystem in scope that "
                       "keeps it waiting (docs/fanotify.md); a bound protects every other "
                       "process from a stalling FUSE daemon as well")


def _has_filesystem(name: str) -> bool:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return any(line.split()[-1] == name for line in f if line.strip())
    except OSError:
        return False


def _kernel_config(option: str) -> Optional[str]:
    """``option``'s value in this kernel's build config (/proc/config.gz, else /boot)."""
    import gzip
    import os

    texts: List[str] = []
    try:
        with gzip.open("/proc/config.gz", "rt", encoding="ascii", errors="replace") as f:
            texts.append(f.read())
    except OSError:
        try:
            with open(f"/boot/config-{os.uname().release}", encoding="ascii",
                      errors="replace") as f:
                texts.append(f.read())
        except OSError:
            return None
    for line in texts[0].splitlines():
        if line.startswith(option + "="):
            return line.split("=", 1)[1]
    return "n"


def ia32_emulation(cmdline: Optional[str] = None,
                   config: Callable[[str], Optional[str]] = _kernel_config) -> HostSetting:
    """32-bit system calls (int $0x80) from a 64-bit process fire no syscall tracepoint of
    the 64-bit table: the kill backend's mmap check never sees an mmap2 made that way."""
    if cmdline is None:
        try:
            with open("/proc/cmdline", encoding="ascii", errors="replace") as f:
                cmdline = f.read()
        except OSError:
            cmdline = ""
    words = cmdline.split()
    enabled = config("CONFIG_IA32_EMULATION")
    default_off = config("CONFIG_IA32_EMULATION_DEFAULT_DISABLED") == "y"
    if enabled in (None, "n") or "ia32_emulation=0" in words or (
            default_off and "ia32_emulation=1" not in words):
        value = "off" if enabled is not None else None
        return HostSetting("ia32 emulation", value, True, "kill",
                           "no 32-bit system calls: every mmap goes through the 64-bit table")
    return HostSetting("ia32 emulation", "on", False, "kill",
                       "a 64-bit process can mmap through the 32-bit table (int $0x80), "
                       "which the kill backend's syscall tracepoints do not see; booting "
                       "with ia32_emulation=0 (6.7+) closes it (bpf-lsm and fmod-ret judge "
                       "every mapping in the kernel's own hook)")


def read_settings(read: Reader = read_sysctl) -> List[HostSetting]:
    return [memfd_noexec(read), user_namespaces(read), ptrace_scope(read), leases(read),
            ia32_emulation(), fuse_marks(), fuse_timeout(read)]
