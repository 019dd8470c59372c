"""Real auditd and real tmpfs for the record tests, and Decision builders.

``auditd_running()`` starts auditd with a private config and log directory (``auditd -c``;
no systemd here) unless one is already registered with the kernel, in which case its log is
used and it is left alone. Whatever this module changed (the daemon, the kernel's enabled
flag) is put back in ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import Reason
from agent.verify.model import Evidence, SignatureKind

AUDITD_CONF = """\
local_events = yes
write_logs = yes
log_file = {log}
log_format = ENRICHED
flush = INCREMENTAL_ASYNC
freq = 1
max_log_file = 64
num_logs = 2
max_log_file_action = ROTATE
space_left = 2
space_left_action = IGNORE
admin_space_left = 1
admin_space_left_action = IGNORE
disk_full_action = IGNORE
disk_error_action = IGNORE
name_format = NONE
plugin_dir = {plugins}
end_of_event_timeout = 2
"""


def audit_status() -> Dict[str, int]:
    out = subprocess.run(["auditctl", "-s"], capture_output=True, text=True, check=True).stdout
    status = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            status[parts[0]] = int(parts[1])
    return status


def _log_of(pid: int) -> str:
    """The log file of a running auditd: its -c directory's auditd.conf, or the default."""
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        argv = [a.decode() for a in fh.read().split(b"\0") if a]
    conf_dir = "/etc/audit"
    if "-c" in argv and argv.index("-c") + 1 < len(argv):
        conf_dir = argv[argv.index("-c") + 1]
    with open(os.path.join(conf_dir, "auditd.conf")) as fh:
        for line in fh:
            key, _, value = line.partition("=")
            if key.strip() == "log_file":
                return value.strip()
    return "/var/log/audit/audit.log"


def _is_auditd(pid: int) -> bool:
    """Still our auditd (and not a process that reused its pid)?"""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip() == "auditd"
    except OSError:
        return False


@dataclass
class Auditd:
    log_file: str
    pid: int
    started_here: bool
    conf_dir: Optional[str] = None
    stopped: bool = False
    was_enabled: int = 0
    notes: List[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop this auditd (only ever one this module started) and wait until it is gone."""
        assert self.started_here, "refusing to stop an auditd this test did not start"
        if self.stopped or not _is_auditd(self.pid):
            self.stopped = True
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _is_auditd(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_auditd(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        while audit_status().get("pid", 0) == self.pid and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        self.stopped = True


def _start_auditd(base: str) -> int:
    conf_dir = os.path.join(base, "conf")
    os.makedirs(conf_dir)
    os.makedirs(os.path.join(base, "plugins"))
    conf = os.path.join(conf_dir, "auditd.conf")
    with open(conf, "w") as fh:
        fh.write(AUDITD_CONF.format(log=os.path.join(base, "log", "audit.log"),
                                    plugins=os.path.join(base, "plugins")))
    os.chmod(conf, 0o600)
    os.makedirs(os.path.join(base, "log"), mode=0o700)
    proc = subprocess.run(["auditd", "-c", conf_dir], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"auditd -c {conf_dir} failed ({proc.returncode}): {proc.stderr}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid = audit_status().get("pid", 0)
        if pid:
            return pid
        time.sleep(0.05)
    raise RuntimeError("auditd started but never registered with the kernel")


@contextlib.contextmanager
def auditd_running() -> Iterator[Auditd]:
    """A live auditd with auditing on; started (and later stopped) here if none runs."""
    before = audit_status()
    if before.get("pid", 0) and os.path.exists(f"/proc/{before['pid']}"):
        yield Auditd(_log_of(before["pid"]), before["pid"], started_here=False,
                     was_enabled=before.get("enabled", 0))
        return
    base = tempfile.mkdtemp(prefix="eg-auditd-")
    handle: Optional[Auditd] = None
    try:
        pid = _start_auditd(base)
        handle = Auditd(os.path.join(base, "log", "audit.log"), pid, started_here=True,
                        conf_dir=os.path.join(base, "conf"), was_enabled=before.get("enabled", 0))
        if audit_status().get("enabled", 0) == 0:
            subprocess.run(["auditctl", "-e", "1"], check=True, capture_output=True)
        yield handle
    finally:
        if handle is not None:
            handle.stop()
        if before.get("enabled", 0) != 2 and audit_status().get("enabled") != before.get(
                "enabled", 0):
            subprocess.run(["auditctl", "-e", str(before.get("enabled", 0))],
                           capture_output=True)
        subprocess.run(["rm", "-rf", base], check=False)


def wait_in_log(log_file: str, needle: str, count: int = 1, timeout: float = 15.0) -> None:
    """Wait until ``needle`` occurs ``count`` times in the raw audit log (auditd writes
    asynchronously)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        try:
            with open(log_file, errors="replace") as fh:
                seen = fh.read().count(needle)
        except FileNotFoundError:
            seen = 0
        if seen >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} seen {seen} of {count} times in {log_file}")


def run_tool(*argv: str) -> str:
    """ausearch/aureport output (they exit 1 on 'no matches': that is a failure here)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


@contextlib.contextmanager
def tiny_tmpfs(size: str = "64k") -> Iterator[str]:
    """A tmpfs of ``size`` mounted on a fresh directory; unmounted and removed in finally."""
    where = tempfile.mkdtemp(prefix="eg-tmpfs-")
    mounted = False
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                        "eg-record-test", where], check=True, capture_output=True)
        mounted = True
        yield where
    finally:
        if mounted:
            subprocess.run(["umount", where], check=False, capture_output=True)
            if os.path.ismount(where):
                subprocess.run(["umount", "-l", where], check=False, capture_output=True)
        os.rmdir(where)


def make_decision(n: int = 0, *, allow: bool = False, path: str = "/srv/app/bin/tool",
                  comm: str = "tool", enforcement: Enforcement = Enforcement.FANOTIFY_DENY,
                  full: bool = True, **kw: Any) -> Decision:
    """A Decision with every field set (``full``) so a round trip checks all of them."""
    event = ExecEvent(
        pid=4000 + n, ppid=1000 + n, uid=1000, auid=1001, comm=comm, path=path,
        identity=FileIdentity(dev=os.makedev(254, 1), ino=500 + n, ctime_ns=1_700_000_000_123,
                              size=2_000_000 + n),
        timestamp_ns=1_795_000_000_000_000_000 + n * 1000, backend="fanotify-exec",
    )
    extra: Dict[str, Any] = {}
    if full:
        kw.setdefault("evidence", Evidence(
            SignatureKind.BUNDLE_KEYLESS, path + ".sigstore.json", None,
            "https://github.com/acme/tool/.github/workflows/release.yml@refs/tags/v1",
            "https://token.actions.githubusercontent.com", 123456789, 1_700_000_000,
            "application/vnd.dev.sigstore.bundle.v0.3+json"))
        kw.setdefault("sha256", f"{n:064x}")
        kw.setdefault("rule_id", "go-release")
        kw.setdefault("policy_version", 7)
        kw.setdefault("policy_digest", "sha256:" + "ab" * 32)
        kw.setdefault("go", {"module": "github.com/acme/tool", "version": "v1.2.3",
                             "go": "go1.22.4", "vcs_modified": False})
        kw.setdefault("latency_us", 180 + n)
        extra = {"cache": "miss"}
    return Decision(
        event=event, allow=allow,
        reason=kw.pop("reason", Reason.OK if allow else Reason.NO_SIGNATURE),
        detail=kw.pop("detail", "no signature beside the file or in the store"),
        enforcement=Enforcement.NONE if allow else enforcement,
        source=kw.pop("source", Source.VERIFY), extra=kw.pop("extra", extra), **kw,
    )
