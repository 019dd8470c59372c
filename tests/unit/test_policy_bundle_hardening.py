"""Hostile and unlucky inputs to the bundle path, with real keys, real signatures, a real state
directory and the agent's own ``BundleManager`` (no agent process: ``initial`` is the code an
agent runs at start, before the recorder exists).

- JSON nested deeper than the parser's recursion limit, and times whose offset puts them
  outside the representable range, are ``malformed`` (a refusal), never an exception that
  stops the agent's start, its main loop (SIGHUP) or the control thread;
- a crash between writing ``current.bundle`` and ``applied.json`` brings the agent back on
  the newer, re-verified bundle, not on the plain policy file;
- drop-directory files are root input: a symlink, a group/world-writable file or another
  user's file is refused, and so is every file of a drop directory others can write to.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

import pytest

from agent.bundle_apply import BundleManager
from agent.daemon import RunOptions, load_snapshot
from agent.envelope import Envelope
from agent.policy.bundle import (
    PAYLOAD_TYPE,
    build_bundle,
    canonical_payload,
    looks_like_bundle,
    parse_expiry,
    parse_time,
)
from agent.policy.bundle_verify import BundleReason, check_bundle, load_pinned
from agent.policy.model import PolicySnapshot
from agent.policy.rollback import AppliedStore, write_atomic
from agent.verify.keys import key_fingerprint
from tests.policy_bundle_fixtures import RootKeys, root_keys, write_policy

NOBODY = 65534
DEEP = b"[" * 100_000 + b"]" * 100_000


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _envelope(payload: bytes, keys: RootKeys, signers: Sequence[str]) -> bytes:
    env = Envelope(PAYLOAD_TYPE, payload)
    for name in signers:
        env = env.signed_by(keys.private[name])
    return env.to_bytes()


def _payload(trusted_root: str = "{}", issued_at: str = "2026-01-01T00:00:00Z",
             expires: str = "2099-01-01T00:00:00Z") -> bytes:
    doc = {"version": 3, "issued_at": issued_at, "expires": expires,
           "policy": {"version": 3, "trust": {"keys": [], "trusted_root": "/r.json"}},
           "trust": {"keys": {}, "trusted_root": {"/r.json": trusted_root}}}
    return json.dumps(doc).encode()


class Host:
    """Pinned 2-of-3 root keys, a plain policy (v1), a drop directory and a state dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = root_keys(tmp / "roots")
        self.scope = tmp / "scope"
        self.scope.mkdir()
        self.release = tmp / "release.pub"
        self.release.write_bytes((self.keys.pinned_dir / "r1.pub").read_bytes())
        self.plain = write_policy(tmp / "plain.toml", 1, self.scope, self.release)
        self.drop = tmp / "drop"
        self.drop.mkdir(mode=0o755)
        self.state = tmp / "state"
        self.opts = RunOptions(policy=str(self.plain), state_dir=str(self.state),
                               log_dir=str(tmp / "log"), policy_keys=str(self.keys.pinned_dir),
                               policy_threshold=2, policy_drop_dir=str(self.drop))

    def bundle(self, version: int, signers: Sequence[str] = ("r1", "r2")) -> bytes:
        policy = write_policy(self.tmp / f"p{version}.toml", version, self.scope, self.release)
        env, _, _ = build_bundle(str(policy), None, _now(), _now() + timedelta(days=30))
        for name in signers:
            env = env.signed_by(self.keys.private[name])
        return env.to_bytes()

    def start(self) -> tuple[BundleManager, PolicySnapshot]:
        manager = BundleManager(self.opts)
        return manager, manager.initial(lambda: load_snapshot(self.opts))


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def _records(manager: BundleManager) -> list[dict[str, object]]:
    return [line for _event, line, _text in manager._early if line is not None]


# -- malformed input is a refusal, never an exception ----------------------------------------
def test_deeply_nested_json_is_malformed_not_an_exception(host: Host) -> None:
    pinned = load_pinned(str(host.keys.pinned_dir))
    envelope = b'{"payloadType": ' + DEEP + b"}"
    assert looks_like_bundle(envelope) is False
    check, snap = check_bundle(envelope, "deep", pinned, 2, _now())
    assert check.reason is BundleReason.MALFORMED and snap is None
    # signed, with the nesting in the embedded trusted root (judged after authentication)
    signed = _envelope(_payload(trusted_root="[" * 100_000), host.keys, ["r1", "r2"])
    check, snap = check_bundle(signed, "deep-root", pinned, 2, _now())
    assert check.reason is BundleReason.MALFORMED and snap is None
    assert "trusted root" in check.detail


@pytest.mark.parametrize("field", ["expires", "issued_at"])
def test_times_out_of_range_are_malformed_signed_or_not(host: Host, field: str) -> None:
    pinned = load_pinned(str(host.keys.pinned_dir))
    edge = {"expires": "9999-12-31T23:59:59-01:00", "issued_at": "0001-01-01T00:00:00+01:00"}
    payload = _payload(**{field: edge[field]})
    for signers in ((), ("r1", "r2")):
        check, snap = check_bundle(_envelope(payload, host.keys, signers), "edge", pinned, 2,
                                   _now())
        json.dumps(check.to_json())  # the record of a refusal must be writable
        want = BundleReason.MALFORMED if signers else BundleReason.THRESHOLD
        assert check.reason is want and snap is None
    with pytest.raises(ValueError):
        parse_time(edge[field])
    with pytest.raises(ValueError):
        parse_expiry("99999999999w", _now())


def test_hostile_drop_dir_files_do_not_stop_the_agent_starting(host: Host) -> None:
    (host.drop / "deep.json").write_bytes(b'{"payloadType": ' + DEEP + b"}")
    (host.drop / "edge.bundle").write_bytes(_envelope(
        _payload(expires="9999-12-31T23:59:59-01:00"), host.keys, ()))
    manager, snap = host.start()
    assert snap.version == 1 and manager.in_force is None  # the plain policy
    reasons = sorted(str(r["reason"]) for r in _records(manager))
    assert reasons == ["malformed", "threshold"]


# -- the applied state survives a crash in the middle of a commit ------------------------------
def test_crash_between_bundle_and_state_write_comes_back_on_the_newer_bundle(host: Host
                                                                             ) -> None:
    (host.drop / "v4.bundle").write_bytes(host.bundle(4))
    manager, snap = host.start()
    assert snap.version == 4 and manager.in_force is not None
    store = AppliedStore(str(host.state))
    applied = store.load()
    assert applied is not None and applied.version == 4
    # the agent died after current.bundle (v5) was renamed in, before applied.json was
    v5 = host.bundle(5)
    write_atomic(store.bundle_path, v5)
    (host.drop / "v4.bundle").unlink()
    manager, snap = host.start()
    assert snap.version == 5, "came back on the plain policy instead of the kept bundle"
    applied = store.load()
    assert applied is not None and applied.version == 5  # the commit is completed
    # an older bundle in the kept place is not a commit in flight: refused, plain policy
    write_atomic(store.bundle_path, host.bundle(4))
    manager, snap = host.start()
    assert snap.version == 1 and manager.in_force is None
    applied = store.load()
    assert applied is not None and applied.version == 5  # the high-water mark stays


# -- the drop directory is root input ---------------------------------------------------------
def _drop_refused(host: Host, name: str) -> None:
    manager, snap = host.start()
    assert snap.version == 1 and manager.in_force is None, f"{name} was applied"
    assert AppliedStore(str(host.state)).load() is None


def test_a_symlink_in_the_drop_dir_is_not_followed(host: Host) -> None:
    elsewhere = host.tmp / "elsewhere.bundle"
    elsewhere.write_bytes(host.bundle(4))
    os.symlink(elsewhere, host.drop / "v4.bundle")
    _drop_refused(host, "a symlink")


def test_a_drop_file_others_can_write_is_refused(host: Host) -> None:
    path = host.drop / "v4.bundle"
    path.write_bytes(host.bundle(4))
    os.chmod(path, 0o666)
    _drop_refused(host, "a world-writable file")
    os.chmod(path, 0o664)
    _drop_refused(host, "a group-writable file")


def test_a_drop_file_owned_by_another_user_is_refused(host: Host) -> None:
    path = host.drop / "v4.bundle"
    path.write_bytes(host.bundle(4))
    os.chmod(path, 0o644)
    os.chown(path, NOBODY, NOBODY)  # the tests run as root (preamble)
    _drop_refused(host, "another user's file")


def test_a_drop_dir_others_can_write_is_ignored(host: Host) -> None:
    (host.drop / "v4.bundle").write_bytes(host.bundle(4))
    os.chmod(host.drop, 0o777)
    _drop_refused(host, "a file in a world-writable drop dir")
    os.chmod(host.drop, 0o755)
    _manager, snap = host.start()  # the same file, once the directory is root's alone
    assert snap.version == 4


def test_canonical_payload_times_are_utc(host: Host) -> None:
    # a payload written with an offset is judged in UTC (expiry compares with UTC "now")
    when = parse_time("2030-01-01T01:00:00+01:00")
    assert when.utcoffset() == timedelta(0) and when.hour == 0
    payload = canonical_payload(1, when, when + timedelta(days=1), {}, {}, {})
    assert b'"issued_at":"2030-01-01T00:00:00Z"' in payload


# -- M distinct keys, and signatures made for something else (sound; kept as regressions) -----
def test_one_key_cannot_pass_for_two(host: Host) -> None:
    from cryptography.hazmat.primitives import serialization

    from agent.breakglass.token import PAYLOAD_TYPE as BREAKGLASS_TYPE
    from agent.envelope import Signature, pae, sign_message

    r1 = host.keys.private["r1"]
    # the same key pinned twice, as PEM and as DER: one pinned key, so 2-of-N is impossible
    solo = host.tmp / "solo"
    solo.mkdir()
    (solo / "a.pub").write_bytes((host.keys.pinned_dir / "r1.pub").read_bytes())
    (solo / "b.pem").write_bytes(r1.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert len(load_pinned(str(solo))) == 1
    pinned = load_pinned(str(host.keys.pinned_dir))
    fp = {n: key_fingerprint(host.keys.private[n].public_key()) for n in ("r1", "r2")}
    assert set(fp.values()) <= set(pinned)
    payload = base64.b64decode(json.loads(host.bundle(4, signers=()))["payload"])
    good = sign_message(r1, pae(PAYLOAD_TYPE, payload))

    def verdict(sigs: list[Signature]) -> BundleReason:
        blob = Envelope(PAYLOAD_TYPE, payload, tuple(sigs)).to_bytes()
        return check_bundle(blob, "b", pinned, 2, _now())[0].reason

    # r1's signature twice, and once more under r2's keyid (keyid only selects a key)
    assert verdict([Signature(fp["r1"], good), Signature(fp["r1"], good)]) is \
        BundleReason.THRESHOLD
    assert verdict([Signature(fp["r1"], good), Signature(fp["r2"], good)]) is \
        BundleReason.BAD_SIGNATURE
    # r2 signing the same payload as a break-glass token, or the bare payload (a blob .sig)
    other_type = sign_message(host.keys.private["r2"], pae(BREAKGLASS_TYPE, payload))
    bare = sign_message(host.keys.private["r2"], payload)
    for sig in (other_type, bare):
        assert verdict([Signature(fp["r1"], good), Signature(fp["r2"], sig)]) is \
            BundleReason.BAD_SIGNATURE
    # a real 2-of-3 envelope relabelled as a break-glass token is not a bundle at all
    relabelled = json.loads(host.bundle(4))
    relabelled["payloadType"] = BREAKGLASS_TYPE
    check, _ = check_bundle(json.dumps(relabelled).encode(), "b", pinned, 2, _now())
    assert check.reason is BundleReason.MALFORMED
