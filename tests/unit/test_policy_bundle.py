"""The policy bundle format and the verdict rules, with real keys and real signatures."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from agent import signing
from agent.envelope import Envelope, Signature
from agent.errors import MalformedInput
from agent.policy.build import canonical_text
from agent.policy.bundle import (
    PAYLOAD_TYPE,
    build_bundle,
    bundle_snapshot,
    canonical_payload,
    parse_duration,
    parse_expiry,
    parse_payload,
    parse_time,
)
from agent.policy.bundle_verify import (
    BundleReason,
    check_bundle,
    check_threshold,
    load_pinned,
)
from agent.policy.rollback import AppliedStore
from agent.signing import PrivateKey
from agent.verify.keys import key_fingerprint

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def _pub(path: Path, key: PrivateKey) -> Path:
    path.write_bytes(signing.public_pem(key.public_key()))
    return path


@dataclass(frozen=True)
class World:
    roots: Dict[str, PrivateKey]  # r1..r3 pinned, x not
    pinned: Path
    policy: Path
    release: PrivateKey  # in the policy's key directory
    extra: PrivateKey  # a rule's own signer file
    extra_path: Path
    keydir: Path
    root_json: Path


@pytest.fixture
def world(tmp_path: Path) -> World:
    """Three pinned policy root keys, one stranger, two binary-signing keys and a policy."""
    roots = {n: signing.generate() for n in ("r1", "r2", "r3", "x")}
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    for n in ("r1", "r2", "r3"):
        _pub(pinned / f"{n}.pub", roots[n])
    release, extra = signing.generate(), signing.generate()
    keydir = tmp_path / "keys"
    keydir.mkdir()
    _pub(keydir / "release.pub", release)
    (keydir / "notes.txt").write_text("not a key")
    one = _pub(tmp_path / "extra.pub", extra)
    root_json = tmp_path / "trusted_root.json"
    root_json.write_text('{"mediaType": "application/vnd.dev.sigstore.trustedroot+json"}')
    policy = tmp_path / "p.toml"
    policy.write_text(f"""version = 4
mode = "enforce"
scopes = ["/opt/app"]
[trust]
keys = ["{keydir}/"]
trusted_root = "{root_json}"
[[rules]]
id = "signed"
action = "require-signature"
match = {{ go = true }}
signers = {{ keys = ["{one}"] }}
""")
    return World(roots, pinned, policy, release, extra, one, keydir, root_json)


def bundle_bytes(world: World, signers: Sequence[str], version: Optional[int] = None,
                 lifetime: timedelta = timedelta(days=30)) -> bytes:
    env, _, _ = build_bundle(str(world.policy), version, NOW, NOW + lifetime)
    for name in signers:
        env = env.signed_by(world.roots[name])
    return env.to_bytes()


def verdict(world: World, data: bytes, threshold: int = 2,
            min_version: Optional[int] = None, now: datetime = NOW + timedelta(days=1)
            ) -> Tuple[BundleReason, Dict[str, Any]]:
    pinned = load_pinned(str(world.pinned))
    check, _snap = check_bundle(data, "b.bundle", pinned, threshold, now, min_version)
    return check.reason, check.to_json()


def retampered(data: bytes, old: bytes, new: bytes) -> bytes:
    doc = json.loads(data)
    payload = base64.b64decode(doc["payload"])
    assert old in payload
    doc["payload"] = base64.b64encode(payload.replace(old, new, 1)).decode()
    return json.dumps(doc).encode()


# -- format ----------------------------------------------------------------------------------
def test_payload_is_canonical_and_carries_version_window_policy_and_trust(world: World) -> None:
    env, bundle, snap = build_bundle(str(world.policy), None, NOW, NOW + timedelta(days=30))
    assert env.payload_type == PAYLOAD_TYPE == "application/vnd.execguard.policy-bundle+json;v=1"
    assert env.payload == canonical_text(json.loads(env.payload)).encode()  # sorted, compact
    doc = json.loads(env.payload)
    assert sorted(doc) == ["expires", "issued_at", "policy", "trust", "version"]
    assert doc["version"] == doc["policy"]["version"] == 4  # default: the policy's own
    assert doc["issued_at"] == "2026-11-01T12:00:00Z"
    assert doc["expires"] == "2026-12-01T12:00:00Z"
    keydir, extra = f"{world.keydir}/", str(world.extra_path)
    assert set(doc["trust"]["keys"]) == {keydir, extra}
    assert len(doc["trust"]["keys"][keydir]) == 1  # notes.txt is not a key
    assert json.loads(doc["trust"]["trusted_root"][str(world.root_json)])["mediaType"]
    release = key_fingerprint(world.release.public_key())
    assert set(bundle.fingerprints()) == {release, key_fingerprint(world.extra.public_key())}
    assert {k.fingerprint for k in snap.trust.keys} == {release}
    assert bundle.digest.startswith("sha256:") and snap.version == 4


def test_version_flag_sets_bundle_and_policy_version(world: World) -> None:
    _, bundle, snap = build_bundle(str(world.policy), 9, NOW, NOW + timedelta(days=1))
    assert bundle.version == 9 and bundle.policy["version"] == 9 and snap.version == 9


def test_host_trusts_the_embedded_keys_not_the_files_at_apply_time(world: World) -> None:
    data = bundle_bytes(world, ["r1", "r2"])
    original = key_fingerprint(world.release.public_key())
    # the key directory on this "host" now holds another key, and the trusted root is gone
    _pub(Path(str(world.keydir)) / "release.pub", signing.generate())
    os.unlink(str(world.root_json))
    pinned = load_pinned(str(world.pinned))
    check, snap = check_bundle(data, "b", pinned, 2, NOW)
    assert check.accepted and snap is not None
    assert original in {k.fingerprint for k in snap.trust.keys}
    assert snap.trust.trusted_root is not None and b"trustedroot" in snap.trust.trusted_root


def test_a_policy_path_missing_from_the_bundle_is_malformed(world: World) -> None:
    _, bundle, _ = build_bundle(str(world.policy), None, NOW, NOW + timedelta(days=1))
    keys = dict(bundle.keys)
    keys.pop(str(world.extra_path))
    payload = canonical_payload(bundle.version, bundle.issued_at, bundle.expires,
                                bundle.policy, keys, bundle.roots)
    with pytest.raises(MalformedInput, match="not in the policy bundle"):
        bundle_snapshot(parse_payload(payload, "b"), "b")


@pytest.mark.parametrize("change,problem", [
    (lambda d: d.update(extra=1), "unknown keys"),
    (lambda d: d.pop("expires"), "missing keys"),
    (lambda d: d.update(version="4"), "version must be an integer"),
    (lambda d: d.update(version=5), "differs from the bundle version"),
    (lambda d: d.update(expires="2026-10-01T00:00:00Z"), "not after issued_at"),
    (lambda d: d.update(issued_at="yesterday"), "issued_at"),
    (lambda d: d["policy"].update(mode="lenient"), "mode"),
    (lambda d: d["trust"].update(keys={"/k": "PEM"}), "lists of PEM"),
])
def test_payload_shape_errors_are_malformed(
        world: World, change: Callable[[Dict[str, Any]], object], problem: str) -> None:
    env, _, _ = build_bundle(str(world.policy), None, NOW, NOW + timedelta(days=1))
    doc = json.loads(env.payload)
    change(doc)
    with pytest.raises(MalformedInput, match=problem):
        parse_payload(json.dumps(doc).encode(), "b.bundle")


def test_times_and_durations() -> None:
    assert parse_time("2027-01-31T12:00:00Z") == datetime(2027, 1, 31, 12, tzinfo=timezone.utc)
    assert parse_time("2027-01-31") == datetime(2027, 1, 31, tzinfo=timezone.utc)
    assert parse_expiry("30d", NOW) == NOW + timedelta(days=30)
    assert parse_expiry("2w", NOW) == NOW + timedelta(days=14)
    assert parse_duration("7d") == 7 * 86400 and parse_duration("90") == 90.0
    for bad in ("soon", "30x"):
        with pytest.raises(ValueError):
            parse_expiry(bad, NOW)


# -- verdicts and their order ------------------------------------------------------------------
def test_two_of_three_is_applied(world: World) -> None:
    reason, out = verdict(world, bundle_bytes(world, ["r1", "r3"]))
    assert reason is BundleReason.OK and out["verdict"] == "accept" and out["version"] == 4
    assert len(out["signers"]["valid"]) == 2
    assert str(out["digest"]).startswith("sha256:")


def test_too_few_signatures_is_threshold(world: World) -> None:
    assert verdict(world, bundle_bytes(world, ["r1"]))[0] is BundleReason.THRESHOLD
    assert verdict(world, bundle_bytes(world, []))[0] is BundleReason.THRESHOLD


def test_an_unpinned_key_does_not_count(world: World) -> None:
    reason, out = verdict(world, bundle_bytes(world, ["r1", "x"]))
    assert reason is BundleReason.THRESHOLD
    assert out["signers"]["unknown"] == [
        key_fingerprint(world.roots["x"].public_key())]


def test_one_key_signing_twice_counts_once(world: World) -> None:
    data = bundle_bytes(world, ["r1"])
    doc = json.loads(data)
    doc["signatures"] = doc["signatures"] * 2
    assert verdict(world, json.dumps(doc).encode())[0] is BundleReason.THRESHOLD


def test_tampered_payload_is_bad_signature(world: World) -> None:
    data = retampered(bundle_bytes(world, ["r1", "r2", "r3"]), b'"enforce"', b'"monitor"')
    reason, out = verdict(world, data)
    assert reason is BundleReason.BAD_SIGNATURE and len(out["signers"]["invalid"]) == 3


def test_a_bad_pinned_signature_refuses_even_when_others_meet_the_threshold(world: World) -> None:
    doc = json.loads(bundle_bytes(world, ["r1", "r2", "r3"]))
    doc["signatures"][2]["sig"] = doc["signatures"][0]["sig"]  # r3's entry: r1's bytes
    reason, out = verdict(world, json.dumps(doc).encode())
    assert reason is BundleReason.BAD_SIGNATURE
    assert len(out["signers"]["valid"]) == 2


def test_signed_invalid_policy_is_malformed_unsigned_is_threshold(world: World) -> None:
    payload = canonical_payload(4, NOW, NOW + timedelta(days=1),
                                {"version": 4, "mode": "lenient"}, {}, {})
    env = Envelope(PAYLOAD_TYPE, payload)
    signed = env.signed_by(world.roots["r1"]).signed_by(world.roots["r2"])
    assert verdict(world, signed.to_bytes())[0] is BundleReason.MALFORMED
    assert verdict(world, env.to_bytes())[0] is BundleReason.THRESHOLD


@pytest.mark.parametrize("data", [b"", b"garbage", b"[]", b'{"payloadType": "x"}',
                                  b'{"payloadType": "' + PAYLOAD_TYPE.encode() + b'", '
                                  b'"payload": "%%%"}'])
def test_unparseable_files_are_malformed(world: World, data: bytes) -> None:
    reason, out = verdict(world, data)
    assert reason is BundleReason.MALFORMED and out["verdict"] == "reject"


def test_rollback_and_expiry(world: World) -> None:
    data = bundle_bytes(world, ["r1", "r2"], lifetime=timedelta(days=2))
    assert verdict(world, data, min_version=4)[0] is BundleReason.OK
    assert verdict(world, data, min_version=5)[0] is BundleReason.ROLLBACK
    late = NOW + timedelta(days=3)
    assert verdict(world, data, now=late)[0] is BundleReason.EXPIRED
    # both: rollback wins over expired; a bad signature wins over both
    assert verdict(world, data, min_version=5, now=late)[0] is BundleReason.ROLLBACK
    bad = retampered(data, b'"enforce"', b'"monitor"')
    assert verdict(world, bad, min_version=5, now=late)[0] is BundleReason.BAD_SIGNATURE


def test_impossible_thresholds_are_configuration_errors(world: World) -> None:
    pinned = load_pinned(str(world.pinned))
    assert len(pinned) == 3
    check_threshold(3, pinned, "test")
    for bad in (0, 4):
        with pytest.raises(Exception, match="threshold"):
            check_threshold(bad, pinned, "test")


# -- the applied state -----------------------------------------------------------------------
def test_applied_state_round_trip_and_damage(tmp_path: Path) -> None:
    store = AppliedStore(str(tmp_path))
    assert store.load() is None and store.load_bundle() is None
    store.commit(b"bundle-bytes", 7, "sha256:ab")
    applied = store.load()
    assert applied is not None and (applied.version, applied.digest) == (7, "sha256:ab")
    assert store.load_bundle() == b"bundle-bytes"
    leftovers: List[str] = [n for n in os.listdir(store.directory) if n.endswith(".tmp")]
    assert leftovers == [] and oct(os.stat(store.state_path).st_mode)[-3:] == "600"
    Path(store.state_path).write_text('{"version": "7"}')
    with pytest.raises(MalformedInput, match="damaged"):
        store.load()


def test_signature_dataclass_is_the_envelope_one() -> None:
    # the bundle carries agent.envelope signatures: keyid is the signer's fingerprint
    key = signing.generate()
    env = Envelope(PAYLOAD_TYPE, b"{}").signed_by(key)
    assert isinstance(env.signatures[0], Signature)
    assert env.signatures[0].keyid == key_fingerprint(key.public_key())
