"""execguard.service under a real systemd manager (tests/service_fixtures.py says how and why
it is booted in namespaces: this host's PID 1 is not systemd).

One boot for the module; the tests run in order on it: the unit starts and becomes active
only on READY=1, the watchdog is pinged, the agent enforces in a tmpfs the test owns, a
stopped agent and an agent whose decisions are wedged are both restarted by systemd, the BCC
backend loads under the unit's hardening, and a stop is clean. The agent and the unit are
what `make install` put in a temporary root (tests/install_fixtures.py): its venv, its unit
file and its options file, which the tests fill with a scoped enforce policy. The drop-in
changes only what a test must: where the stop token is, WatchdogSec (6 s, to keep the test
short) and where the output goes (there is no journal in the namespace).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from agent.control import ControlError, request
from tests.agent_fixtures import cli, keygen, scoped_tmpfs
from tests.install_fixtures import Installed
from tests.service_fixtures import Systemd, booted_systemd, freeze_thread

pytestmark = [pytest.mark.timeout(240)]

UNIT = "execguard.service"
WATCHDOG_S = 6
# the unit's CapabilityBoundingSet, by capability number (linux/capability.h)
CAPS = {"CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_KILL": 5, "CAP_SYS_PTRACE": 19,
        "CAP_SYS_ADMIN": 21, "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29, "CAP_PERFMON": 38,
        "CAP_BPF": 39}
PROPS = ("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText", "Result")


@dataclass
class Service:
    sd: Systemd
    work: Path
    scope: Path
    private_key: Path
    public_key: Path
    options: Path
    installed: Installed

    @property
    def socket(self) -> str:
        return str(self.work / "state" / "control.sock")

    def ask(self, cmd: str = "status") -> Dict[str, Any]:
        return request(self.socket, cmd, timeout=5)

    def agent_log(self) -> str:
        path = self.work / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def decisions(self) -> List[Dict[str, Any]]:
        path = self.work / "log" / "decisions.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def show(self) -> Dict[str, str]:
        return self.sd.show(UNIT, *PROPS)

    def wait_active(self, timeout: float = 150.0, after_restarts: int = 0) -> Dict[str, str]:
        return self.sd.wait_show(
            UNIT, PROPS, lambda p: p.get("ActiveState") == "active"
            and p.get("SubState") == "running" and int(p.get("NRestarts", "0")) >= after_restarts
            and self._answers(), timeout)

    def _answers(self) -> bool:
        try:
            return self.ask().get("state") in ("ready", "degraded")
        except ControlError:
            return False

    def binary(self, name: str, signed: bool) -> Path:
        """A copy of /usr/bin/true in the scope; signed by the policy's key when asked."""
        path = self.scope / name
        shutil.copy("/usr/bin/true", path)
        path.chmod(0o755)
        if signed:
            der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.private_key),
                                  str(path)], check=True, capture_output=True).stdout
            Path(f"{path}.sig").write_bytes(base64.b64encode(der))
        return path

    def exec_inside(self, path: Path) -> subprocess.CompletedProcess[str]:
        """Exec ``path`` in the manager's mount and pid namespaces: where the agent's marks
        are, and where the agent can name the process."""
        return self.sd.nsenter(str(path), pid_ns=True, timeout=20)

    def use_backend(self, backend: str) -> None:
        write_options(self.options, self.work, backend)

    def host_main_pid(self) -> int:
        return self.sd.host_pid(int(self.show()["MainPID"]))


def write_options(options: Path, work: Path, backend: str) -> None:
    """The EnvironmentFile: the test's policy, state and log directories, its break-glass
    keys, a forced backend (the auto probe would only add time: bpf-lsm cannot load on this
    host's kernel), and where ExecStop finds the agent."""
    options.write_text(
        f'EXECGUARD_OPTS="--policy {work / "policy.toml"} --state-dir {work / "state"} '
        f'--log-dir {work / "log"} --backend {backend} --status-interval 0 '
        f'--breakglass-keys {work / "bg-keys"}"\n'
        f'EXECGUARD_STOP_OPTS="--state-dir {work / "state"}"\n')


def _host_tid(host_pid: int, ns_tid: int) -> int:
    for task in os.listdir(f"/proc/{host_pid}/task"):
        with open(f"/proc/{host_pid}/task/{task}/status") as fh:
            for line in fh:
                if line.startswith("NSpid:") and line.split()[-1] == str(ns_tid):
                    return int(task)
    raise AssertionError(f"thread {ns_tid} not found in process {host_pid}")


@pytest.fixture(scope="module", name="svc")
def svc_fixture(tmp_path_factory: pytest.TempPathFactory, installed: Installed
                ) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("service")
    (work / "state").mkdir()
    (work / "log").mkdir()
    priv, pub = work / "release.pem", work / "release.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(priv)], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)
    with scoped_tmpfs("32m") as scope:  # mounted before the boot: the namespace gets a copy
        (work / "policy.toml").write_text(
            'version = 1\nmode = "enforce"\n'
            f'scopes = ["{scope}"]\nfallthrough = "deny"\non_timeout = "deny"\n'
            f'[trust]\nkeys = ["{pub}"]\n'
            '[[rules]]\nid = "signed"\naction = "require-signature"\n')
        # the installed unit, as `make install` wrote it: its ExecStart, ExecStop and
        # EnvironmentFile name the installed venv and options file; the test changes only
        # the stop token's place, the watchdog period and where the output goes
        options = installed.defaults
        (work / "bg-keys").mkdir()
        keygen(work / "bg-keys" / "ops")
        stop_line = next(line for line in installed.unit.read_text().splitlines()
                         if line.startswith("ExecStop="))
        assert str(installed.execguard) in stop_line, stop_line
        stop_line = stop_line.replace("/run/execguard/stop.token", str(work / "stop.token"))
        dropin = (
            f"[Service]\nExecStop=\n{stop_line}\n"
            f"WatchdogSec={WATCHDOG_S}s\n"
            f"StandardOutput=append:{work / 'agent.log'}\n"
            f"StandardError=append:{work / 'agent.log'}\n")
        write_options(options, work, "fanotify-exec")
        with booted_systemd(dropin, unit=installed.unit) as sd:
            service = Service(sd, work, scope, priv, pub, options, installed)
            try:
                yield service
            finally:
                log = service.agent_log()
                if log:
                    print(f"--- agent log ---\n{log[-4000:]}")
                print(f"--- manager log ---\n{sd.log()[-4000:]}")


def test_unit_is_active_only_after_ready_and_the_watchdog_is_pinged(svc: Service) -> None:
    props = svc.wait_active()
    assert props["NRestarts"] == "0"
    unit = svc.sd.show(UNIT, "Type", "NotifyAccess", "WatchdogUSec", "Restart",
                       "CapabilityBoundingSet", "NoNewPrivileges", "MemoryDenyWriteExecute")
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert unit["WatchdogUSec"] == f"{WATCHDOG_S}s" and unit["Restart"] == "on-failure"
    assert unit["NoNewPrivileges"] == "yes" and unit["MemoryDenyWriteExecute"] == "yes"
    assert "cap_sys_admin" in unit["CapabilityBoundingSet"]
    assert "cap_net_admin" not in unit["CapabilityBoundingSet"]
    # the kernel's view of the running agent: the hardening really applies
    proc = Path(f"/proc/{svc.host_main_pid()}/status").read_text()
    kernel = dict(line.split(":\t", 1) for line in proc.splitlines() if ":\t" in line)
    assert int(kernel["CapBnd"], 16) == sum(1 << n for n in CAPS.values())
    assert kernel["NoNewPrivs"].strip() == "1" and kernel["Seccomp"].strip() == "2"
    status = svc.ask()
    assert status["state"] == "ready" and status["backend"] == "fanotify-exec"
    # READY=1 came with a STATUS= that names the self-tested backend (or the periodic line)
    assert "ready" in props["StatusText"] and "fanotify-exec" in props["StatusText"]

    first = int(svc.sd.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    time.sleep(WATCHDOG_S / 2)
    later = int(svc.sd.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    assert later > first > 0, "systemd saw no WATCHDOG=1 in half an interval"
    service = svc.ask("service")
    assert service["notify"] and service["watchdog_s"] == WATCHDOG_S
    assert service["pinging"] and service["pings"] >= 2
    assert service["probe"]["runs"] >= 2 and service["probe"]["last_ok_age_s"] is not None
    assert [loop["name"] for loop in service["loops"]] == ["fanotify"]


def test_the_service_enforces_in_its_scope(svc: Service) -> None:
    signed, unsigned = svc.binary("signed", True), svc.binary("unsigned", False)
    ran = svc.exec_inside(signed)
    assert ran.returncode == 0, ran.stderr
    refused = svc.exec_inside(unsigned)
    assert refused.returncode == 126 and "Operation not permitted" in refused.stderr
    deadline = time.monotonic() + 15
    by_path: Dict[str, Dict[str, Any]] = {}
    while time.monotonic() < deadline and len(by_path) < 2:
        by_path = {d["event"]["path"]: d for d in svc.decisions()
                   if d["event"]["path"] in (str(signed), str(unsigned))}
        time.sleep(0.1)
    assert by_path[str(signed)]["decision"] == "allow"
    assert by_path[str(signed)]["reason"] == "ok"
    denied = by_path[str(unsigned)]
    assert denied["decision"] == "deny" and denied["reason"] == "no-signature"
    assert denied["enforcement"] == "fanotify-deny"
    assert denied["event"]["pid"] > 0  # the exec ran in the agent's pid namespace


def test_a_stopped_agent_is_restarted(svc: Service) -> None:
    before = svc.show()
    restarts = int(before["NRestarts"])
    os.kill(svc.host_main_pid(), signal.SIGSTOP)
    after = svc.wait_active(after_restarts=restarts + 1, timeout=90)
    assert after["MainPID"] != before["MainPID"]
    # the fanotify responder's own watchdog killed it at the decision deadline (fail-open),
    # and Restart=on-failure brought it back
    assert "fanotify responder" in svc.agent_log()
    assert svc.exec_inside(svc.binary("unsigned-2", False)).returncode == 126


def test_wedged_decisions_stop_the_pings_and_systemd_restarts_the_agent(svc: Service) -> None:
    before = svc.show()
    restarts = int(before["NRestarts"])
    host_pid = svc.host_main_pid()
    probe_tid = svc.ask("service")["probe"]["tid"]
    assert probe_tid, "the probe thread has not run yet"
    # Freeze only the decision probe, as a decision that never returns would: the process,
    # its main loop, its fanotify loop and its control socket all keep running.
    tracer = freeze_thread(_host_tid(host_pid, probe_tid))
    try:
        deadline = time.monotonic() + WATCHDOG_S * 2
        service: Dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(ControlError):
                service = svc.ask("service")
                if not service["pinging"]:
                    break
            time.sleep(0.2)
        assert not service.get("pinging", True), f"still pinging: {service}"
        assert "no synthetic decision finished" in service["why_not"]
        assert svc.ask()["state"] == "ready"  # alive, answering, and yet not healthy
        status = svc.show()["StatusText"]
        assert status.startswith("unhealthy, watchdog not pinged"), status
        after = svc.wait_active(after_restarts=restarts + 1, timeout=90)
    finally:
        tracer.join(timeout=30)
    assert after["MainPID"] != before["MainPID"]
    # SIGABRT is the manager's WatchdogSignal; nothing else here sends it, and faulthandler
    # printed every thread's stack when it came (the manager logs nowhere we can read:
    # as PID 1 without a journal it points its stdio at /dev/null)
    assert svc.sd.show(UNIT, "WatchdogSignal")["WatchdogSignal"] == str(int(signal.SIGABRT))
    log = svc.agent_log()
    assert "not pinging: no synthetic decision" in log
    assert "Fatal Python error: Aborted" in log
    assert svc.exec_inside(svc.binary("unsigned-3", False)).returncode == 126


def _restart_with(svc: Service, backend: str) -> Dict[str, str]:
    """A manual restart with other options (it resets NRestarts): wait for a new MainPID."""
    old = svc.show()["MainPID"]
    svc.use_backend(backend)
    svc.sd.systemctl("restart", UNIT)
    return svc.sd.wait_show(
        UNIT, PROPS, lambda p: p.get("ActiveState") == "active"
        and p.get("SubState") == "running" and p.get("MainPID") not in (old, "0")
        and svc._answers(), 180)


def test_bcc_loads_under_the_hardening_and_a_named_backend_that_cannot_start_fails(
        svc: Service) -> None:
    # kill: a BCC raw tracepoint compiled and loaded in-process, under MemoryDenyWriteExecute,
    # the syscall filter and the capability bounding set
    old = svc.show()["MainPID"]
    svc.use_backend("kill")
    svc.sd.systemctl("restart", UNIT)
    # exit 2, seen in the RestartSec window before systemd tries again
    svc.sd.wait_show(UNIT, (*PROPS, "ExecMainStatus", "ExecMainPID"),
                     lambda p: p.get("ExecMainStatus") == "2" and p.get("ExecMainPID") != old
                     and "--backend kill cannot start here" in svc.agent_log(), 180)
    log = svc.agent_log()
    # BCC compiled, loaded and attached: its self-test got as far as comparing the kernel's
    # record of the canary exec with /proc. It fails there, and only there, because this
    # manager has a pid namespace of its own (the sensor reports the host's pids); on a
    # host whose PID 1 is systemd the two agree (tests/integration/test_bpf_exec*.py).
    failed = next(line for line in log.splitlines() if "--backend kill cannot start" in line)
    assert "identity mismatch" in failed and "ppid" in failed, failed
    # a backend the operator named is that backend or a failed start: no quiet downgrade
    assert "backend audit-only" not in log.split("--backend kill")[-1]


def test_a_degraded_start_says_so(svc: Service) -> None:
    # audit-only, named: READY=1 all the same, with a STATUS= that says it blocks nothing
    props = _restart_with(svc, "audit-only")
    status = svc.ask()
    assert status["state"] == "degraded" and status["backend"] == "audit-only"
    assert props["StatusText"].split(":")[0] in ("degraded", "status")
    assert "degraded" in props["StatusText"]
    service = svc.ask("service")
    assert service["pinging"] and [loop["name"] for loop in service["loops"]] == ["exec-notify"]


def test_a_stop_token_makes_systemctl_stop_an_authorized_stop(svc: Service) -> None:
    """The unit's ExecStop sends /run/execguard/stop.token (here: the test's path) with
    `execguard stop`: the only stop a keep-enforcing bpf-lsm agent accepts. Shown on
    fanotify, where SIGTERM would also work: the record says which stop it was."""
    _restart_with(svc, "fanotify-exec")
    host = svc.sd.nsenter(str(svc.installed.execguard), "breakglass", "host-id", pid_ns=True)
    token = svc.work / "stop.token"
    done = cli("breakglass", "issue", "--host", host.stdout.strip(), "--seconds", "600",
               "--reason", "CHG-1: upgrade", "--key", str(svc.work / "bg-keys" / "ops.key"),
               "--grant", "stop", "-o", str(token))
    assert done.returncode == 0, done.stderr
    try:
        svc.sd.systemctl("stop", UNIT)
        props = svc.sd.wait_show(UNIT, PROPS, lambda p: p.get("ActiveState") == "inactive", 60)
        assert props["Result"] == "success"
        assert "authorized stop" in svc.agent_log().lower(), svc.agent_log()[-2000:]
        spent = [json.loads(line) for line in
                 (svc.work / "state" / "breakglass.jsonl").read_text().splitlines()]
        assert [r["event"] for r in spent][-1:] == ["stop"], spent
    finally:
        token.unlink()


def test_stop_is_clean_and_fails_open(svc: Service) -> None:
    _restart_with(svc, "fanotify-exec")
    assert svc.exec_inside(svc.binary("before-stop", False)).returncode == 126
    svc.sd.systemctl("stop", UNIT)
    props = svc.sd.wait_show(UNIT, PROPS, lambda p: p.get("ActiveState") == "inactive", 60)
    assert props["Result"] == "success"
    assert not os.path.exists(svc.socket)
    assert svc.exec_inside(svc.binary("after-stop", False)).returncode == 0
