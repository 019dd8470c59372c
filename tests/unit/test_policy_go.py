"""Go predicates against real build info (binaries built here with /usr/bin/go and read with
``agent.goinfo``), plus hand-built ``BuildInfo`` for the edges Go 1.19 cannot produce.

Test strategy summary: each predicate passes on a binary that satisfies it and raises
``PolicyViolation`` with the stable reason on one that does not; combinators fail closed
when empty; version orderings follow Go's and semver's rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest

from agent.errors import MalformedInput, Reason
from agent.goinfo import BuildInfo, Module, parse_bytes
from agent.policy import parse_policy
from agent.policy.globs import Glob
from agent.policy.model import ModulePin, PolicyViolation, SignerSpec, Subject
from agent.policy.predicates import (
    AllOf,
    AnyOf,
    DenyModules,
    DenyVcsModified,
    MinGoVersion,
    ModuleBan,
    RequireTrimpath,
    SignerForModule,
    parse_go_version,
    parse_semver,
)
from agent.verify.keys import load_public_key
from agent.verify.model import Evidence, IdentityRule, SignatureKind
from tests.goinfo_fixtures import GO, _go_env, run
from tests.policy_fixtures import Material, material_fixture  # noqa: F401


def subj(info: Optional[BuildInfo], evidence: Optional[Evidence] = None) -> Subject:
    return Subject("/opt/app/bin", 0, True, info, evidence)


def violation(pred: object, subject: Subject) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as exc:
        pred.check(subject)  # type: ignore[attr-defined]
    return exc.value


def test_real_binaries_have_what_the_tests_assume(material: Material) -> None:
    app, dirty, tool = (material.bins[n].info for n in ("app", "app-dirty", "tool"))
    assert app.go_version.startswith("go1.19")
    assert app.setting("vcs.modified") == "false" and dirty.setting("vcs.modified") == "true"
    assert app.main is not None and app.main.path == "example.com/app"
    dep = [d for d in tool.deps if d.path == "example.com/lib"]
    assert dep and dep[0].version == "v0.3.1" and dep[0].replace is not None


def test_min_go_version(material: Material) -> None:
    app = subj(material.bins["app"].info)  # go1.19.x
    for ok in ("1.19", "go1.19", "1.18.10", "go1.19rc1", "1"):
        MinGoVersion(ok).check(app)
    for too_new in ("1.20", "go1.19.99", "2"):
        v = violation(MinGoVersion(too_new), app)
        assert v.reason is Reason.GO_PREDICATE and "older than" in v.detail


def test_deny_vcs_modified(material: Material) -> None:
    DenyVcsModified().check(subj(material.bins["app"].info))
    v = violation(DenyVcsModified(), subj(material.bins["app-dirty"].info))
    assert v.reason is Reason.GO_PREDICATE and "vcs.modified=true" in v.detail
    DenyVcsModified().check(subj(material.bins["tool"].info))  # no VCS info: not "modified"


def test_deny_modules(material: Material) -> None:
    tool = subj(material.bins["tool"].info)
    for ban in (ModuleBan("example.com/lib", frozenset({"v0.3.1"})),
                ModuleBan("example.com/lib", below="v0.4.0"),
                ModuleBan("example.com/lib", below="v0.3.2-rc.1")):
        v = violation(DenyModules((ban,)), tool)
        assert v.reason is Reason.GO_PREDICATE and "example.com/lib@v0.3.1" in v.detail
    for ban in (ModuleBan("example.com/lib", frozenset({"v0.3.0"})),
                ModuleBan("example.com/lib", below="v0.3.1"),
                ModuleBan("example.com/lib", below="v0.3.1-rc.1"),
                ModuleBan("example.com/other", below="v9.0.0")):
        DenyModules((ban,)).check(tool)
    # The main module is checked too, and "(devel)" cannot be shown to be new enough.
    v = violation(DenyModules((ModuleBan("example.com/tool", below="v1.0.0"),)), tool)
    assert "example.com/tool@(devel)" in v.detail


def test_deny_modules_checks_replacements() -> None:
    info = BuildInfo("go1.22.1", "example.com/x", Module("example.com/x", "(devel)"), deps=(
        Module("example.com/safe", "v1.0.0", replace=Module("golang.org/x/net", "v0.1.0")),))
    v = violation(DenyModules((ModuleBan("golang.org/x/net", below="v0.17.0"),)), subj(info))
    assert "golang.org/x/net@v0.1.0" in v.detail


def test_missing_build_info_fails_every_go_predicate() -> None:
    unreadable = subj(None)  # Go, but the build info was malformed
    preds = [MinGoVersion("1.0"), DenyVcsModified(), RequireTrimpath(),
             DenyModules((ModuleBan("x", frozenset({"v1.0.0"})),)),
             SignerForModule((ModulePin(Glob.compile("*", False), SignerSpec()),))]
    for pred in preds:
        assert violation(pred, unreadable).reason is Reason.GO_PREDICATE


def test_devel_and_odd_go_versions_fail_closed() -> None:
    for version in ("devel go1.23-abcdef Tue", "gccgo", ""):
        v = violation(MinGoVersion("1.0"), subj(BuildInfo(version)))
        assert "not a Go release" in v.detail
    MinGoVersion("1.21").check(subj(BuildInfo("go1.22.1 X:boringcrypto")))


def test_signer_for_module(material: Material) -> None:
    key_a, key_b = (load_public_key(str(material.keys[n])) for n in ("a", "b"))
    ci = IdentityRule("https://token.actions.githubusercontent.com",
                      san_regex=r"https://github\.com/acme/.*")
    pin = SignerForModule((ModulePin(Glob.compile("example.com/app", False),
                                     SignerSpec((key_a,), (ci,))),))
    app = material.bins["app"].info
    by_a = Evidence(SignatureKind.COSIGN_SIG, "x.sig", key_fingerprint=key_a.fingerprint)
    by_b = Evidence(SignatureKind.COSIGN_SIG, "x.sig", key_fingerprint=key_b.fingerprint)
    by_ci = Evidence(SignatureKind.BUNDLE_KEYLESS, "x.sigstore.json",
                     identity="https://github.com/acme/app/.github/workflows/r.yml@refs/tags/v1",
                     issuer="https://token.actions.githubusercontent.com")
    by_other = Evidence(SignatureKind.BUNDLE_KEYLESS, "x.sigstore.json",
                        identity="https://github.com/evil/app", issuer=by_ci.issuer)
    pin.check(subj(app, by_a))
    pin.check(subj(app, by_ci))
    v = violation(pin, subj(app, by_b))
    assert v.reason is Reason.UNTRUSTED_KEY and key_b.fingerprint in v.detail
    assert violation(pin, subj(app, by_other)).reason is Reason.IDENTITY_MISMATCH
    assert violation(pin, subj(app, None)).reason is Reason.UNTRUSTED_KEY
    pin.check(subj(material.bins["tool"].info, by_b))  # no pin for example.com/tool


def test_empty_combinators_fail_closed(material: Material) -> None:
    app = subj(material.bins["app"].info)
    assert "empty AllOf" in violation(AllOf([]), app).detail
    assert "empty AnyOf" in violation(AnyOf([]), app).detail
    AllOf([MinGoVersion("1.0"), DenyVcsModified()]).check(app)
    assert violation(AllOf([MinGoVersion("1.0"), MinGoVersion("9.0")]), app)
    AnyOf([MinGoVersion("9.0"), MinGoVersion("1.0")]).check(app)
    v = violation(AnyOf([MinGoVersion("9.0"), MinGoVersion("8.0")]), app)
    assert "9.0" in v.detail and "8.0" in v.detail


@pytest.mark.parametrize(("older", "newer"), [
    ("go1.9", "go1.10"), ("go1.21rc2", "go1.21.0"), ("go1.21beta1", "go1.21rc1"),
    ("1.20", "go1.20.1"), ("go1.21.0", "go1.21.10"),
])
def test_go_version_order(older: str, newer: str) -> None:
    a, b = parse_go_version(older), parse_go_version(newer)
    assert a is not None and b is not None and a < b


@pytest.mark.parametrize(("older", "newer"), [
    ("v1.0.0-alpha", "v1.0.0-alpha.1"), ("v1.0.0-alpha.1", "v1.0.0-alpha.beta"),
    ("v1.0.0-beta.2", "v1.0.0-beta.11"), ("v1.0.0-rc.1", "v1.0.0"), ("v0.9.9", "v0.10.0"),
    ("v0.0.0-20210101000000-abcdefabcdef", "v0.0.1"), ("v2.0.0+incompatible", "v2.0.1"),
])
def test_semver_order(older: str, newer: str) -> None:
    a, b = parse_semver(older), parse_semver(newer)
    assert a is not None and b is not None and a < b


def test_unparseable_versions() -> None:
    assert parse_semver("(devel)") is None and parse_semver("1.2.3") is None
    assert parse_go_version("go1.22-abc") is None


def test_require_trimpath_on_real_builds(material: Material, tmp_path: Path) -> None:
    """``go build -trimpath`` stamps ``-trimpath=true``; a plain build has no such setting."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "go.mod").write_text("module example.com/trim\n\ngo 1.19\n")
    (src / "main.go").write_text('package main\n\nfunc main() {}\n')
    run([GO, "build", "-trimpath", "-o", str(tmp_path / "trim"), "."], cwd=src,
        env=_go_env(tmp_path))
    trimmed = parse_bytes((tmp_path / "trim").read_bytes(), "trim")
    assert trimmed.setting("-trimpath") == "true"
    RequireTrimpath().check(subj(trimmed))
    plain = material.bins["app"].info
    assert plain.setting("-trimpath") is None
    v = violation(RequireTrimpath(), subj(plain))
    assert v.reason is Reason.GO_PREDICATE and "-trimpath=absent" in v.detail
    off = BuildInfo("go1.22.1", settings=(("-trimpath", "false"),))
    assert "-trimpath=false" in violation(RequireTrimpath(), subj(off)).detail


def test_require_trimpath_in_a_policy(material: Material) -> None:
    doc = {"version": 1, "trust": {"keys": [str(material.keys["a"])]}, "rules": [
        {"id": "g", "action": "require-signature", "match": {"go": True},
         "go": {"require_trimpath": True}}]}
    snap = parse_policy(json.dumps(doc).encode(), "p.json")
    assert snap.rules[0].predicate is not None
    assert "-trimpath=true" in snap.rules[0].predicate.describe()
    doc["rules"][0]["go"] = {"require_trimpath": False}  # type: ignore[index]
    with pytest.raises(MalformedInput, match="sets no Go predicate"):
        parse_policy(json.dumps(doc).encode(), "p.json")
