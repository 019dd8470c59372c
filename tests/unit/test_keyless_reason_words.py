"""sigstore-python's failure messages become reason codes by their words
(agent/verify/keyless.py ``_reason``); the hashes and encoded values a message quotes are
random text and must not count. Found in CI: a tampered inclusion-proof root hash whose
base64 held "sct" was reported as certificate-invalid instead of tlog-invalid."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import Reason
from agent.verify.keyless import _reason


def leaf() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(minutes=10)).sign(key, hashes.SHA256()))


def test_quoted_hashes_do_not_choose_the_reason() -> None:
    message = ("invalid log entry: inclusion proof contains invalid root hash: expected "
               "log_root=b'AAAAsctUSAGEcertificateCHAIN/expired+AAAAAAAAAAAA=', calculated "
               "b17e924e416d2aabf759618f8814cda6aa865eec28593974fc6e8f8a72394968")
    assert _reason(message, leaf(), ()) is Reason.TLOG_INVALID


def test_the_words_still_choose_it() -> None:
    cert = leaf()
    assert _reason("Invalid SCT: bad signature", cert, ()) is Reason.CERTIFICATE_INVALID
    assert _reason("invalid log entry: checkpoint mismatch", cert, ()) is Reason.TLOG_INVALID
    assert _reason("artifact digest mismatch", cert, ()) is Reason.DIGEST_MISMATCH
    assert _reason("signature is invalid", cert, ()) is Reason.BAD_SIGNATURE
