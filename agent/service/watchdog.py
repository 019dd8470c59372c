"""execguard under systemd (``Type=notify``): READY=1 once a backend passed its self-test
(STATUS= says ``degraded`` when only audit-only did), STATUS= lines, STOPPING=1, and a
watchdog that pings only while decisions flow (docs/service.md).

A live process is not enough: the agent can be running while the loop that answers exec
events is wedged, or while the decision path (policy store, cache, verifier) hangs. So the
watchdog ping needs two proofs, both fresh:

1. the backend's event loop turned recently (its ``Heartbeat``; ``runner.alive()``, which
   for fanotify also fails when an exec waits on a stuck decide worker), and
2. a synthetic decision, through the same policy store and cache as real execs, on a canary
   file kept in a memfd, finished (a slow one too: one over the policy's decision deadline
   is counted and shown, but a loaded host is slow, not stuck; a restart would fail open
   and make it no faster).

When either fails the pings stop, STATUS= says why, and systemd restarts the agent once
``WatchdogSec`` passes (its SIGABRT makes ``faulthandler`` print every thread's stack to
the journal first). Nothing here is on the exec path: notifications never block, and the
probe runs on its own thread with its own counters.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from agent.backends import CANARIES
from agent.decide import Decider
from agent.decision import Enforcement, ExecEvent, FileIdentity
from agent.policy import PolicySnapshot
from agent.service.heartbeat import Heartbeat
from agent.service.sdnotify import Notifier

if TYPE_CHECKING:
    from agent.daemon import Agent

PROBE_NAME = ".execguard-watchdog-canary"  # never created: the path the policy sees
STATUS_EVERY_S = 10.0
UNSET_AUID = 0xFFFFFFFF


def probe_path(snapshot: PolicySnapshot) -> str:
    """A path inside a scope when one exists, so the probe walks the whole decision (rules,
    Go detection, verification when a rule asks for it), not the out-of-scope shortcut."""
    roots = snapshot.scope_roots() or ("/",)
    for root in roots:
        candidate = os.path.join(root, PROBE_NAME)
        if snapshot.in_scope(candidate):
            return candidate
    return os.path.join(roots[0], PROBE_NAME)


def canary_fd() -> int:
    """A private copy of a small system binary in a memfd: nothing on disk to clean up or to
    be tampered with, and its identity never changes under the probe."""
    fd = os.memfd_create("execguard-watchdog-canary", os.MFD_CLOEXEC)
    src = next((c for c in CANARIES if os.path.isfile(c)), None)
    data = b"#!/bin/true\n"
    if src is not None:
        with open(src, "rb") as fh:
            data = fh.read()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_s: float
    detail: str


class DecisionProbe:
    """Runs a synthetic decision every ``every_s`` on its own thread. A probe that hangs
    stays hung (no new probe starts), so ``last_done_at`` ages and the watchdog notices.
    ``last_ok_at``: the last one within the decision deadline; ``slow``: those over it."""

    def __init__(self, decider: Decider, every_s: float) -> None:
        # same policy store and cache as real execs; own counters, so probes never show up
        # as exec decisions in status or metrics
        self.decider = Decider(decider.store, decider.cache)
        self.every_s = every_s
        self.fd = canary_fd()
        self.started_at = time.monotonic()
        self.last_ok_at: Optional[float] = None
        self.last_done_at: Optional[float] = None  # finished without raising, however slow
        self.last: Optional[ProbeResult] = None
        self.runs = 0
        self.failures = 0
        self.slow = 0
        self.tid: Optional[int] = None  # the probe thread's kernel id, for diagnostics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="watchdog-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            os.close(self.fd)  # a hung probe keeps its fd: the process exits soon anyway

    def _loop(self) -> None:
        self.tid = threading.get_native_id()
        while True:
            try:
                self.run_once()
            except Exception as exc:  # never a dead probe thread: a failure, counted
                self.failures += 1
                self.last = ProbeResult(False, 0.0, f"probe failed: {exc!r}")
            if self._stop.wait(self.every_s):
                return

    def run_once(self) -> ProbeResult:
        snapshot = self.decider.store.current.snapshot
        deadline_s = snapshot.limits.decision_deadline_ms / 1000
        st = os.fstat(self.fd)
        event = ExecEvent(
            pid=os.getpid(), ppid=os.getppid(), uid=0, auid=UNSET_AUID,
            comm="execguard-probe", path=probe_path(snapshot),
            identity=FileIdentity(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size),
            timestamp_ns=time.time_ns(), backend="watchdog-probe")
        started = time.monotonic()
        try:
            decision = self.decider.decide(event, self.fd, Enforcement.NONE)
            outcome = f"{'allow' if decision.allow else 'deny'} ({decision.reason.value})"
        except Exception as exc:  # the decider never raises; if it does, that is the news
            outcome, failed = f"decide raised {type(exc).__name__}: {exc}", True
        else:
            failed = False
        latency = time.monotonic() - started
        ok = not failed and latency <= deadline_s
        if not failed:
            self.last_done_at = time.monotonic()
        if ok:
            self.last_ok_at = self.last_done_at
        elif failed:
            self.failures += 1
        else:
            self.slow += 1
        self.runs += 1
        detail = f"{outcome} in {latency * 1000:.1f} ms (deadline {deadline_s * 1000:.0f} ms)"
        self.last = ProbeResult(ok, latency, detail)
        return self.last

    def check(self, window_s: float, now: float) -> Optional[str]:
        """None when a probe finished within ``window_s`` (over the deadline too: slow is
        not stuck), else why not."""
        since = self.last_done_at if self.last_done_at is not None else self.started_at
        if now - since <= window_s:
            return None
        last = self.last.detail if self.last is not None else "none finished"
        return f"no synthetic decision finished for {now - since:.1f}s (last: {last})"

    def to_json(self) -> Dict[str, Any]:
        return {"runs": self.runs, "failures": self.failures, "slow": self.slow,
                "tid": self.tid,
                "last": self.last.detail if self.last else None,
                "last_ok_age_s": (round(time.monotonic() - self.last_ok_at, 2)
                                  if self.last_ok_at is not None else None),
                "last_done_age_s": (round(time.monotonic() - self.last_done_at, 2)
                                    if self.last_done_at is not None else None)}


def heartbeats(runner: Any) -> List[Heartbeat]:
    """The runner's loop heartbeats, for diagnostics (which thread, how silent)."""
    found: List[Heartbeat] = []
    for holder in (runner, getattr(runner, "_backend", None), getattr(runner, "_notifier", None),
                   getattr(getattr(runner, "_feeder", None), "_backend", None)):
        beat = getattr(holder, "heartbeat", None)
        if isinstance(beat, Heartbeat):
            found.append(beat)
    return found


def workers(runner: Any) -> Optional[Dict[str, Any]]:
    """The fanotify decide workers (their kernel ids, how long decisions have stalled while
    execs wait), else None."""
    backend = getattr(runner, "_backend", None)
    stalled = getattr(backend, "stalled_s", None)
    if stalled is None:
        return None
    return {"tids": list(getattr(backend, "worker_tids", [])), "stalled_s": round(stalled(), 2)}


class ServiceLink:
    """The agent's side of the systemd protocol. Without $NOTIFY_SOCKET it does nothing."""

    def __init__(self, agent: Agent, notifier: Optional[Notifier],
                 problem: Optional[str]) -> None:
        self.agent = agent
        self.notifier = notifier
        self.problem = problem
        self.probe: Optional[DecisionProbe] = None
        self.window_s = 0.0
        self.ping_every_s = 0.0
        self.pings = 0
        self.why_not: Optional[str] = None  # why the last ping was withheld
        self._next_ping = 0.0
        self._next_status = 0.0

    @classmethod
    def from_environ(cls, agent: Agent) -> ServiceLink:
        """Read (and remove) $NOTIFY_SOCKET and $WATCHDOG_USEC, before any child starts."""
        notifier, problem = Notifier.from_environ()
        if notifier is not None:
            notifier.status("starting: loading the policy and self-testing backends")
        return cls(agent, notifier, problem)

    def ready(self) -> None:
        """The backend runs (its self-test passed, or the agent fell back): READY=1."""
        agent = self.agent
        agent.commands["service"] = self.to_json
        if self.problem is not None:
            agent.say(f"WARNING: systemd notifications off: {self.problem}")
        if self.notifier is None:
            return
        self.notifier.ready(self.summary())
        self._next_status = time.monotonic() + STATUS_EVERY_S  # READY's text stays a while
        agent.policy_hooks.append(self._policy_changed)
        agent.tickers.append(self.tick)
        interval = self.notifier.watchdog_s
        if interval is None:
            return
        # ping 4 times per interval; tolerate half an interval of silence before withholding
        self.ping_every_s, self.window_s = interval / 4, interval / 2
        self.probe = DecisionProbe(agent.decider, every_s=min(5.0, max(0.25, interval / 8)))
        self.probe.start()
        faulthandler.enable(all_threads=True)  # systemd's SIGABRT: every stack to the journal
        agent.say(f"systemd watchdog: {interval:g}s; pinging while decisions flow")

    def summary(self) -> str:
        st = self.agent.status_state
        snap = self.agent.decider.store.current.snapshot
        return (f"{st.state}: backend {st.backend} ({st.selftest}); mode {snap.mode.value}; "
                f"scopes {', '.join(snap.scope_roots())}")

    def health(self, now: float) -> Optional[str]:
        """None when both proofs are fresh, else the reason to withhold the ping."""
        alive = getattr(self.agent.runner, "alive", None)
        if alive is not None:
            why = alive(self.window_s)
            if why is not None:
                return str(why)
        if self.probe is not None:
            return self.probe.check(self.window_s, now)
        return None

    def tick(self, now: float) -> None:
        notifier = self.notifier
        if notifier is None:
            return
        if self.probe is not None and now >= self._next_ping:
            self._next_ping = now + self.ping_every_s
            why = self.health(now)
            if why is None:
                if notifier.watchdog():
                    self.pings += 1
                if self.why_not is not None:
                    self.agent.say("systemd watchdog: decisions flow again; pinging")
                    self._next_status = now  # replace the complaint at once
            elif why != self.why_not:
                self.agent.say(f"WARNING: systemd watchdog: not pinging: {why}")
                notifier.status(f"unhealthy, watchdog not pinged: {why}")
            self.why_not = why
        if self.why_not is None and now >= self._next_status:
            self._next_status = now + STATUS_EVERY_S
            notifier.status(self.agent.status_line())

    def _policy_changed(self, snapshot: PolicySnapshot) -> None:
        if self.notifier is not None and self.why_not is None:
            self.notifier.status(f"policy version {snapshot.version} "
                                 f"({snapshot.digest[:19]}) installed; {self.summary()}")

    def stopping(self, why: str) -> None:
        if self.probe is not None:
            self.probe.stop()
        if self.notifier is not None:
            self.notifier.stopping(f"stopping: {why}")
            self.notifier.close()
            self.notifier = None

    def to_json(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """The ``service`` control verb: what systemd is told, and the watchdog's proofs."""
        n = self.notifier
        now = time.monotonic()
        return {
            "notify": n is not None, "problem": self.problem,
            "watchdog_s": n.watchdog_s if n is not None else None,
            "pinging": self.probe is not None and self.why_not is None,
            "why_not": self.why_not, "pings": self.pings,
            "sent": n.sent if n is not None else 0, "send_failures": n.failed if n else 0,
            "probe": self.probe.to_json() if self.probe is not None else None,
            "loops": [{"name": b.name, "tid": b.tid, "silent_s": round(b.silent_for(now), 2)}
                      for b in heartbeats(self.agent.runner)],
            "workers": workers(self.agent.runner),
        }
