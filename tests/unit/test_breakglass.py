"""Break-glass tokens: format, issue, verify, the ledger. Real keys and real signatures."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Dict

import pytest

from agent import signing
from agent.breakglass.token import (
    CLOCK_SKEW_S,
    PAYLOAD_TYPE,
    HostId,
    Ledger,
    Rejected,
    Token,
    canonical,
    claimed_nonce,
    issue,
    load_pinned_keys,
    local_host_id,
    verify,
)
from agent.envelope import Envelope, parse_envelope
from agent.errors import InputError, MalformedInput
from agent.verify.keys import parse_public_key
from agent.verify.model import TrustedKey

HOST = HostId("web-1", "0123456789abcdef0123456789abcdef")
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def key() -> signing.PrivateKey:
    return signing.generate("ecdsa-p256")


def pinned_of(*keys: signing.PrivateKey) -> Dict[str, TrustedKey]:
    out = {}
    for k in keys:
        tk = parse_public_key(signing.public_pem(k.public_key()), "test.pub")
        out[tk.fingerprint] = tk
    return out


def token_bytes(key: signing.PrivateKey, seconds: int = 600, host: HostId = HOST,
                **kw: int) -> bytes:
    return issue(key, host, seconds, "incident 42", now=NOW, **kw)[1].to_bytes()


def reject_code(data: bytes, pinned: Dict[str, TrustedKey], now: float = NOW + 1,
                host: HostId = HOST, **kw: int) -> str:
    with pytest.raises(Rejected) as info:
        verify(data, "token.json", pinned, host, now, **kw)
    return info.value.code


def test_issue_then_verify_round_trip(key: signing.PrivateKey) -> None:
    token, env = issue(key, HOST, 600, "  incident 42 ", now=NOW + 0.7)
    assert env.payload_type == PAYLOAD_TYPE
    assert token.issued_at == token.not_before == int(NOW) and token.not_after == int(NOW) + 600
    assert token.reason == "incident 42" and token.grant == "monitor"
    assert len(token.nonce) == 32 and token.issuer == next(iter(pinned_of(key)))
    # the payload is canonical JSON: sorted keys, no whitespace
    assert env.payload == canonical(json.loads(env.payload))
    assert b" " not in env.payload.replace(b"incident 42", b"")
    got = verify(env.to_bytes(), "t", pinned_of(key), HOST, NOW + 10)
    assert got == token


def test_every_token_has_its_own_nonce(key: signing.PrivateKey) -> None:
    nonces = {issue(key, HOST, 60, "r", now=NOW)[0].nonce for _ in range(20)}
    assert len(nonces) == 20


def test_host_id_text_round_trip_and_bad_forms() -> None:
    assert HostId.parse(HOST.text()) == HOST
    assert HostId.parse("web-1:0123456789ABCDEF0123456789ABCDEF") == HOST  # case folded
    for bad in ("web-1", "web-1:1234", ":0123456789abcdef0123456789abcdef",
                "we b:0123456789abcdef0123456789abcdef"):
        with pytest.raises(MalformedInput, match="--host"):
            HostId.parse(bad)


def test_local_host_id_reads_machine_id(tmp_path: Path) -> None:
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    host = local_host_id(str(mid))
    assert host.machine_id == "0123456789abcdef0123456789abcdef" and host.hostname
    mid.write_text("uninitialized\n")  # systemd's first-boot placeholder: no identity
    with pytest.raises(MalformedInput, match="machine-id"):
        local_host_id(str(mid))
    with pytest.raises(InputError, match="cannot read the machine-id"):
        local_host_id(str(tmp_path / "missing"))


def test_wrong_host_either_half(key: signing.PrivateKey) -> None:
    data = token_bytes(key)
    assert reject_code(data, pinned_of(key), host=HostId("web-2", HOST.machine_id)) == \
        "wrong-host"
    assert reject_code(data, pinned_of(key),
                       host=HostId("web-1", "f" * 32)) == "wrong-host"


def test_wrong_key_no_keys_and_issuer_mismatch(key: signing.PrivateKey) -> None:
    other = signing.generate("ed25519")
    data = token_bytes(key)
    assert reject_code(data, pinned_of(other)) == "untrusted-key"
    assert reject_code(data, {}) == "no-keys"
    # signed by a pinned key, but the payload names another issuer
    token = Token.from_payload(parse_envelope(data, "t", PAYLOAD_TYPE).payload, "t")
    forged = Token(**{**token.__dict__, "issuer": next(iter(pinned_of(other)))})
    env = Envelope(PAYLOAD_TYPE, forged.payload()).signed_by(key)
    assert reject_code(env.to_bytes(), pinned_of(key, other)) == "untrusted-key"


def test_tampered_payload_or_signature(key: signing.PrivateKey) -> None:
    doc = json.loads(token_bytes(key))
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["not_after"] += 3600  # stretch it
    doc["payload"] = base64.b64encode(canonical(payload)).decode()
    assert reject_code(json.dumps(doc).encode(), pinned_of(key)) == "bad-signature"
    doc = json.loads(token_bytes(key))
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[-1] ^= 1
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    assert reject_code(json.dumps(doc).encode(), pinned_of(key)) == "bad-signature"


def test_other_payload_types_never_verify_as_tokens(key: signing.PrivateKey) -> None:
    token, _ = issue(key, HOST, 600, "r", now=NOW)
    for kind in ("application/vnd.execguard.policy-bundle+json;v=1", "text/plain"):
        env = Envelope(kind, token.payload()).signed_by(key)
        assert reject_code(env.to_bytes(), pinned_of(key)) == "malformed"
        # and relabelling it does not help: the signature covers the payloadType
        doc = env.to_json()
        doc["payloadType"] = PAYLOAD_TYPE
        assert reject_code(json.dumps(doc).encode(), pinned_of(key)) == "bad-signature"


def test_malformed_inputs_are_rejected_not_raised(key: signing.PrivateKey) -> None:
    for data in (b"", b"not json", b"[]", b"{}", b"x" * 5000,
                 json.dumps({"payloadType": PAYLOAD_TYPE, "payload": "***"}).encode()):
        assert reject_code(data, pinned_of(key)) == "malformed"


def signed_payload(key: signing.PrivateKey, payload: bytes) -> bytes:
    return Envelope(PAYLOAD_TYPE, payload).signed_by(key).to_bytes()


def test_payload_must_be_strict_and_canonical(key: signing.PrivateKey) -> None:
    good = Token(HOST, "a" * 32, int(NOW), int(NOW), int(NOW) + 60, "r",
                 next(iter(pinned_of(key)))).to_json()
    cases = [
        dict(good, extra=1),  # unknown field
        {k: v for k, v in good.items() if k != "reason"},  # missing field
        dict(good, grant="disable"),  # a grant nobody knows
        dict(good, not_after=good["not_before"]),  # empty window
        dict(good, not_before=good["issued_at"] - 1),  # before it was issued
        dict(good, not_after=float(good["not_after"])),  # not an integer
        dict(good, nonce="A" * 32),
        dict(good, reason=" "),
        dict(good, reason="line\n\x1b[2Jcleared"),  # shown on consoles: printable only
        dict(good, host={"hostname": "web-1"}),
    ]
    pinned = pinned_of(key)
    for doc in cases:
        assert reject_code(signed_payload(key, canonical(doc)), pinned) == "malformed", doc
    # the same fields, not canonical (whitespace; a duplicate key json would swallow)
    pretty = json.dumps(good, indent=1).encode()
    assert reject_code(signed_payload(key, pretty), pinned) == "malformed"
    dup = canonical(good)[:-1] + b',"reason":"r"}'
    assert reject_code(signed_payload(key, dup), pinned) == "malformed"
    assert verify(signed_payload(key, canonical(good)), "t", pinned, HOST, NOW).nonce == "a" * 32


def test_clock_rules(key: signing.PrivateKey) -> None:
    pinned = pinned_of(key)
    data = token_bytes(key, 600)
    assert verify(data, "t", pinned, HOST, NOW + 599).not_after == int(NOW) + 600
    assert reject_code(data, pinned, now=NOW + 600) == "expired"  # not_after is exclusive
    # an issuer clock a little ahead is tolerated at the start, never at the end
    later = issue(key, HOST, 600, "r", now=NOW, not_before=int(NOW) + CLOCK_SKEW_S)[1]
    assert verify(later.to_bytes(), "t", pinned, HOST, NOW).not_before == int(NOW) + CLOCK_SKEW_S
    scheduled = issue(key, HOST, 600, "r", now=NOW, not_before=int(NOW) + 3600)[1]
    assert reject_code(scheduled.to_bytes(), pinned, now=NOW) == "not-yet-valid"
    assert verify(scheduled.to_bytes(), "t", pinned, HOST, NOW + 3600).reason == "r"


def test_duration_cap(key: signing.PrivateKey) -> None:
    day = token_bytes(key, 24 * 3600)
    assert verify(day, "t", pinned_of(key), HOST, NOW + 1).duration == 24 * 3600
    assert reject_code(day, pinned_of(key), max_seconds=3600) == "too-long"
    with pytest.raises(Exception, match="longer than the cap"):
        issue(key, HOST, 24 * 3600 + 1, "r", now=NOW)
    with pytest.raises(Exception, match="at least 1 second"):
        issue(key, HOST, 0, "r", now=NOW)
    with pytest.raises(Exception, match="printable"):
        issue(key, HOST, 60, "two\nlines", now=NOW)


def test_threshold_counts_distinct_pinned_keys(key: signing.PrivateKey) -> None:
    other = signing.generate("ecdsa-p256")
    token, env = issue(key, HOST, 600, "r", now=NOW)
    pinned = pinned_of(key, other)
    assert reject_code(env.to_bytes(), pinned, threshold=2) == "untrusted-key"
    both = env.signed_by(other).to_bytes()
    assert verify(both, "t", pinned, HOST, NOW + 1, threshold=2) == token


def test_load_pinned_keys(tmp_path: Path, key: signing.PrivateKey) -> None:
    assert load_pinned_keys(str(tmp_path / "absent")) == {}
    (tmp_path / "a.pub").write_bytes(signing.public_pem(key.public_key()))
    (tmp_path / "README").write_text("not a key, not read\n")
    assert list(load_pinned_keys(str(tmp_path))) == list(pinned_of(key))
    (tmp_path / "b.pem").write_text("garbage")
    with pytest.raises(MalformedInput, match=r"b\.pem"):
        load_pinned_keys(str(tmp_path))


def test_ledger_spent_nonces_survive_and_torn_tail_is_cut(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path))
    assert ledger.spent() == set() and ledger.open_applies() == []
    ledger.append({"event": "applied", "nonce": "a" * 32})
    ledger.append({"event": "applied", "nonce": "b" * 32})
    ledger.append({"event": "ended", "nonce": "a" * 32, "why": "expired"})
    assert os.stat(ledger.path).st_mode & 0o777 == 0o600
    again = Ledger(str(tmp_path))  # a new agent reads the same file
    assert again.spent() == {"a" * 32, "b" * 32}
    assert [r["nonce"] for r in again.open_applies()] == ["b" * 32]
    with open(ledger.path, "ab") as fh:  # a crash in the middle of an append
        fh.write(b'{"event": "applied", "nonce": "cc')
    assert again.spent() == {"a" * 32, "b" * 32}
    again.append({"event": "ended", "nonce": "b" * 32, "why": "agent-restarted"})
    assert again.open_applies() == [] and len(list(again.records())) == 4


def test_ledger_corruption_fails_closed(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path))
    ledger.append({"event": "applied", "nonce": "a" * 32})
    with open(ledger.path, "ab") as fh:
        fh.write(b"garbage\n")
    with pytest.raises(MalformedInput, match="line 2"):
        ledger.spent()


def test_claimed_nonce(key: signing.PrivateKey) -> None:
    token, env = issue(key, HOST, 60, "r", now=NOW)
    assert claimed_nonce(env.to_bytes()) == token.nonce
    assert claimed_nonce(b"junk") is None
