"""What-if replay on hand-written records: each edge where the log does or does not support
a verdict. Keys are real (agent.signing), policies go through the real loader, and the
``--reverify`` cases verify a real signed file. The records are built here because the edge
cases (a kernel verdict-map hit, a torn summary, keyless evidence) cannot be produced on
demand by the running agent; tests/integration/test_whatif_agent.py replays a real log."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytest

from agent import signing
from agent.decision import FileIdentity, Source
from agent.digest import Artifact
from agent.errors import Reason
from agent.policy import PolicySnapshot, parse_policy
from agent.review.whatif import Change, Gap, Method, Replayer, change_of
from agent.verify.model import Evidence, SignatureKind
from tests.whatif_fixtures import APP, DIGEST, GO, ISSUER, SAN, by_key, keypair, record


def policy(tmp: Path, body: str, keys: Tuple[str, ...] = (), head: str = "",
           name: str = "cand.toml") -> PolicySnapshot:
    key_list = ", ".join(f'"{k}"' for k in keys)
    text = f'version = 2\nmode = "enforce"\nscopes = ["/srv"]\n{head}\n' \
           f'[trust]\nkeys = [{key_list}]\n{body}'
    path = tmp / name
    path.write_text(text)
    return parse_policy(text.encode(), str(path))


SIGNED_GO = """
[[rules]]
id = "go-signed"
action = "require-signature"
match = { go = true }
[[rules]]
id = "rest"
action = "allow"
"""


# --- signatures from the record ---------------------------------------------------------------

def test_a_signer_the_candidate_trusts_stays_allowed_from_the_evidence(tmp_path: Path) -> None:
    _, pub, fp = keypair(tmp_path, "a")
    cand = policy(tmp_path, SIGNED_GO, (pub,))
    out = Replayer(cand).replay(record(evidence=by_key(fp)))
    assert out.allow is True and out.method is Method.RECORDED and out.rule_id == "go-signed"
    assert change_of(True, out) is Change.SAME


def test_a_signer_the_candidate_does_not_trust_is_newly_denied(tmp_path: Path) -> None:
    _, _, fp_a = keypair(tmp_path, "a")
    _, pub_b, _ = keypair(tmp_path, "b")
    cand = policy(tmp_path, SIGNED_GO, (pub_b,))
    out = Replayer(cand).replay(record(evidence=by_key(fp_a)))
    assert out.allow is False and out.reason == "untrusted-key" and out.blocks
    assert fp_a in out.detail and change_of(True, out) is Change.NEWLY_DENIED


def test_a_rule_pinning_other_signers_denies(tmp_path: Path) -> None:
    _, pub_a, fp_a = keypair(tmp_path, "a")
    _, pub_b, fp_b = keypair(tmp_path, "b")
    body = SIGNED_GO.replace('match = { go = true }',
                             f'match = {{ go = true }}\nsigners = {{ keys = ["{fp_b}"] }}')
    cand = policy(tmp_path, body, (pub_a, pub_b))
    assert Replayer(cand).replay(record(evidence=by_key(fp_a))).reason == "untrusted-key"
    assert Replayer(cand).replay(record(evidence=by_key(fp_b))).allow is True


def test_keyless_evidence_needs_the_same_trusted_root(tmp_path: Path) -> None:
    ident = f'[[trust.identities]]\nissuer = "{ISSUER}"\nsan = "{SAN}"\n'
    cand = policy(tmp_path, ident + SIGNED_GO)
    keyless = Evidence(SignatureKind.BUNDLE_KEYLESS, APP + ".sigstore.json", None, SAN, ISSUER,
                       42, 1_700_000_000)
    # no trusted root in the candidate: keyless signatures never verify
    out = Replayer(cand).replay(record(evidence=keyless))
    assert out.allow is False and out.reason == "no-trust-configured"
    # a trusted root, but which one verified the certificate then is not known
    rooted = with_root(cand, b'{"root": 1}')
    out = Replayer(rooted).replay(record(evidence=keyless))
    assert out.allow is None and out.reason == Gap.TRUSTED_ROOT.value
    # the recorded policy (by digest) had the same root: the evidence holds
    old = dataclasses.replace(rooted, digest=DIGEST)
    out = Replayer(rooted, {DIGEST: old}).replay(record(evidence=keyless))
    assert out.allow is True and out.method is Method.RECORDED


def with_root(snap: PolicySnapshot, root: bytes) -> PolicySnapshot:
    """The snapshot with a trusted root in every trust (a real root needs Fulcio material;
    the replay compares the bytes only)."""
    def rooted(t: Any) -> Any:
        return None if t is None else dataclasses.replace(t, trusted_root=root)
    rules = tuple(dataclasses.replace(r, trust=rooted(r.trust)) for r in snap.rules)
    return dataclasses.replace(snap, trust=rooted(snap.trust), rules=rules)


def test_a_signature_in_a_store_the_candidate_does_not_list_is_unknown(tmp_path: Path) -> None:
    _, pub, fp = keypair(tmp_path, "a")
    cand = policy(tmp_path, SIGNED_GO, (pub,))
    out = Replayer(cand).replay(record(evidence=by_key(fp, "/var/sigs/" + "ab" * 32 + ".sig")))
    assert out.allow is None and out.reason == Gap.SIGNATURE_LOCATION.value
    store = tmp_path / "sigs"
    store.mkdir()
    listed = policy(tmp_path, SIGNED_GO, (pub,), name="s.toml")
    listed = dataclasses.replace(listed, rules=tuple(
        dataclasses.replace(r, trust=dataclasses.replace(r.trust, store_dirs=(str(store),)))
        if r.trust is not None else r for r in listed.rules))
    out = Replayer(listed).replay(record(evidence=by_key(fp, f"{store}/{'ab' * 32}.sig")))
    assert out.allow is True


def test_no_signature_stays_denied_unless_the_candidate_adds_stores(tmp_path: Path) -> None:
    _, pub, _ = keypair(tmp_path, "a")
    cand = policy(tmp_path, SIGNED_GO, (pub,))
    rec = record(allow=False, reason=Reason.NO_SIGNATURE, evidence=None)
    out = Replayer(cand).replay(rec)
    assert out.allow is False and out.reason == "no-signature" and change_of(False, out) \
        is Change.SAME
    store = tmp_path / "store"
    store.mkdir()
    with_store = policy(tmp_path, SIGNED_GO.replace(
        '[[rules]]', f'signature_stores = ["{store}"]\n[[rules]]', 1), (pub,), name="w.toml")
    assert with_store.trust.store_dirs == (str(store),)
    out = Replayer(with_store).replay(rec)
    assert out.allow is None and out.reason == Gap.NEW_STORES.value


def test_a_failed_check_is_unknown_when_the_candidate_trusts_new_signers(tmp_path: Path) -> None:
    _, pub_a, _ = keypair(tmp_path, "a")
    _, pub_b, _ = keypair(tmp_path, "b")
    old = policy(tmp_path, SIGNED_GO, (pub_a,), name="old.toml")
    rec = record(allow=False, reason=Reason.BAD_SIGNATURE, evidence=Evidence(
        SignatureKind.COSIGN_SIG, APP + ".sig"), digest=old.digest)
    # signed by someone: the log cannot say whether by b
    cand_b = policy(tmp_path, SIGNED_GO, (pub_b,))
    out = Replayer(cand_b, {old.digest: old}).replay(rec)
    assert out.allow is None and out.reason == Gap.NEW_SIGNERS.value
    # the same trust (here: a deny rule added elsewhere): still denied, as recorded
    same = policy(tmp_path, '[[rules]]\nid = "tmp"\naction = "deny"\n'
                  'match = { paths = ["/srv/tmp"] }\n' + SIGNED_GO, (pub_a,), name="same.toml")
    out = Replayer(same, {old.digest: old}).replay(rec)
    assert out.allow is False and out.reason == "bad-signature"
    # without the recorded policy nothing is known about its trust
    assert Replayer(same).replay(rec).allow is None


def test_a_record_decided_by_a_rule_has_no_signature_to_replay(tmp_path: Path) -> None:
    _, pub, _ = keypair(tmp_path, "a")
    cand = policy(tmp_path, SIGNED_GO, (pub,))
    out = Replayer(cand).replay(record(reason=Reason.OK, evidence=None, sha256=None,
                                       rule_id="go-allowed", source=Source.RULE))
    assert out.allow is None and out.reason == Gap.NO_SIGNATURE_EVIDENCE.value


# --- rules, scopes, limits -------------------------------------------------------------------

def test_a_deny_rule_and_the_scope_decide_without_evidence(tmp_path: Path) -> None:
    body = '[[rules]]\nid = "no-app"\naction = "deny"\nmatch = { paths = ["/srv/app"] }\n'
    cand = policy(tmp_path, body)
    out = Replayer(cand).replay(record(evidence=None, sha256=None))
    assert out.allow is False and out.reason == "policy-deny" and out.method is Method.POLICY
    out = Replayer(cand).replay(record("/usr/bin/ls", evidence=None))
    assert out.allow is True and "outside" in out.detail and out.method is Method.POLICY


def test_max_file_bytes_denies_before_any_rule(tmp_path: Path) -> None:
    cand = policy(tmp_path, '[[rules]]\nid = "all"\naction = "allow"\n',
                  head="[limits]\nmax_file_bytes = 1000\n")
    out = Replayer(cand).replay(record(size=5000))
    assert out.allow is False and out.reason == "verify-failed"


def test_a_monitor_candidate_denies_without_blocking(tmp_path: Path) -> None:
    body = '[[rules]]\nid = "no-app"\naction = "deny"\n'
    cand = parse_policy(b'version = 1\nmode = "monitor"\nscopes = ["/srv"]\n[trust]\nkeys = []\n'
                        + body.encode(), "m.toml")
    out = Replayer(cand).replay(record())
    assert out.allow is False and not out.blocks and out.mode == "monitor"


def test_a_kernel_map_hit_has_no_build_info(tmp_path: Path) -> None:
    """The kill and bpf-lsm runners record a verdict-map hit without a subject."""
    hit = record(evidence=None, sha256=None, go=None, digest=None, rule_id=None,
                 source=Source.CACHE, detail="kernel verdict map hit")
    _, pub, _ = keypair(tmp_path, "a")
    out = Replayer(policy(tmp_path, SIGNED_GO, (pub,))).replay(hit)
    assert out.allow is None and out.reason == Gap.NO_BUILD_INFO.value
    assert "go-signed" in out.detail
    by_path = policy(tmp_path, '[[rules]]\nid = "app"\naction = "deny"\n'
                     'match = { paths = ["/srv/app"] }\n' + SIGNED_GO, (pub,), name="p.toml")
    out = Replayer(by_path).replay(hit)
    assert out.allow is False and out.reason == "policy-deny"


def test_an_unrecorded_gid_never_decides_a_gid_rule(tmp_path: Path) -> None:
    body = '[[rules]]\nid = "staff"\naction = "allow"\nmatch = { gids = [50] }\n' \
           '[[rules]]\nid = "rest"\naction = "deny"\n'
    cand = policy(tmp_path, body)
    out = Replayer(cand).replay(record())
    assert out.allow is None and out.reason == Gap.MATCH_FIELD.value and "gid" in out.detail


def test_a_failed_decision_was_not_decided(tmp_path: Path) -> None:
    cand = policy(tmp_path, '[[rules]]\nid = "all"\naction = "allow"\n')
    out = Replayer(cand).replay(record(allow=False, reason=Reason.VERIFY_FAILED, go=None,
                                       sha256=None, detail="cannot read the file: gone"))
    assert out.allow is None and out.reason == Gap.NOT_DECIDED.value


# --- Go predicates on the recorded build summary ---------------------------------------------

def go_rule(go_table: str) -> str:
    return SIGNED_GO.replace('match = { go = true }', f'match = {{ go = true }}\n{go_table}')


@pytest.mark.parametrize("table, summary, verdict, reason", [
    ('go = { min_version = "1.21" }', GO, False, "go-predicate"),
    ('go = { min_version = "1.18" }', GO, True, "ok"),
    ('go = { deny_vcs_modified = true }', dict(GO, **{"vcs.modified": "true"}), False,
     "go-predicate"),
    ('go = { deny_vcs_modified = true }', GO, True, "ok"),
    ('go = { deny_modules = [{ path = "example.com/app", versions = ["(devel)"] }] }', GO,
     False, "go-predicate"),
    ('go = { deny_modules = [{ path = "golang.org/x/net", below = "v0.23.0" }] }', GO, None,
     Gap.GO_DEPENDENCIES.value),
    # a summary without the field (an older or hand-written log) cannot decide
    ('go = { deny_vcs_modified = true }', {"module": "example.com/app"}, None,
     Gap.GO_FIELD.value),
    ('go = { min_version = "1.18" }', {"go": "go1.22.4"}, None, Gap.GO_FIELD.value),
    # unreadable build info: every Go predicate fails, as at exec time
    ('go = { min_version = "1.18" }', {"go_version": None, "path": None, "malformed": True},
     False, "go-predicate"),
])
def test_go_predicates(tmp_path: Path, table: str, summary: Dict[str, Any],
                       verdict: Optional[bool], reason: str) -> None:
    _, pub, fp = keypair(tmp_path, "a")
    cand = policy(tmp_path, go_rule(table), (pub,))
    out = Replayer(cand).replay(record(evidence=by_key(fp), go=summary))
    assert (out.allow, out.reason) == (verdict, reason), out


def test_go_predicates_run_only_after_a_trusted_signature(tmp_path: Path) -> None:
    _, pub, _ = keypair(tmp_path, "a")
    _, _, other = keypair(tmp_path, "b")
    cand = policy(tmp_path, go_rule('go = { min_version = "1.21" }'), (pub,))
    out = Replayer(cand).replay(record(evidence=by_key(other)))
    assert out.reason == "untrusted-key"


def test_a_module_pin_uses_the_recorded_module(tmp_path: Path) -> None:
    _, pub_a, fp_a = keypair(tmp_path, "a")
    _, pub_b, fp_b = keypair(tmp_path, "b")
    cand = policy(tmp_path, go_rule(
        f'go = {{ module_signers = [{{ module = "example.com/*", keys = ["{fp_b}"] }}] }}'),
        (pub_a, pub_b))
    assert Replayer(cand).replay(record(evidence=by_key(fp_a))).reason == "untrusted-key"
    assert Replayer(cand).replay(record(evidence=by_key(fp_b))).allow is True


# --- --reverify --------------------------------------------------------------------------------

def signed_file(tmp: Path, key: Any) -> Tuple[Path, str]:
    target = tmp / "srv" / "tool"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"#!/bin/sh\necho tool\n")
    with Artifact.open(str(target)) as art:
        Path(str(target) + ".sig").write_bytes(base64.b64encode(signing.sign_artifact(key,
                                                                                     art)))
        return target, art.sha256.hex()


def test_reverify_settles_what_the_log_cannot(tmp_path: Path) -> None:
    key_b, pub_b, _ = keypair(tmp_path, "b")
    target, sha = signed_file(tmp_path, key_b)
    st = target.stat()
    ident = FileIdentity(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)
    # recorded under a policy trusting a: bad-signature (it is b's)
    rec = record(str(target), allow=False, reason=Reason.BAD_SIGNATURE, go=None,
                 evidence=Evidence(SignatureKind.COSIGN_SIG, str(target) + ".sig"),
                 sha256=sha, ident=ident, rule_id="rest")
    text = (f'version = 2\nmode = "enforce"\nscopes = ["{tmp_path}/srv"]\n[trust]\n'
            f'keys = ["{pub_b}"]\n[[rules]]\nid = "rest"\naction = "require-signature"\n')
    cand = parse_policy(text.encode(), "c.toml")
    assert Replayer(cand).replay(rec).allow is None
    out = Replayer(cand, reverify=True).replay(rec)
    assert out.allow is True and out.method is Method.REVERIFIED
    # other bytes now: not re-verified, and said so
    target.write_bytes(b"#!/bin/sh\necho changed\n")
    out = Replayer(cand, reverify=True).replay(rec)
    assert out.allow is None and out.note is not None and "sha256 differs" in out.note


def test_a_record_that_cannot_be_a_subject_is_unknown_not_a_crash(tmp_path: Path) -> None:
    cand = parse_policy(b'version = 1\nscopes = ["/"]\n[[rules]]\nid = "all"\n'
                        b'action = "allow"\n', "c.toml")
    out = Replayer(cand).replay(record("relative/path"))
    assert out.allow is None and out.reason == Gap.BAD_RECORD.value


def test_every_unknown_reason_and_method_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "review.md").read_text()
    section = doc[doc.index("## What-if"):]
    for code in [g.value for g in Gap] + [m.value for m in Method]:
        assert f"| `{code}` |" in section, code
