"""Raw NETLINK_AUDIT: send a user record and read the audit status, without libaudit.

Used where the ``audit`` binding does not import (CentOS 7 has no Python 3 binding), and for
the status query on every path: whether auditing is on and an auditd is registered. Sending a
user record needs CAP_AUDIT_WRITE, reading the status CAP_AUDIT_CONTROL. Every wait on the
socket has a timeout, so a wedged kernel queue costs the writer thread, never a decision.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterator, Tuple

NETLINK_AUDIT = 9  # not exported by Python's socket module
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
AUDIT_GET = 1000
_HDR = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
_STATUS = struct.Struct("=8I")  # mask, enabled, failure, pid, rate_limit, backlog_limit,
#                                  lost, backlog (the fields every kernel since 2.6 sends)
MAX_PAYLOAD = 8970  # libaudit's MAX_AUDIT_MESSAGE_LENGTH


class AuditSendError(OSError):
    """The kernel refused a record (or did not answer); ``errno`` says why."""


@dataclass(frozen=True)
class AuditStatus:
    enabled: int  # 0 off, 1 on, 2 locked on
    pid: int  # the registered auditd, 0 when none
    lost: int
    backlog: int


class NetlinkAudit:
    """One NETLINK_AUDIT socket; requests are matched to replies by sequence number."""

    def __init__(self, timeout: float = 2.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_AUDIT)
        try:
            self._sock.bind((0, 0))
            self._sock.settimeout(timeout)
        except OSError:
            self._sock.close()
            raise
        self._seq = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def _request(self, msg_type: int, payload: bytes, flags: int) -> int:
        seq = next(self._seq)
        self._sock.send(_HDR.pack(_HDR.size + len(payload), msg_type, flags, seq, 0) + payload)
        return seq

    def _replies(self, seq: int) -> Iterator[Tuple[int, bytes]]:
        """(type, body) of each reply to ``seq``; raises socket.timeout when none comes."""
        while True:
            data = self._sock.recv(65536)
            off = 0
            while off + _HDR.size <= len(data):
                length, rtype, _flags, rseq, _pid = _HDR.unpack_from(data, off)
                if length < _HDR.size:
                    break
                if rseq == seq:
                    yield rtype, data[off + _HDR.size: off + length]
                off += (length + 3) & ~3

    def send_user(self, msg_type: int, text: str) -> None:
        """Send one user record and wait for the kernel's ack."""
        payload = text.encode("ascii", "backslashreplace")[: MAX_PAYLOAD - 1] + b"\0"
        try:
            seq = self._request(msg_type, payload, NLM_F_REQUEST | NLM_F_ACK)
            for rtype, body in self._replies(seq):
                if rtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", body)
                    if err:
                        raise AuditSendError(-err, os.strerror(-err))
                    return
        except socket.timeout:
            raise AuditSendError(errno.ETIMEDOUT, "no ack from the kernel") from None
        except AuditSendError:
            raise
        except OSError as exc:
            raise AuditSendError(exc.errno or errno.EIO, exc.strerror or str(exc)) from None

    def status(self) -> AuditStatus:
        """AUDIT_GET: raises OSError (EPERM without CAP_AUDIT_CONTROL, ETIMEDOUT)."""
        try:
            seq = self._request(AUDIT_GET, b"", NLM_F_REQUEST)
            for rtype, body in self._replies(seq):
                if rtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", body)
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    continue  # a plain ack: the status message is separate
                if rtype == AUDIT_GET and len(body) >= _STATUS.size:
                    _m, enabled, _f, pid, _r, _bl, lost, backlog = _STATUS.unpack_from(body)
                    return AuditStatus(enabled, pid, lost, backlog)
        except socket.timeout:
            raise OSError(errno.ETIMEDOUT, "no audit status from the kernel") from None
        raise OSError(errno.EIO, "no audit status from the kernel")  # pragma: no cover
