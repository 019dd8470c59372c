"""Fulcio extensions in real keyless signatures, matched by the policy language.

What is real: two Go binaries built here (main modules ``github.com/execguard/hello``, built
with -trimpath, and ``github.com/acme/hello``, without), signed by the real npm sigstore
client (tests/sigstore_js/generate.mjs) against the offline @sigstore/mock Fulcio, CT log and
Rekor. The mock Fulcio copies the OIDC token's GitHub Actions claims into the certificate as
extensions 1.3.6.1.4.1.57264.1.2-1.6 and 1.9-1.22, as the real Fulcio does (the token itself
is unsigned: the mock does not check it). Verification is the agent's own, offline.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from agent.cache import TrustedCache, identity_from_stat
from agent.decide import Decider
from agent.decision import Enforcement, ExecEvent
from agent.errors import Reason
from agent.policy import PolicyStore, decide, parse_policy, subject_of
from agent.policy.model import PolicySnapshot
from agent.verify.fulcio_ext import NAMES
from agent.verify.model import IdentityRule, TrustConfig
from tests.bundle_fixtures import JS_DIR, _run, npm_ci, verify_file
from tests.goinfo_fixtures import GO, _go_env, run
from tests.policy_fixtures import verifier

ISSUER = "https://token.actions.githubusercontent.com"
WORKFLOW = ("https://github.com/execguard/hello/.github/workflows/release.yml"
            "@refs/tags/v1.0.0")
MAIN_GO = 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("%s") }\n'


def _build(work: Path, name: str, module: str, *flags: str) -> Path:
    src = work / "src" / name
    src.mkdir(parents=True)
    (src / "go.mod").write_text(f"module {module}\n\ngo 1.19\n")
    (src / "main.go").write_text(MAIN_GO % name)
    run([GO, "build", *flags, "-o", str(work / name), "."], cwd=src, env=_go_env(work))
    return work / name


@functools.cache
def material() -> Path:
    """A directory: hello + other binaries, their bundles beside them, the trusted root."""
    work = Path(tempfile.mkdtemp(prefix="execguard-claims-"))
    hello = _build(work, "hello", "github.com/execguard/hello", "-trimpath")
    other = _build(work, "other", "github.com/acme/hello")
    npm_ci()
    out = work / "out"
    _run(["node", str(JS_DIR / "generate.mjs"), str(out), str(hello), str(other)], JS_DIR)
    shutil.copy(out / "keyless-github.json", str(hello) + ".sigstore.json")
    shutil.copy(out / "keyless-github-other.json", str(other) + ".sigstore.json")
    return work


@pytest.fixture(scope="module", name="work")
def work_fixture() -> Any:
    work = material()
    yield work
    shutil.rmtree(work, ignore_errors=True)


def trust(work: Path, *rules: IdentityRule) -> TrustConfig:
    return TrustConfig(identities=rules,
                       trusted_root=(work / "out" / "trusted_root.json").read_bytes(),
                       trusted_root_source="trusted_root.json")


def test_real_certificate_extensions_reach_the_evidence(work: Path) -> None:
    rule = IdentityRule(ISSUER, san=WORKFLOW, extensions=(
        (NAMES["source_repository_uri"], "https://github.com/execguard/hello"),
        (NAMES["source_repository_ref"], "refs/tags/v1.0.0"),
        (NAMES["github_workflow_ref"], "refs/tags/v1.0.0"),  # legacy 1.6, raw text
        (NAMES["build_signer_uri"], WORKFLOW),
        (NAMES["runner_environment"], "github-hosted")),
        extensions_regex=((NAMES["build_config_uri"], r"https://github\.com/execguard/.*"),))
    # two verification paths: sigstore-python (SET + proof), and our SET-only v0.1 path
    for name in ("keyless-github.json", "keyless-github-set-only.json"):
        v = verify_file(work / "hello", (work / "out" / name).read_bytes(), name,
                        trust(work, rule))
        assert v.trusted, v.detail
        assert v.evidence is not None
        got = dict(v.evidence.extensions)
        assert got[NAMES["source_repository_uri"]] == "https://github.com/execguard/hello"
        assert got[NAMES["run_invocation_uri"]].endswith("/actions/runs/42/attempts/1")
        assert got[NAMES["issuer"]] == ISSUER and got[NAMES["issuer_v1"]] == ISSUER
        assert v.evidence.to_json()["extensions"] == got
        wrong = IdentityRule(ISSUER, san=WORKFLOW, extensions_regex=(
            (NAMES["source_repository_ref"], "refs/heads/.*"),))
        denied = verify_file(work / "hello", (work / "out" / name).read_bytes(), name,
                             trust(work, wrong))
        assert not denied.trusted and denied.reason is Reason.IDENTITY_MISMATCH


def test_a_token_without_github_claims_gives_only_the_issuer(work: Path) -> None:
    v = verify_file(work / "hello", (work / "out" / "keyless-v0.2.json").read_bytes(), "b",
                    trust(work, IdentityRule(ISSUER, san=WORKFLOW)))
    assert v.evidence is not None
    assert {oid for oid, _ in v.evidence.extensions} == {NAMES["issuer_v1"], NAMES["issuer"]}
    needs_repo = IdentityRule(ISSUER, san=WORKFLOW, extensions=(
        (NAMES["source_repository_uri"], "https://github.com/execguard/hello"),))
    v2 = verify_file(work / "hello", (work / "out" / "keyless-v0.2.json").read_bytes(), "b",
                     trust(work, needs_repo))
    assert not v2.trusted and v2.reason is Reason.IDENTITY_MISMATCH  # absent: fails closed


def policy(work: Path, go: Dict[str, Any], identities: Optional[List[Dict[str, Any]]] = None
           ) -> PolicySnapshot:
    doc = {"version": 1, "mode": "enforce", "scopes": [str(work)],
           "trust": {"keys": [], "trusted_root": str(work / "out" / "trusted_root.json"),
                     "identities": identities or [
                         {"issuer": ISSUER, "san_regex": r"https://github\.com/.*"}]},
           "rules": [{"id": "go", "action": "require-signature", "match": {"go": True},
                      "go": go}]}
    return parse_policy(json.dumps(doc).encode(), "claims.json")


def decide_file(snap: PolicySnapshot, path: Path) -> Any:
    from agent.digest import Artifact

    with Artifact.open(str(path)) as art:
        return decide(snap, subject_of(art, 0), verifier(path))


def test_module_bound_to_the_repository_that_signed_it(work: Path) -> None:
    snap = policy(work, {"module_signers": [{"module": "github.com/*", "identities": [
        {"issuer": ISSUER, "san_regex": r"https://{module_repo}/\.github/workflows/.*",
         "extensions": {"source_repository_uri": "https://{module_repo}"}}]}]})
    ok = decide_file(snap, work / "hello")  # github.com/execguard/hello, signed by its repo
    assert ok.allow, ok.detail
    stolen = decide_file(snap, work / "other")  # github.com/acme/hello, signed by execguard's
    assert not stolen.allow and stolen.reason is Reason.IDENTITY_MISMATCH
    assert stolen.verdict is not None and "matches no trusted identity" in stolen.detail


def test_require_trimpath_on_keyless_signed_binaries(work: Path) -> None:
    snap = policy(work, {"require_trimpath": True})
    assert decide_file(snap, work / "hello").allow
    other = decide_file(snap, work / "other")  # signed fine, built without -trimpath
    assert not other.allow and other.reason is Reason.GO_PREDICATE and "-trimpath" in other.detail


def test_cached_verdicts_keep_extensions_across_a_restart(work: Path, tmp_path: Path) -> None:
    """The policy's own trust needs an extension: a cache hit (in memory, then from the
    cache file after a restart) must still carry it, or the rule would deny."""
    snap = policy(work, {"min_version": "1.19"}, identities=[
        {"issuer": ISSUER, "san": WORKFLOW,
         "extensions": {"source_repository_uri": "https://github.com/execguard/hello"}}])
    path = str(tmp_path / "cache.msgpack")

    def once(decider: Decider) -> Any:
        fd = os.open(work / "hello", os.O_RDONLY)
        try:
            event = ExecEvent(os.getpid(), os.getppid(), 0, 0, "t", str(work / "hello"),
                              identity_from_stat(os.fstat(fd)), time.time_ns(), "t")
            return decider.decide(event, fd, Enforcement.FANOTIFY_DENY)
        finally:
            os.close(fd)

    first = Decider(PolicyStore(snap), TrustedCache(path, "unbound"))
    assert once(first).allow
    hit = once(first)
    assert hit.allow and hit.source.value == "cache"
    assert first.cache.flush()
    restarted = Decider(PolicyStore(snap), TrustedCache(path, first.cache.binding))
    assert restarted.cache.load().entries == 1
    again = once(restarted)
    assert again.allow and again.source.value == "cache", again.detail
    assert again.evidence is not None and dict(again.evidence.extensions)
