"""The one object the daemon records through: decision log + auditd, each behind its own queue.

``decision()`` and ``agent_event()`` only enqueue: they never block and never raise on a
full queue, a full disk or a dead auditd. Each sink counts what it wrote and what it dropped,
by cause, for ``execguard status``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from agent.decision import Decision
from agent.record.audit import AuditItem, AuditSink, AuditUnavailable, open_transport
from agent.record.audit_format import AgentEvent, Denial
from agent.record.decision_log import LoggedDecision, new_record_id
from agent.record.jsonl import JsonlSink
from agent.record.writer import QueuedWriter

AUDIT_CHOICES = ("auto", "libaudit", "netlink", "off")


@dataclass(frozen=True)
class RecorderConfig:
    log_dir: Optional[str]  # None: no decision log
    audit: str = "auto"  # auto | libaudit | netlink | off
    max_bytes: int = 16 << 20  # rotate the decision log past this size
    keep: int = 5  # rotated decision-log files kept
    queue_size: int = 4096  # per sink


class Recorder:
    """Opens the sinks at construction (a bad log directory is an InputError then, not a
    silent loss later); ``start`` starts the writer threads; ``close`` flushes them."""

    def __init__(self, config: RecorderConfig) -> None:
        if config.audit not in AUDIT_CHOICES:
            raise ValueError(f"audit must be one of {', '.join(AUDIT_CHOICES)}, "
                             f"not {config.audit!r}")
        self.config = config
        self.audit_note: Optional[str] = None  # why there is no audit sink, for status
        self._log: Optional[QueuedWriter[LoggedDecision]] = None
        self._audit: Optional[QueuedWriter[AuditItem]] = None
        self._audit_sink: Optional[AuditSink] = None
        self.audit_transport: Optional[str] = None
        if config.log_dir is not None:
            sink = JsonlSink(config.log_dir, config.max_bytes, config.keep)
            self._log = QueuedWriter("decision-log", sink, config.queue_size)
        if config.audit == "off":
            self.audit_note = "disabled by configuration"
        else:
            try:
                transport = open_transport(config.audit)
            except AuditUnavailable as exc:
                self.audit_note = str(exc)
            else:
                self.audit_transport = transport.name
                self._audit_sink = AuditSink(transport)
                self._audit = QueuedWriter("audit", self._audit_sink, config.queue_size)

    def start(self) -> None:
        for w in (self._log, self._audit):
            if w is not None:
                w.start()

    def decision(self, d: Decision, exe: Optional[str] = None) -> str:
        """Record one decision; returns its id. Denials (enforced or not) also go to auditd.
        ``exe`` overrides ``d.event.exe`` (the subject's executable before the exec)."""
        record_id = new_record_id()
        if self._log is not None:
            self._log.submit(LoggedDecision(record_id, d))
        if self._audit is not None and not d.allow:
            self._audit.submit(Denial(record_id, d, exe if exe is not None else d.event.exe))
        return record_id

    def agent_event(self, event: AgentEvent) -> bool:
        """Agent start/stop, backend choice, policy load (auditd only)."""
        return self._audit.submit(event) if self._audit is not None else False

    def stats(self) -> Dict[str, Any]:
        """Counters per sink for `execguard status`; a sink that is off says why."""
        out: Dict[str, Any] = {}
        if self._log is not None:
            out["decision_log"] = dict(self._log.stats.snapshot(), queued=self._log.pending(),
                                       path=self.config.log_dir)
        else:
            out["decision_log"] = {"enabled": False}
        if self._audit is not None and self._audit_sink is not None:
            out["audit"] = dict(self._audit.stats.snapshot(), queued=self._audit.pending(),
                                transport=self.audit_transport)
            st = self._audit_sink.last_status  # as of the last batch sent
            if st is not None:
                out["audit"].update(auditd_pid=st.pid, kernel_enabled=st.enabled,
                                    kernel_lost=st.lost)
        else:
            out["audit"] = {"enabled": False, "note": self.audit_note}
        return out

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until both queues are empty (records written or dropped); False on timeout."""
        return all(w.wait_idle(timeout) for w in (self._log, self._audit) if w is not None)

    def dropped_total(self) -> int:
        return sum(w.stats.dropped_total() for w in (self._log, self._audit) if w is not None)

    def close(self, timeout: float = 5.0) -> bool:
        """Flush and close both sinks within ``timeout`` each; False if one was stuck."""
        ok = True
        for w in (self._log, self._audit):
            if w is not None:
                ok = w.close(timeout) and ok
        return ok
