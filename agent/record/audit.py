"""auditd records: two transports (the libaudit binding, raw netlink) and the writer-thread sink.

Both transports put the same text on the wire: libaudit's ``audit_log_user_message`` appends
``exe= hostname= addr= terminal= res=`` to the body, and the raw path appends the same fields
itself. Before each batch the sink asks the kernel whether auditing is on and an auditd is
registered: with no auditd the kernel would only printk the records (or discard them when
auditing is off), so they are counted as dropped instead of sent.
"""

from __future__ import annotations

import errno
import os
from typing import Any, List, Optional, Protocol

from agent.record.audit_format import AuditMessage
from agent.record.audit_netlink import AuditSendError, AuditStatus, NetlinkAudit
from agent.record.writer import AUDIT_DISABLED, NO_AUDITD, SEND_ERROR, SinkStats

TRANSPORTS = ("auto", "libaudit", "netlink")


class AuditUnavailable(Exception):
    """No transport could be opened (no NETLINK_AUDIT, or the binding is missing)."""


class AuditItem(Protocol):
    """What the audit queue holds: formatted on the writer thread, not the decision path."""

    def message(self) -> AuditMessage: ...


class AuditTransport(Protocol):
    name: str

    def send(self, msg: AuditMessage) -> None:
        """Send one record; raise AuditSendError when the kernel refuses it."""

    def close(self) -> None: ...


class LibauditTransport:
    """The distro's ``audit`` Python binding (python3-audit / python3-audit-libs)."""

    name = "libaudit"

    def __init__(self) -> None:
        try:
            import audit as libaudit  # the SWIG binding: untyped, imports from system site
        except ImportError as exc:
            raise AuditUnavailable(f"the audit Python binding does not import: {exc}") from None
        self._lib: Any = libaudit
        fd = int(libaudit.audit_open())
        if fd < 0:
            raise AuditUnavailable(f"audit_open() failed ({fd})")
        self._fd = fd

    def send(self, msg: AuditMessage) -> None:
        ret = int(self._lib.audit_log_user_message(
            self._fd, msg.type, msg.body, None, None, None, 1 if msg.success else 0))
        # >0: the sequence number. libaudit hides the errno of some refusals (EPERM,
        # ECONNREFUSED) behind 0; the status check before each batch covers auditing off.
        if ret == 0:
            raise AuditSendError(errno.EPERM, "the kernel refused the record (no "
                                 "CAP_AUDIT_WRITE, or not in the initial user namespace)")
        if ret < 0:
            raise AuditSendError(-ret, f"audit_log_user_message: {os.strerror(-ret)}")

    def close(self) -> None:
        self._lib.audit_close(self._fd)


class NetlinkTransport:
    """Raw NETLINK_AUDIT, for hosts without the binding."""

    name = "netlink"

    def __init__(self) -> None:
        try:
            self._nl = NetlinkAudit()
        except OSError as exc:
            raise AuditUnavailable(f"cannot open NETLINK_AUDIT: {exc.strerror}") from None
        try:
            self._exe: Optional[str] = os.readlink("/proc/self/exe")
        except OSError:
            self._exe = None

    def send(self, msg: AuditMessage) -> None:
        self._nl.send_user(msg.type, msg.text(self._exe))

    def close(self) -> None:
        self._nl.close()


def open_transport(prefer: str = "auto") -> AuditTransport:
    """``auto``: the binding where it imports and opens, raw netlink otherwise."""
    if prefer not in TRANSPORTS:
        raise ValueError(f"audit transport must be one of {', '.join(TRANSPORTS)}, not {prefer!r}")
    if prefer in ("auto", "libaudit"):
        try:
            return LibauditTransport()
        except AuditUnavailable:
            if prefer == "libaudit":
                raise
    return NetlinkTransport()


class AuditSink:
    """Writer-thread side: checks that an auditd listens, then sends each record."""

    def __init__(self, transport: AuditTransport) -> None:
        self.transport = transport
        self._status_nl: Optional[NetlinkAudit]
        try:
            self._status_nl = NetlinkAudit(timeout=1.0)
        except OSError:
            self._status_nl = None
        self.last_status: Optional[AuditStatus] = None

    def _status(self) -> Optional[AuditStatus]:
        """The kernel's audit status, or None when it cannot be read (then send anyway)."""
        if self._status_nl is None:
            return None
        try:
            self.last_status = self._status_nl.status()
        except OSError:
            return None
        return self.last_status

    def write_batch(self, items: List[AuditItem], stats: SinkStats) -> None:
        st = self._status()
        if st is not None and st.enabled == 0:
            stats.dropped(AUDIT_DISABLED, len(items), "kernel auditing is off")
            return
        if st is not None and st.pid == 0:
            stats.dropped(NO_AUDITD, len(items), "no auditd is registered with the kernel")
            return
        for item in items:
            try:
                self.transport.send(item.message())
            except AuditSendError as exc:
                stats.dropped(SEND_ERROR, 1, f"{self.transport.name}: {exc.strerror or exc}")
                continue
            stats.wrote()

    def close(self) -> None:
        self.transport.close()
        if self._status_nl is not None:
            self._status_nl.close()
