"""The embedded default policy and the ``execguard run`` overrides.

Test strategy summary: the default is loaded from its package data file by the same parser
as any policy, then driven with every kind of subject and every kind of verifier answer
(trusted, each failure reason, an exception): it must never block. Overrides must change
exactly what their flag names, change the digest, and fail clearly on bad values.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable, List

import pytest

from agent.errors import MalformedInput, Reason
from agent.policy import Action, Mode, Subject, apply_overrides, decide, default_policy
from agent.policy.load import DEFAULT_SOURCE, default_policy_bytes, parse_policy
from agent.verify.keys import load_public_key
from agent.verify.model import Evidence, SignatureKind, TrustConfig, Verdict
from tests.policy_fixtures import Material, copy_signed, material_fixture, verifier  # noqa: F401


def test_default_is_package_data_through_the_same_parser() -> None:
    data = default_policy_bytes()
    assert data.startswith(b"# The embedded default policy")
    snap = default_policy()
    assert snap.source == DEFAULT_SOURCE
    assert parse_policy(data, "copy.toml").digest == snap.digest
    # on_timeout is the schema's deny, but monitor mode answers a late decision with allow
    assert (snap.mode, snap.on_timeout, snap.fallthrough) == (Mode.MONITOR, Action.DENY,
                                                             Action.ALLOW)
    assert [(r.rule_id, r.action, r.match.go) for r in snap.rules] == [
        ("go-signed", Action.REQUIRE_SIGNATURE, True), ("not-go", Action.ALLOW, False)]
    assert snap.rules[0].source_line == 23
    assert snap.scope_roots() == ("/",)
    assert snap.trust_digest.startswith("sha256:")
    if not os.path.isdir("/etc/execguard/keys"):
        assert snap.warnings == ("trust.keys[0]: key directory /etc/execguard/keys/ "
                                 "does not exist",)


def _answers() -> List[Callable[[TrustConfig], Verdict]]:
    def trusted(trust: TrustConfig) -> Verdict:
        fp = trust.keys[0].fingerprint if trust.keys else "sha256:" + "0" * 64
        return Verdict.ok(Evidence(SignatureKind.COSIGN_SIG, "s", key_fingerprint=fp), "ok")

    def failing(reason: Reason) -> Callable[[TrustConfig], Verdict]:
        return lambda trust: Verdict.fail(reason, reason.value)

    def raising(trust: TrustConfig) -> Verdict:
        raise OSError("disk on fire")

    return [trusted, raising] + [failing(r) for r in Reason if r is not Reason.OK]


def test_default_never_blocks(material: Material) -> None:
    snap = default_policy()
    infos = [None] + [b.info for b in material.bins.values()]
    paths = ["/", "/usr/bin/ls", "/tmp/x", "/home/u/.local/bin/tool", "/opt/a b/\udcff"]
    subjects = [Subject(p, uid, info is not None or broken, info)
                for p, uid, info, broken in itertools.product(paths, (0, 1000), infos,
                                                              (False, True))]
    count = 0
    for subject, answer in itertools.product(subjects, _answers()):
        outcome = decide(snap, subject, answer)
        assert not outcome.blocks, (subject, outcome)
        count += 1
    assert count > 500
    assert snap.effective_on_timeout is Action.ALLOW
    assert all(r.action is not Action.DENY for r in snap.rules)


def test_default_with_a_real_unsigned_go_binary(material: Material, tmp_path: Path) -> None:
    path = copy_signed(material.bins["app"], tmp_path, None)
    outcome = decide(default_policy(), Subject(str(path), 0, True, material.bins["app"].info),
                     verifier(path))
    # Reported (the verdict is "no"), never blocked: monitor mode.
    assert outcome.rule_id == "go-signed" and not outcome.allow and not outcome.blocks
    assert outcome.reason in (Reason.NO_TRUST_CONFIGURED, Reason.NO_SIGNATURE)


def test_overrides_change_what_they_name(material: Material, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base = default_policy()
    assert apply_overrides(base) is base
    monkeypatch.chdir(tmp_path)
    snap = apply_overrides(base, mode="enforce", scopes=["sub/dir", "/srv/app"],
                           keys=[str(material.keys["a"])], state_dir="/run/eg/state",
                           log_dir="logs")
    assert snap.mode is Mode.ENFORCE and snap.digest != base.digest
    assert [g.pattern for g in snap.scopes] == [str(tmp_path / "sub/dir"), "/srv/app"]
    here = apply_overrides(base, scopes=["."], keys=["keys/"])
    assert [g.pattern for g in here.scopes] == [str(tmp_path)]
    assert here.trust.keys == () and here.warnings == (
        f"trust.keys[0]: key directory {tmp_path}/keys/ does not exist",)
    assert [k.fingerprint for k in snap.trust.keys] == [
        load_public_key(str(material.keys["a"])).fingerprint]
    assert snap.trust_digest != base.trust_digest
    assert (snap.state_dir, snap.log_dir) == ("/run/eg/state", str(tmp_path / "logs"))
    # enforce mode on the default lets every file that is not Go run unsigned: said once
    assert snap.source == base.source and len(snap.warnings) == 1
    assert snap.warnings[0].startswith("line 29: rules[1] (id not-go): enforce mode, but this "
                                       "allow rule lets executables that are not Go run "
                                       "without a signature")
    assert [r.source_line for r in snap.rules] == [r.source_line for r in base.rules]
    assert snap.overrides[0] == "--mode enforce" and len(snap.overrides) == 5
    # The rules' trust follows the new key list too.
    assert snap.rules[0].trust is not None and snap.rules[0].trust.keys == snap.trust.keys
    # Same overrides, same digest.
    again = apply_overrides(base, mode="enforce", scopes=["sub/dir", "/srv/app"],
                            keys=[str(material.keys["a"])], state_dir="/run/eg/state",
                            log_dir="logs")
    assert again.digest == snap.digest
    # The unsigned binary that monitor mode only reported is now blocked in the scope.
    path = copy_signed(material.bins["app"], tmp_path / "sub/dir", None)
    outcome = decide(snap, Subject(str(path), 0, True, material.bins["app"].info),
                     verifier(path))
    assert outcome.blocks and outcome.reason is Reason.NO_SIGNATURE


def test_bad_overrides_fail_clearly(tmp_path: Path) -> None:
    base = default_policy()
    with pytest.raises(MalformedInput, match="--mode: expected 'monitor' or 'enforce'"):
        apply_overrides(base, mode="enforcing")
    with pytest.raises(MalformedInput, match=r"--scope: bad path glob: unterminated"):
        apply_overrides(base, scopes=["/opt/[x"])
    with pytest.raises(MalformedInput, match=r"with --key .*: trust.keys\[0\]: .*No such file"):
        apply_overrides(base, keys=[str(tmp_path / "missing.pub")])
    assert base.mode is Mode.MONITOR  # nothing half-applied


def test_key_override_keeps_rule_pins_honest(material: Material) -> None:
    fp_a = load_public_key(str(material.keys["a"])).fingerprint
    text = (f'version = 1\n[trust]\nkeys = ["{material.keys["a"]}"]\n[[rules]]\nid = "pin"\n'
            f'action = "require-signature"\nsigners = {{ keys = ["{fp_a}"] }}\n')
    snap = parse_policy(text.encode(), "pinned.toml")
    with pytest.raises(MalformedInput, match=r"pinned.toml with --key .*rules\[0\] \(id pin\)"
                                             r".signers.keys\[0\]: key sha256:.* not trusted"):
        apply_overrides(snap, keys=[str(material.keys["b"])])
