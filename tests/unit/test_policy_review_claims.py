"""Review findings on keyless claims: a certificate with a repeated extension, and the
extensions of a logged keyless signer read back for ``policy whatif``.

Real certificates built with ``cryptography``; the repeated extension is made by rewriting
one OID of a signed certificate into another (the builder refuses duplicates, a forger
does not). Nothing here is faked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.record.decision_log import from_line, to_line
from agent.review.whatif import Method, Replayer
from agent.verify.fulcio_ext import ARC, fulcio_extensions
from agent.verify.legacy_bundle import match_identity
from agent.verify.model import Evidence, IdentityRule, SignatureKind
from tests.unit.test_policy_signers import ISSUER, SAN, certificate, der_utf8
from tests.unit.test_whatif import SIGNED_GO, policy, with_root
from tests.whatif_fixtures import APP, DIGEST, record


def _oid_der(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytes([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        out += bytes(reversed(chunk))
    return out


def test_a_repeated_extension_proves_nothing_and_raises_nothing() -> None:
    """cryptography 50 raises DuplicateExtension, which is not a ValueError: it escaped
    fulcio_extensions and cert_identity (the verdict became an opaque bad-signature)."""
    cert = certificate([(ARC + "8", der_utf8(ISSUER)),
                        (ARC + "12", der_utf8("https://github.com/acme/app")),
                        (ARC + "13", der_utf8("https://github.com/evil/app"))])
    der = cert.public_bytes(serialization.Encoding.DER)
    twice = x509.load_der_x509_certificate(
        der.replace(_oid_der(ARC + "13"), _oid_der(ARC + "12")))
    assert fulcio_extensions(twice) == ()
    rule = IdentityRule(ISSUER, san=SAN,
                        extensions=((ARC + "12", "https://github.com/acme/app"),))
    assert match_identity(twice, (rule,)) == (None, None, None)


def test_whatif_sees_the_logged_extensions_of_a_keyless_signer(tmp_path: Path) -> None:
    """Review finding: the decision log records ``evidence.extensions`` but its reader
    dropped them, so ``policy whatif`` called every keyless exec "newly denied"
    (identity-mismatch) under a candidate that requires an extension the signer has."""
    repo_uri = ARC + "12"
    ident = (f'[[trust.identities]]\nissuer = "{ISSUER}"\nsan = "{SAN}"\n'
             'extensions = { source_repository_uri = "https://github.com/acme/app" }\n')
    cand = with_root(policy(tmp_path, ident + SIGNED_GO), b'{"root": 1}')
    cand = dataclasses.replace(cand, digest=DIGEST)
    keyless = Evidence(SignatureKind.BUNDLE_KEYLESS, APP + ".sigstore.json", None, SAN, ISSUER,
                       42, 1_700_000_000,
                       extensions=((repo_uri, "https://github.com/acme/app"),))
    line = to_line("r1", record(evidence=keyless))
    logged = from_line(line).decision
    assert logged.evidence == keyless
    out = Replayer(cand, {DIGEST: cand}).replay(logged)
    assert (out.allow, out.method) == (True, Method.RECORDED)
    other = dataclasses.replace(keyless, extensions=((repo_uri, "https://github.com/evil/app"),))
    out = Replayer(cand, {DIGEST: cand}).replay(from_line(to_line("r2", record(
        evidence=other))).decision)
    assert (out.allow, out.reason) == (False, "identity-mismatch")
