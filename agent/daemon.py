"""``execguard run``: load the policy, pick and self-test a backend, decide, record, report.

Start-up order matters: records and the control socket come first (so a failed start is
visible), then the cache, then the backend (its self-test decides ``ready`` vs
``degraded``), then pre-warming. Nothing here is on the exec path except through the
Decider; printing and logging go through bounded queues that drop rather than block.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

from agent import __version__
from agent.backends import PREFERENCE, BackendUnavailable, Runner, start_backend
from agent.cache import TrustedCache, binding_for, default_path
from agent.control import ControlError, ControlServer, socket_path
from agent.decide import Decider
from agent.decision import Decision, Enforcement
from agent.errors import ExecguardError
from agent.fdlimit import raise_fd_limit
from agent.fdlimit import status_section as fd_limit_section
from agent.metrics.config import MetricsConfig, check_config
from agent.metrics.tally import DecisionTally
from agent.policy import Mode, PolicySnapshot, PolicyStore, apply_overrides, default_policy
from agent.policy import load_policy as read_policy
from agent.prewarm import Prewarmer
from agent.record import Recorder, RecorderConfig
from agent.record.audit_format import agent_start, agent_stop, backend_selected, policy_loaded
from agent.service.watchdog import ServiceLink
from agent.writers import ignore_lease_signals

FLUSH_EVERY_S = 30.0


@dataclass(frozen=True)
class RunOptions:
    policy: Optional[str] = None
    mode: Optional[str] = None
    on_agent_exit: Optional[str] = None  # --on-agent-exit: the policy key, from the command line
    scopes: Sequence[str] = ()
    keys: Sequence[str] = ()
    backend: Optional[str] = None
    state_dir: Optional[str] = None
    log_dir: Optional[str] = None
    # the control socket: --socket, else DIR/control.sock for a --state-dir DIR given on the
    # command line, else /run/execguard/control.sock; the client verbs resolve the same flags
    # the same way, so the same flags always find the same agent (agent/control.py)
    socket: Optional[str] = None
    log_max_bytes: int = 16 << 20  # rotate the decision log past this size (docs/records.md)
    log_keep: int = 5  # rotated decision-log files kept
    status_interval: float = 5.0
    quiet: bool = False
    prewarm: bool = True
    audit: str = "auto"
    probe_timeout: Optional[float] = None  # BCC probe budget for --backend auto (None: env/30 s)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # docs/metrics.md
    breakglass_keys: Optional[str] = None  # pinned break-glass keys (docs/breakglass.md)
    breakglass_max_seconds: Optional[int] = None  # longest token accepted (default 24 h)
    # signed policy bundles (docs/bundles.md): pinned root keys, M-of-N, drop dir, warning
    policy_keys: str = "/etc/execguard/keys/policy"
    policy_threshold: int = 1
    policy_drop_dir: str = "/etc/execguard/policy.d"
    policy_expiry_warning: float = 7 * 86400.0  # seconds before expiry that status warns


def load_snapshot(opts: RunOptions) -> PolicySnapshot:
    base = read_policy(opts.policy) if opts.policy else default_policy()
    return apply_overrides(base, mode=opts.mode, scopes=tuple(opts.scopes),
                           keys=tuple(opts.keys), state_dir=opts.state_dir,
                           log_dir=opts.log_dir, on_agent_exit=opts.on_agent_exit)


class Console:
    """One readable line per decision, from a thread of its own: a slow terminal drops lines
    (counted), it never holds up a decision."""

    def __init__(self, out: TextIO, enabled: bool) -> None:
        self.out, self.enabled, self.dropped = out, enabled, 0
        self._q: queue.Queue[Optional[str]] = queue.Queue(maxsize=2048)
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            self._q.put_nowait(text)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            text = self._q.get()
            if text is None:
                return
            try:
                self.out.write(text + "\n")
                self.out.flush()
            except (OSError, ValueError):
                self.dropped += 1

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=2)


def status_line(s: Dict[str, Any]) -> str:
    """The console's periodic line from a ``status`` answer; a value not known yet (no
    decision made, an unversioned policy) is ``-``, never ``None``."""

    def known(value: Any, unit: str = "") -> str:
        return "-" if value is None else f"{value}{unit}"

    dec = s["decisions"]["decisions"]
    lat = s["decisions"]["latency_us"]
    glass = s.get("breakglass") or {}
    extra = f" BREAK-GLASS={glass.get('remaining_s')}s-left" if glass.get("active") else ""
    version = s["policy"]["version"]
    return (f"status: {s['state']} backend={s['backend']} enforcement={s['enforcement']} "
            f"policy={'-' if version is None else f'v{version}'}{extra} "
            f"decisions={sum(dec.values())} deny={dec.get('deny', 0)} "
            f"would-deny={dec.get('would-deny', 0)} cache={known(s['cache'].get('entries'))} "
            f"hit-rate={s['cache'].get('hit_rate') or 0:.2f} p50={known(lat.get('p50'), 'us')} "
            f"p99={known(lat.get('p99'), 'us')} dropped={s['records_dropped']}")


def decision_line(d: Decision) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(d.event.timestamp_ns / 1e9))
    verdict = "ALLOW" if d.allow else ("WOULD-DENY" if d.enforcement in (
        Enforcement.MONITOR, Enforcement.AUDIT_ONLY) else "DENY")
    who = f"pid={d.event.pid} uid={d.event.uid}"
    signer = ""
    if d.evidence is not None and d.allow:
        signer = f" signer={d.evidence.key_fingerprint or d.evidence.identity or '?'}"[:40]
    rule = f" rule={d.rule_id}" if d.rule_id else ""
    return (f"{when} {verdict:<10} {d.enforcement.value:<14} {d.reason.value:<20} {who} "
            f"{d.event.path}{rule}{signer}")


@dataclass
class AgentState:
    state: str = "starting"
    backend: Optional[str] = None
    selftest: Optional[str] = None
    skipped: List[Dict[str, str]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)


class Agent:
    def __init__(self, opts: RunOptions, out: TextIO = sys.stdout) -> None:
        self.opts = opts
        self.out = out
        self.status_state = AgentState()
        # systemd Type=notify (docs/service.md): reads $NOTIFY_SOCKET before any child starts
        self.service = ServiceLink.from_environ(self)
        from agent.bundle_apply import BundleManager

        self.bundles = BundleManager(opts)  # a signed bundle (applied before) wins over a file
        self.snapshot = self.bundles.initial(lambda: load_snapshot(opts))  # raises: no start
        check_config(opts.metrics)  # a bad --metrics-* value: refused before anything starts
        self.console = Console(out, not opts.quiet)
        self.recorder: Optional[Recorder] = None
        self.runner: Optional[Runner] = None
        self.control: Optional[ControlServer] = None
        self.prewarmer: Optional[Prewarmer] = None
        self.decider: Decider  # made in start(), once the cache is loaded
        self._stop = threading.Event()
        # set by request_stop (an authorized stop, docs/breakglass.md): why, and whether the
        # runner releases what outlives the agent (pinned BPF programs, self-protection)
        self._stop_why: Optional[str] = None
        self._stop_release = False
        self._reload = threading.Event()
        self._next_status = self._next_flush = 0.0  # main loop timers (run)
        # control-socket verbs: each feature registers its own (status, policy-apply, ...)
        self.commands: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
            "status": self.status}
        # each adds its section to a status reply (bundle, break-glass, metrics), in order
        self.status_sections: List[Callable[[Dict[str, Any]], None]] = []
        # called from the main loop about every 0.2 s with time.monotonic(); must not block
        self.tickers: List[Callable[[float], None]] = []
        # called after every policy swap with the new effective snapshot (runners re-arm the
        # kernel's view: mode, verdict maps); must not block
        self.policy_hooks: List[Callable[[PolicySnapshot], None]] = []
        # the policy as loaded (file or bundle, CLI overrides applied); ``effective`` derives
        # what the store holds from it (break-glass forces monitor on top of it)
        self.base_snapshot = self.snapshot
        # applied in order by ``effective`` on every install (break-glass: mode = monitor)
        self.overlays: List[Callable[[PolicySnapshot], PolicySnapshot]] = []
        # held by whoever installs a policy, so base_snapshot and the store move together
        self.policy_lock = threading.RLock()
        self.decision_tally = DecisionTally()  # every recorded decision, by label (metrics)
        self.metrics: Any = None  # agent.metrics.service.MetricsService when enabled

    # -- wiring -----------------------------------------------------------------------
    def record(self, d: Decision) -> None:
        assert self.recorder is not None
        self.recorder.decision(d)
        self.decision_tally.add(d)
        self.console.line(decision_line(d))

    def say(self, text: str) -> None:
        self.console.line(f"execguard: {text}")

    def handle(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """One control-socket request: dispatch on ``cmd`` (default ``status``)."""
        cmd = request.get("cmd", "status")
        handler = self.commands.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"error": f"unknown command {cmd!r} (known: {', '.join(sorted(self.commands))})"}
        return handler(request)

    def status(self, request: Dict[str, Any]) -> Dict[str, Any]:
        snap = self.decider.store.current.snapshot
        st = self.status_state
        runner = self.runner
        enforcement = "none"
        if runner is not None:
            enforcement = (Enforcement.MONITOR.value if snap.mode is Mode.MONITOR
                           else runner.enforcement.value)
        out: Dict[str, Any] = {
            "state": st.state, "backend": st.backend, "enforcement": enforcement,
            "mode": snap.mode.value, "pid": os.getpid(), "version": __version__,
            "uptime_s": round(time.time() - st.started_at, 1),
            "policy": {"version": snap.version, "digest": snap.digest, "source": snap.source},
            "selftest": st.selftest, "skipped_backends": st.skipped,
            "state_dir": snap.state_dir, "log_dir": snap.log_dir, "socket": self.socket_path,
            "cache": self.decider.cache.stats().to_json(),
            "decisions": self.decider.stats.to_json(),
            "records": self.recorder.stats() if self.recorder else {},
            "records_dropped": self.recorder.dropped_total() if self.recorder else 0,
            "console_dropped": self.console.dropped,
            "sensor": runner.stats() if runner is not None else {},
            "prewarm": self.prewarmer.stats.to_json() if self.prewarmer else None,
            "warnings": list(st.warnings) + list(snap.warnings),
        }
        for section in self.status_sections:
            section(out)
        return out

    def status_line(self) -> str:
        return status_line(self.status({}))

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        snap = self.snapshot
        for directory, mode in ((snap.state_dir, 0o700), (snap.log_dir, 0o750)):
            os.makedirs(directory, mode=mode, exist_ok=True)
        limit = raise_fd_limit()  # each exec waiting for a decision holds an fd
        self.status_sections.append(fd_limit_section(limit))
        if limit.error is not None:
            self.say(f"WARNING: fd limit stays {limit.soft_at_start}: {limit.error}")
        self.recorder = Recorder(RecorderConfig(snap.log_dir, audit=self.opts.audit,
                                                max_bytes=self.opts.log_max_bytes,
                                                keep=self.opts.log_keep))
        self.recorder.start()
        self.recorder.agent_event(agent_start(__version__, snap.mode.value, os.getpid()))
        self.recorder.agent_event(policy_loaded(snap.version, snap.digest, snap.source,
                                                snap.mode.value))
        cache = TrustedCache(default_path(snap.state_dir),
                             binding_for(snap.verdict_digest, snap.trust_digest))
        report = cache.load()
        self.status_state.warnings.extend(report.warnings)
        for warning in (*snap.warnings, *report.warnings):  # status shows snap's as well
            self.say(f"WARNING: {warning}")
        self.decider = Decider(PolicyStore(snap), cache)
        from agent.breakglass.overlay import register as register_breakglass

        register_breakglass(self)  # its verbs exist before the socket opens
        self.bundles.attach(self)  # policy-apply, the expiry ticker, status.policy_bundle
        self.control = ControlServer(self.socket_path, self.handle)
        self.control.start()
        if self.opts.metrics.enabled:  # before the backend: a slow start is observable too
            from agent.metrics.service import start_metrics  # imports prometheus_client

            self.metrics = start_metrics(self, self.opts.metrics)
        self._start_backend()
        rearm = getattr(self.runner, "policy_changed", None)
        if rearm is not None:  # the kernel's copy of mode and allows follows every swap
            self.policy_hooks.append(rearm)
        if self.opts.prewarm and self.runner is not None:
            # a complete scan lets the BPF backends refuse a mapping of a file without a
            # verdict (docs/threat-model.md, "Beyond execve")
            self.prewarmer = Prewarmer(self.decider, self.runner.remember,
                                       skip=(snap.state_dir, snap.log_dir),
                                       on_scan_done=getattr(self.runner, "prescan_done", None))
            try:
                self.prewarmer.start(snap.scope_roots())
            except OSError as exc:
                self.status_state.warnings.append(f"close-after-write watch unavailable: {exc}")
            # after a swap the kernel maps are empty: verify the scope again
            prewarmer = self.prewarmer
            self.policy_hooks.append(lambda s: prewarmer.rescan(s.scope_roots()))
        self.service.ready()  # last: READY=1 and the watchdog, once a backend runs

    def _start_backend(self) -> None:
        from agent.sensors.probe import choose_backend, run_probes

        requested = self.opts.backend
        if requested and requested != "auto":
            if requested not in PREFERENCE:
                raise ExecguardError(f"--backend {requested}: unknown (one of "
                                     f"{', '.join(PREFERENCE)})")
            first = requested
        else:
            try:
                probes = run_probes(compile=True, timeout=self.opts.probe_timeout)
            except ValueError as exc:  # a malformed $EXECGUARD_PROBE_TIMEOUT
                raise ExecguardError(str(exc)) from exc
            choice = choose_backend(probes)
            first = choice.backend or "audit-only"
            for backend, verdict, why in choice.reasons:
                if verdict == "skipped" and PREFERENCE.index(backend) < PREFERENCE.index(first):
                    self.status_state.skipped.append({"backend": backend, "why": why})

        def skipped(name: str, why: str) -> None:
            self.status_state.skipped.append({"backend": name, "why": why})
            self.say(f"backend {name} skipped: {why}")
            assert self.recorder is not None
            self.recorder.agent_event(backend_selected(name, "none", why, ok=False))

        from agent.backends import tamper
        from agent.breakglass.token import DEFAULT_KEYS_DIR

        # self-protection guards what the agent trusts beyond the policy's own paths, and its
        # control socket (outside the state directory by default): unlinked or chmod'ed, no
        # authorized stop could reach the agent
        tamper.EXTRA_GUARDED[:] = [self.opts.breakglass_keys or DEFAULT_KEYS_DIR,
                                   self.socket_path,
                                   # they sign bundles and, M-of-N, a stop
                                   self.opts.policy_keys]
        # a backend the operator named is a contract: that one or a failed start (exit 2),
        # never a quiet downgrade; auto walks down the preference order instead
        runner, result = start_backend(first, self.decider, self.record, skipped,
                                       only=requested not in (None, "auto"))
        self.runner = runner
        st = self.status_state
        st.backend, st.selftest = runner.name, result.detail
        st.state = "degraded" if runner.name == "audit-only" else "ready"
        assert self.recorder is not None
        self.recorder.agent_event(backend_selected(runner.name, runner.enforcement.value,
                                                   result.detail))
        self.say(f"backend {runner.name} ({result.detail}); mode {self.snapshot.mode.value}; "
                 f"scopes {', '.join(self.snapshot.scope_roots())}; state {st.state}")

    def effective(self, base: PolicySnapshot) -> PolicySnapshot:
        """The snapshot deciders use for ``base``: ``base`` through every overlay."""
        for overlay in self.overlays:
            base = overlay(base)
        return base

    def install_policy(self, base: PolicySnapshot) -> PolicySnapshot:
        """Swap in ``base`` (already validated) atomically, then tell the runners."""
        with self.policy_lock:
            effective = self.effective(base)
            self.decider.store.reload(lambda: effective)
            self.base_snapshot = base
            for hook in self.policy_hooks:
                try:
                    hook(effective)
                except Exception as exc:  # the swap is done; a runner failing to re-arm
                    self.say(f"WARNING: policy hook {getattr(hook, '__qualname__', hook)}: "
                             f"{exc!r}")
                    self.status_state.warnings.append(f"policy hook failed: {exc!r}")
            return effective

    def reload(self) -> None:
        if self.bundles.on_sighup():  # signed bundles govern: the drop directory, no file
            return
        try:
            self.install_policy(load_snapshot(self.opts))
        except ExecguardError as exc:
            self.say(f"policy reload refused, the current policy stays: {exc}")
            assert self.recorder is not None
            snap = self.decider.store.current.snapshot
            self.recorder.agent_event(policy_loaded(None, None, self.opts.policy or "default",
                                                    snap.mode.value, ok=False, why=str(exc)))
            return
        snap = self.decider.store.current.snapshot
        assert self.recorder is not None
        self.recorder.agent_event(policy_loaded(snap.version, snap.digest, snap.source,
                                                snap.mode.value))
        self.say(f"policy reloaded: version {snap.version} digest {snap.digest[:12]}")
        for warning in snap.warnings:
            self.say(f"WARNING: {warning}")

    def request_stop(self, why: str, release: bool) -> None:
        """Ask the main loop to stop (from any thread): ``why`` goes into the stop record;
        ``release`` has the runner remove what would outlive the agent before it stops."""
        self._stop_why = why
        self._stop_release = release
        self._stop.set()

    @property
    def socket_path(self) -> str:
        return self.opts.socket or socket_path(self.opts.state_dir)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, why: str) -> None:
        self.service.stopping(why)  # STOPPING=1 first: systemd waits, not restarts
        if self.prewarmer is not None:
            self.prewarmer.stop()
        if self.runner is not None:
            if self._stop_release:  # only runners that outlive the agent have release()
                release = getattr(self.runner, "release", None)
                if callable(release):
                    try:
                        release()
                    except Exception as exc:  # still stop: the record says what stayed
                        why = f"{why}; release failed: {exc!r}"
                        self.say(f"WARNING: release of {self.runner.name} failed: {exc!r}")
            self.runner.stop()
        if hasattr(self, "decider"):
            self.decider.cache.flush()
        if self.control is not None:
            self.control.close()
        if self.recorder is not None:
            self.recorder.agent_event(agent_stop(why))
            self.recorder.close()
        if self.metrics is not None:  # last: the final textfile has the final counts
            self.metrics.close()
        self.console.close()

    def run(self) -> int:
        ignore_lease_signals()  # before any thread checks a file for writers (agent/writers.py)
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        why = "stopped by signal"
        try:
            self.start()
            self._next_status = time.monotonic() + self.opts.status_interval
            self._next_flush = time.monotonic() + FLUSH_EVERY_S
            while not self._stop.wait(0.2):
                try:
                    self._turn(time.monotonic())
                except Exception as exc:  # last resort (EMFILE, a bug): the agent lives on
                    self.say(f"WARNING: main loop: {exc!r}")
            why = self._stop_why or why
        except (BackendUnavailable, ControlError, ExecguardError, OSError) as exc:
            why = f"failed: {exc}"
            print(f"execguard run: {exc}", file=sys.stderr)
            return 2
        finally:
            self.stop(why)
        return 0

    def _turn(self, now: float) -> None:
        """One turn of the main loop: a reload, the status line, the cache flush, tickers."""
        if self._reload.is_set():
            self._reload.clear()
            try:
                self.reload()
            except Exception as exc:  # a reload bug must not stop enforcement
                self.say(f"WARNING: policy reload failed, the current policy stays: {exc!r}")
                self.status_state.warnings.append(f"policy reload failed: {exc!r}")
        if self.opts.status_interval > 0 and now >= self._next_status:
            self._next_status = now + self.opts.status_interval
            self.console.line(self.status_line())
        if now >= self._next_flush:
            self._next_flush = now + FLUSH_EVERY_S
            self.decider.cache.flush()
        for tick in self.tickers:
            try:
                tick(now)
            except Exception as exc:  # one feature's bug must not stop decisions
                self.say(f"WARNING: {getattr(tick, '__qualname__', tick)}: {exc!r}")
