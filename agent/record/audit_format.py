"""The text of execguard's auditd records (docs/records.md): record types and key=value bodies.

The kernel wraps a user record in ``msg='…'`` after its own ``pid= uid= auid= ses=`` of the
sender (the agent), so the exec's subject is carried in the body: ``opid oppid ouid oauid``
(auparse shows ``ouid``/``oauid`` as user names), then ``comm`` and ``exe``, which ausearch's
``-c`` and ``-x`` match (it takes the first of each). Untrusted strings are encoded the way
auditd expects: ``name="value"`` when the value is plain printable ASCII, otherwise the
value's bytes in upper-case hex, which ``ausearch -i`` decodes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from typing import List, Optional, Tuple, Union

from agent.decision import Decision, Enforcement
from agent.errors import Reason
from agent.hostid import record_host

# <linux/audit.h>; user-space types the kernel accepts (1005, 1100-1199, 2100-2999)
AUDIT_USER = 1005
AUDIT_USYS_CONFIG = 1111
AUDIT_SERVICE_START = 1130
AUDIT_SERVICE_STOP = 1131
AUDIT_ANOM_EXEC = 2112

# the kernel keeps at most 8560 bytes of a user message; each string field is capped so the
# whole denial body fits (the decision log always has the full value)
MAX_STRING_BYTES = 1024
# One record is cut by the kernel at 8560 bytes, and path, cmd (the same path, for auparse)
# and libaudit's exe of the agent each take up to 1024 bytes (hex: twice that). The subject's
# exe before the exec gets half of that, the signer (a URL or an email) and the host less.
EXE_STRING_BYTES = 512
SHORT_STRING_BYTES = 160

# enforcements that stopped the exec (res=failed); the others let it run (res=success)
BLOCKING = frozenset({Enforcement.LSM_DENY, Enforcement.FMOD_RET_DENY,
                      Enforcement.FANOTIFY_DENY, Enforcement.POST_EXEC_KILL})

_PLAIN_CODE = re.compile(r"[A-Za-z0-9._:+-]+\Z")
# fields auparse decodes from hex (ausearch -i): free text and file names go in these
ESCAPED_FIELDS = frozenset({"comm", "exe", "path", "cmd", "file", "info"})

Value = Union[str, int, None]


def needs_encoding(raw: bytes) -> bool:
    """auditd's rule (libaudit audit_value_needs_encoding), plus ``'``: the kernel wraps the
    whole body in single quotes, so a quote inside a value would end it early."""
    return any(b == 0x22 or b == 0x27 or b < 0x21 or b > 0x7E for b in raw)


def to_bytes(value: str) -> bytes:
    # paths may carry undecodable bytes as surrogate escapes (os.fsdecode): give them back
    return value.encode("utf-8", "surrogateescape")


def encode_string(name: str, value: Optional[str], limit: int = MAX_STRING_BYTES) -> str:
    """``name="value"`` or ``name=HEX`` for an untrusted string; ``name=?`` when unknown."""
    if value is None:
        return f"{name}=?"
    raw = to_bytes(value)[:limit]
    if needs_encoding(raw) or not raw:
        return f"{name}={raw.hex().upper()}" if raw else f'{name}=""'
    return f'{name}="{raw.decode("ascii")}"'


def encode_code(name: str, value: Value) -> str:
    """A number, enum code or digest: bare when it is a plain token, encoded otherwise."""
    if value is None:
        return f"{name}=?"
    text = str(value)
    if _PLAIN_CODE.match(text):
        return f"{name}={text}"
    return encode_string(name, text)


def dev_text(dev: int) -> str:
    """A st_dev as the kernel's audit records print it: ``major:minor`` in hex."""
    return f"{os.major(dev):02x}:{os.minor(dev):02x}"


@dataclass(frozen=True)
class AuditMessage:
    """One user record: its type, its body (without the trailing res=) and the result."""

    type: int
    body: str
    success: bool

    def text(self, sender_exe: Optional[str]) -> str:
        """The body as libaudit's audit_log_user_message sends it, for the raw path: the
        sender's exe, hostname, addr and terminal, then res=."""
        res = "success" if self.success else "failed"
        return (f"{self.body} {encode_string('exe', sender_exe)} hostname=? addr=? "
                f"terminal=? res={res}")


def denial_message(record_id: str, d: Decision, exe: Optional[str] = None) -> AuditMessage:
    """AUDIT_ANOM_EXEC for a decision that denied (or, unenforced, would deny) an exec.

    ``exe`` is the subject's executable before the exec, when the sensor knew it."""
    ev = d.event
    fields: List[str] = [
        "op=exec-deny",
        encode_code("decision_id", record_id),
        encode_code("opid", ev.pid),
        encode_code("oppid", ev.ppid),
        encode_code("ouid", ev.uid),
        encode_code("oauid", ev.auid),
        encode_string("comm", ev.comm),
        encode_string("exe", exe, EXE_STRING_BYTES),
        encode_string("path", ev.path),
        # auparse's normalizer names the object of an ANOM_EXEC from cmd= (--format text)
        encode_string("cmd", ev.path),
        f"dev={dev_text(ev.identity.dev)}",
        encode_code("inode", ev.identity.ino),
        encode_code("sha256", d.sha256),
        encode_code("reason", d.reason.value),
        encode_code("enforcement", d.enforcement.value),
        encode_code("backend", ev.backend),
        encode_code("rule_id", d.rule_id),
        encode_code("policy_version", d.policy_version),
        encode_string("signer", signer_of(d), SHORT_STRING_BYTES),
        encode_string("host", host_text(), SHORT_STRING_BYTES),
    ]
    return AuditMessage(AUDIT_ANOM_EXEC, " ".join(fields), d.enforcement not in BLOCKING)


# reasons whose evidence names a signer the signature really proves: the signature and its
# chain verified, and the policy or the trust configuration then refused that signer. For
# the others (bad-signature, untrusted-root, tlog-invalid, ...) the identity in the evidence
# is only what an untrusted certificate claims: an attacker's words, left out of the record.
PROVEN_SIGNER = frozenset({Reason.OK, Reason.IDENTITY_MISMATCH, Reason.UNTRUSTED_KEY,
                           Reason.GO_PREDICATE, Reason.POLICY_DENY, Reason.NO_RULE})


def signer_of(d: Decision) -> Optional[str]:
    """Who signed the file, as far as the signature proves it: the keyless identity, else
    the key's fingerprint; None when nothing proves one."""
    ev = d.evidence
    if ev is None or d.reason not in PROVEN_SIGNER:
        return None
    return ev.identity or ev.key_fingerprint


def host_text() -> str:
    """``HOSTNAME:MACHINE-ID`` as ``breakglass host-id`` prints it (``?`` for no id)."""
    host = record_host()
    return f"{host['hostname']}:{host['machine_id'] or '?'}"


@dataclass(frozen=True)
class Denial:
    """A denial waiting in the audit queue; formatted by the writer thread."""

    record_id: str
    decision: Decision
    exe: Optional[str] = None

    def message(self) -> AuditMessage:
        return denial_message(self.record_id, self.decision, self.exe)


class AgentEventKind(str, Enum):
    """Agent events and the audit record type each one uses (a public contract)."""

    START = "start"  # AUDIT_SERVICE_START
    STOP = "stop"  # AUDIT_SERVICE_STOP
    BACKEND = "backend-select"  # AUDIT_USYS_CONFIG
    POLICY_LOAD = "policy-load"  # AUDIT_USYS_CONFIG
    POLICY_BUNDLE = "policy-bundle"  # AUDIT_USYS_CONFIG: a signed bundle applied or refused
    BREAKGLASS_APPLY = "breakglass-apply"  # AUDIT_USYS_CONFIG: monitor mode until not_after
    BREAKGLASS_REJECT = "breakglass-reject"  # AUDIT_USYS_CONFIG, res=failed
    BREAKGLASS_END = "breakglass-end"  # AUDIT_USYS_CONFIG: expired, revoked, superseded...
    AUTHORIZED_STOP = "authorized-stop"  # AUDIT_USYS_CONFIG: a stop token, the agent stops
    STOP_REJECT = "stop-reject"  # AUDIT_USYS_CONFIG, res=failed: a stop refused, it runs on

    @property
    def audit_type(self) -> int:
        return {
            AgentEventKind.START: AUDIT_SERVICE_START,
            AgentEventKind.STOP: AUDIT_SERVICE_STOP,
        }.get(self, AUDIT_USYS_CONFIG)


@dataclass(frozen=True)
class AgentEvent:
    """Agent start/stop, backend choice or policy load. ``fields`` are (name, value) pairs;
    free text belongs in ``info`` and file names in ``file``, which ausearch -i decodes."""

    kind: AgentEventKind
    fields: Tuple[Tuple[str, Value], ...] = ()
    success: bool = True

    def message(self) -> AuditMessage:
        parts = [f"op={self.kind.value}", "unit=execguard"]
        parts += [
            encode_string(name, None if value is None else str(value))
            if name in ESCAPED_FIELDS else encode_code(name, value)
            for name, value in self.fields
        ]
        # which host, as on every denial: collected records from many hosts stay apart
        parts.append(encode_string("host", host_text(), SHORT_STRING_BYTES))
        return AuditMessage(self.kind.audit_type, " ".join(parts), self.success)


def agent_start(version: str, mode: str, pid: int) -> AgentEvent:
    return AgentEvent(AgentEventKind.START,
                      (("version", version), ("policy_mode", mode), ("agent_pid", pid)))


def agent_stop(reason: str) -> AgentEvent:
    return AgentEvent(AgentEventKind.STOP, (("info", reason),))


def backend_selected(backend: str, enforcement: str, why: str, ok: bool = True) -> AgentEvent:
    """The backend the agent chose (or failed to bring up: ``ok=False``) and why."""
    return AgentEvent(AgentEventKind.BACKEND,
                      (("backend", backend), ("enforcement", enforcement), ("info", why)), ok)


def policy_loaded(version: Optional[int], digest: Optional[str], source: str, mode: str,
                  ok: bool = True, why: Optional[str] = None) -> AgentEvent:
    """A policy load; ``ok=False`` with ``why`` when the policy was rejected."""
    return AgentEvent(AgentEventKind.POLICY_LOAD,
                      (("policy_version", version), ("policy_digest", digest),
                       ("file", source), ("policy_mode", mode), ("info", why)), ok)


def policy_bundle(applied: bool, reason: str, old_version: Optional[int],
                  old_digest: Optional[str], new_version: Optional[int],
                  new_digest: Optional[str], source: str, why: str) -> AgentEvent:
    """A signed policy bundle applied (``reason`` ok) or refused, or its expiry coming
    (``expiring``) or past (``expired``, res=failed); digests are the bundle payload's."""
    return AgentEvent(AgentEventKind.POLICY_BUNDLE,
                      (("reason", reason), ("old_version", old_version),
                       ("old_digest", old_digest), ("new_version", new_version),
                       ("new_digest", new_digest), ("file", source), ("info", why)), applied)
