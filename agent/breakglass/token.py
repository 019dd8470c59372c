"""Break-glass tokens: an offline-signed, single-use, time-boxed "monitor mode" for one host.

A token is a DSSE envelope (``agent.envelope``) whose payloadType is its own, so a policy
bundle or a binary signature never verifies as a token. Its payload is canonical JSON
(sorted keys, no whitespace): the host (hostname AND machine-id), a random nonce, issued_at,
not_before, not_after (UNIX seconds), the reason, the issuer's key id and the grant:
``monitor`` (``breakglass apply``: monitor mode until not_after) or ``stop`` (``execguard
stop``: the agent stops and releases enforcement). ``verify`` checks, in this order, the
envelope, the signatures against the pinned keys, the payload's shape, the grant, the host
and the clock; ``Ledger`` remembers every nonce ever spent, so a token is used once, across
agent restarts. The rules and their reasons are in docs/breakglass.md.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from typing import (
    Any,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
)

from agent.envelope import Envelope, check_signatures, parse_envelope
from agent.errors import ExecguardError, InputError, MalformedInput
from agent.fileio import check_root_owned
from agent.hostid import MACHINE_ID_PATH as MACHINE_ID_PATH
from agent.hostid import HostId as HostId
from agent.hostid import local_host_id as local_host_id
from agent.signing import PrivateKey
from agent.verify.keys import key_fingerprint, load_public_key
from agent.verify.model import TrustedKey

PAYLOAD_TYPE = "application/vnd.execguard.breakglass+json;v=1"
# what a token grants: each verb accepts its own grant only (wrong-grant otherwise)
GRANT_MONITOR = "monitor"  # breakglass apply: monitor mode until not_after
GRANT_STOP = "stop"  # execguard stop: the agent stops and releases enforcement
GRANTS = (GRANT_MONITOR, GRANT_STOP)  # monitor: the default, and all tokens before "stop"
DEFAULT_KEYS_DIR = "/etc/execguard/keys/breakglass"
DEFAULT_MAX_SECONDS = 24 * 3600
DEFAULT_THRESHOLD = 1
# An offline issuer's clock may run ahead of the host's: a not_before up to this far in the
# future is accepted. There is no grace at the other end: not_after is never exceeded.
CLOCK_SKEW_S = 120
LEDGER_NAME = "breakglass.jsonl"
# ledger events that spend a nonce: a monitor token applied, a stop token used
SPENDING_EVENTS = ("applied", "stop")
MAX_TOKEN_BYTES = 3072  # it travels in one control-socket request (4096 bytes)
MAX_REASON = 500
MAX_LEDGER_BYTES = 64 * 1024 * 1024
_NONCE = re.compile(r"[0-9a-f]{32}\Z")
_FIELDS = ("grant", "host", "issued_at", "issuer", "nonce", "not_after", "not_before",
           "reason")


class Rejected(ExecguardError):
    """The token was refused; ``code`` is a stable word for logs and ``--json``."""

    CODES = ("malformed", "no-keys", "untrusted-key", "bad-signature", "wrong-host",
             "not-yet-valid", "expired", "too-long", "replayed", "ledger-error",
             "wrong-grant")

    def __init__(self, code: str, detail: str) -> None:
        assert code in self.CODES, code
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# -- the token ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    host: HostId
    nonce: str
    issued_at: int
    not_before: int
    not_after: int
    reason: str
    issuer: str  # key id (fingerprint) of the signer who issued it
    grant: str = GRANT_MONITOR

    @property
    def duration(self) -> int:
        return self.not_after - self.not_before

    @property
    def token_id(self) -> str:
        """A short name for logs; the nonce is the full, unique identity."""
        return self.nonce[:12]

    def to_json(self) -> Dict[str, Any]:
        return {"grant": self.grant, "host": self.host.to_json(), "issued_at": self.issued_at,
                "issuer": self.issuer, "nonce": self.nonce, "not_after": self.not_after,
                "not_before": self.not_before, "reason": self.reason}

    def payload(self) -> bytes:
        return canonical(self.to_json())

    @classmethod
    def from_payload(cls, data: bytes, source: str) -> Token:
        """Strict: exactly the known fields, canonical bytes (so no duplicate keys or
        alternative spellings of one payload), sane values."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise MalformedInput(source, f"payload is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise MalformedInput(source, "payload is not a JSON object")
        if sorted(doc) != sorted(_FIELDS):
            raise MalformedInput(source, f"payload fields are {sorted(doc)}, expected "
                                 f"{sorted(_FIELDS)}")
        if canonical(doc) != data:
            raise MalformedInput(source, "payload is not in canonical form")
        if doc["grant"] not in GRANTS:
            raise MalformedInput(source, f"grant {doc['grant']!r} is unknown (one of "
                                 f"{', '.join(GRANTS)})")
        host = doc["host"]
        if not isinstance(host, dict) or sorted(host) != ["hostname", "machine_id"]:
            raise MalformedInput(source, "host: expected {hostname, machine_id}")
        times = [doc[k] for k in ("issued_at", "not_before", "not_after")]
        if not all(type(t) is int and 0 < t < 2**40 for t in times):
            raise MalformedInput(source, "issued_at, not_before, not_after: expected "
                                 "positive integer UNIX seconds")
        if not times[0] <= times[1] < times[2]:
            raise MalformedInput(source, "expected issued_at <= not_before < not_after")
        if not isinstance(doc["nonce"], str) or not _NONCE.match(doc["nonce"]):
            raise MalformedInput(source, "nonce: expected 32 lowercase hex digits")
        if not isinstance(doc["reason"], str) or not reason_ok(doc["reason"]):
            raise MalformedInput(source, f"reason: expected 1 to {MAX_REASON} printable "
                                 "characters")
        if not isinstance(doc["issuer"], str) or not doc["issuer"].startswith("sha256:"):
            raise MalformedInput(source, "issuer: expected a key id sha256:<hex>")
        return cls(HostId.checked(host["hostname"], host["machine_id"], source), doc["nonce"],
                   times[0], times[1], times[2], doc["reason"], doc["issuer"], doc["grant"])


def reason_ok(reason: str) -> bool:
    """Printable (no newline or terminal control: it is shown on consoles and in logs)."""
    return bool(reason.strip()) and len(reason) <= MAX_REASON and reason.isprintable()


def canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def issue(key: Union[PrivateKey, Sequence[PrivateKey]], host: HostId, seconds: int,
          reason: str, *, not_before: Optional[int] = None, now: Optional[float] = None,
          max_seconds: int = DEFAULT_MAX_SECONDS,
          grant: str = GRANT_MONITOR) -> Tuple[Token, Envelope]:
    """Sign a token granting ``grant`` on ``host``, valid ``seconds`` from ``not_before``
    (default: now), with ``key`` or each of several keys (M-of-N: a stop token signed by
    policy root keys); the first is the issuer."""
    keys: List[PrivateKey] = list(key) if isinstance(key, (list, tuple)) else [
        cast(PrivateKey, key)]
    if not keys:
        raise ExecguardError("a token needs at least one signing key")
    issued = int(time.time() if now is None else now)
    start = issued if not_before is None else int(not_before)
    reason = reason.strip()
    if seconds < 1:
        raise ExecguardError("the duration must be at least 1 second")
    if seconds > max_seconds:
        raise ExecguardError(f"{seconds} s is longer than the cap of {max_seconds} s "
                             f"({max_seconds / 3600:g} h); agents refuse such tokens")
    if start < issued:
        raise ExecguardError("not_before is in the past")
    if not reason_ok(reason):
        raise ExecguardError(f"the reason must be 1 to {MAX_REASON} printable characters "
                             "on one line")
    if grant not in GRANTS:
        raise ExecguardError(f"grant {grant!r} is unknown (one of {', '.join(GRANTS)})")
    token = Token(host, secrets.token_hex(16), issued, start, start + seconds, reason,
                  key_fingerprint(keys[0].public_key()), grant)
    env = Envelope(PAYLOAD_TYPE, token.payload())
    for one in keys:
        env = env.signed_by(one)
    return token, env


# -- verification -------------------------------------------------------------------------

def load_pinned_keys(directory: str) -> Dict[str, TrustedKey]:
    """Every ``*.pub`` / ``*.pem`` in ``directory``; a bad key file is an error, not a skip
    (an operator who pinned a key wants to hear that it does not load)."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InputError(directory, exc.strerror or str(exc)) from None
    keys: Dict[str, TrustedKey] = {}
    for name in names:
        if name.endswith((".pub", ".pem")):
            key = load_public_key(os.path.join(directory, name))
            keys[key.fingerprint] = key
    return keys


def verify(data: bytes, source: str, pinned: Mapping[str, TrustedKey], host: HostId,
           now: float, max_seconds: int = DEFAULT_MAX_SECONDS,
           threshold: int = DEFAULT_THRESHOLD, grant: str = GRANT_MONITOR,
           keys_name: str = "break-glass") -> Token:
    """The token in ``data`` if it grants ``grant`` and may be used on ``host`` at ``now``;
    else Rejected. (Single use is the ledger's part.) ``keys_name`` names ``pinned`` in
    messages: break-glass keys, or the policy root keys a stop may be signed by."""
    if len(data) > MAX_TOKEN_BYTES:
        raise Rejected("malformed", f"{source}: {len(data)} bytes, a token is at most "
                       f"{MAX_TOKEN_BYTES}")
    try:
        env = parse_envelope(data, source, PAYLOAD_TYPE)
    except MalformedInput as exc:
        raise Rejected("malformed", str(exc)) from None
    if not pinned:
        raise Rejected("no-keys", f"no {keys_name} key is pinned on this host")
    report = check_signatures(env, pinned)
    if not report.meets(threshold):
        if report.invalid:
            raise Rejected("bad-signature", f"{source}: the signature by "
                           f"{', '.join(report.invalid)} does not verify (tampered?)")
        named = ", ".join(report.unknown) or "no other key"
        raise Rejected("untrusted-key", f"{source}: signed by {len(report.valid)} pinned "
                       f"{keys_name} key(s) and by {named}; {threshold} signature(s) by pinned "
                       f"{keys_name} keys needed")
    try:
        token = Token.from_payload(env.payload, source)
    except MalformedInput as exc:
        raise Rejected("malformed", str(exc)) from None
    if token.issuer not in report.valid:
        raise Rejected("untrusted-key", f"{source}: names issuer {token.issuer}, which did "
                       "not sign it")
    if token.grant != grant:
        raise Rejected("wrong-grant", f"{source}: token {token.token_id} grants "
                       f"{token.grant!r}, this needs a {grant!r} token ({_USE[token.grant]})")
    if token.host != host:
        raise Rejected("wrong-host", f"issued for {token.host.text()}, this host is "
                       f"{host.text()}")
    if token.duration > max_seconds:
        raise Rejected("too-long", f"valid for {token.duration} s; this host allows at most "
                       f"{max_seconds} s")
    if now >= token.not_after:
        raise Rejected("expired", f"expired {_ago(now - token.not_after)} ago "
                       f"(not_after {iso(token.not_after)})")
    if now < token.not_before - CLOCK_SKEW_S:
        raise Rejected("not-yet-valid", f"valid from {iso(token.not_before)}, in "
                       f"{_ago(token.not_before - now)} (allowed clock skew "
                       f"{CLOCK_SKEW_S} s)")
    return token


_USE = {GRANT_MONITOR: "a monitor token is for 'execguard breakglass apply'",
        GRANT_STOP: "a stop token is for 'execguard stop'"}


@dataclass(frozen=True)
class Authority:
    """Who authorized a token, for its records: which pinned keys (``breakglass`` or
    ``policy``), how many of them were needed and pinned, and the signers among them."""

    keys: str
    threshold: int
    pinned: int
    signers: Tuple[str, ...]

    @classmethod
    def of(cls, keys: str, data: bytes, pinned: Mapping[str, TrustedKey],
           threshold: int) -> Authority:
        """Of a token ``data`` that verified against ``pinned``."""
        env = parse_envelope(data, "token", PAYLOAD_TYPE)
        return cls(keys, threshold, len(pinned),
                   tuple(sorted(check_signatures(env, pinned).valid)))

    def to_json(self) -> Dict[str, Any]:
        return {"keys": self.keys, "threshold": self.threshold, "pinned": self.pinned,
                "signers": list(self.signers)}

    def fields(self) -> Tuple[Tuple[str, str], ...]:
        """Audit fields: no spaces (auditd would hex-encode the value)."""
        return (("authority", f"{self.keys}-keys"),
                ("threshold", f"{self.threshold}-of-{self.pinned}"),
                ("signers", ",".join(self.signers)))


def claimed_nonce(data: bytes) -> Optional[str]:
    """The nonce a token claims, unverified: for the record of a rejected token only."""
    try:
        env = parse_envelope(data[:MAX_TOKEN_BYTES], "token", PAYLOAD_TYPE)
        nonce = json.loads(env.payload).get("nonce")
    except (ExecguardError, ValueError, AttributeError, RecursionError):
        return None
    return nonce if isinstance(nonce, str) and _NONCE.match(nonce) else None


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# -- the ledger ---------------------------------------------------------------------------

class Ledger:
    """``<state_dir>/breakglass.jsonl``: one JSON object per line, appended and fsync'ed.

    Events: ``applied`` (a monitor token: the nonce is spent from here on), ``ended`` (why:
    expired, revoked, superseded, agent restarted), ``stop`` (a stop token: spent, the agent
    stops) and ``rejected``. The file is the agent's own
    record of break-glass and the replay guard: it is never pruned. A torn last line (a
    crash while appending) is ignored, since the apply it belonged to never took effect;
    any other bad line makes every apply fail (fail closed: spent nonces are unknown).
    """

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, LEDGER_NAME)

    def records(self) -> Iterator[Dict[str, Any]]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise InputError(self.path, exc.strerror or str(exc)) from None
        with os.fdopen(fd, "rb") as fh:
            _check_owner(self.path, os.fstat(fh.fileno()))
            data = fh.read(MAX_LEDGER_BYTES + 1)
        if len(data) > MAX_LEDGER_BYTES:
            raise MalformedInput(self.path, f"larger than {MAX_LEDGER_BYTES} bytes")
        # after the last newline: b"" unless an append was cut short (``append`` repairs it)
        for number, line in enumerate(data.split(b"\n")[:-1], 1):
            try:
                rec = json.loads(line)
            except (ValueError, UnicodeDecodeError, RecursionError):
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
                raise MalformedInput(self.path, f"line {number} is not a ledger record")
            yield rec

    def spent(self) -> Set[str]:
        return {str(r.get("nonce")) for r in self.records()
                if r["event"] in SPENDING_EVENTS}

    def open_applies(self) -> List[Dict[str, Any]]:
        """``applied`` records with no ``ended`` after them (the agent stopped or died)."""
        active: Dict[str, Dict[str, Any]] = {}
        for rec in self.records():
            nonce = str(rec.get("nonce"))
            if rec["event"] == "applied":
                active[nonce] = rec
            elif rec["event"] == "ended":
                active.pop(nonce, None)
        return list(active.values())

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(dict(record), sort_keys=True, ensure_ascii=False) + "\n"
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC |
                     os.O_NOFOLLOW, 0o600)
        try:
            _check_owner(self.path, os.fstat(fd))
            _cut_torn_tail(fd)
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new name itself must survive a crash
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _check_owner(path: str, st: os.stat_result) -> None:
    """Whoever may write the ledger may erase an ``applied`` line and replay its token: only
    a regular file of the agent's own, writable by it alone, is trusted (fail closed)."""
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, "is not a regular file")
    check_root_owned(path, st)


def _cut_torn_tail(fd: int) -> None:
    """Drop a partial last line, so the next record does not glue onto it."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - MAX_LEDGER_BYTES)
    head = os.pread(fd, size - start, start)
    os.ftruncate(fd, start + head.rfind(b"\n") + 1)
