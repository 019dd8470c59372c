"""Our own minimal reading of a Sigstore ``trusted_root.json``: log keys by key id, Fulcio CAs.

sigstore-python has its own parser, but it is only used on the keyless path; managed-key and
legacy bundles need the same material without importing the library. Parsing follows proto3
JSON: omitted fields are defaults, ``bytes`` are standard base64. A CA/log without a
``validFor.start`` is rejected (the conformance suite treats that as a broken root).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from agent.errors import MalformedInput

ROOT_MEDIA_TYPE = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
MAX_ROOT_SIZE = 4 << 20


@dataclass(frozen=True)
class LogKey:
    """A transparency (or CT) log key and the window in which it may vouch for entries."""

    key_id: bytes
    public_key: Any
    start: datetime
    end: Optional[datetime]

    def valid_at(self, when: datetime) -> bool:
        return self.start <= when and (self.end is None or when <= self.end)


@dataclass(frozen=True)
class CertAuthority:
    certs: Tuple[x509.Certificate, ...]  # as listed: leaf-most first, root last
    start: datetime
    end: Optional[datetime]

    def valid_at(self, when: datetime) -> bool:
        return self.start <= when and (self.end is None or when <= self.end)


@dataclass(frozen=True)
class TrustRoot:
    tlogs: Dict[bytes, LogKey]
    ctlogs: Dict[bytes, LogKey]
    fulcio: Tuple[CertAuthority, ...]

    def fulcio_at(self, when: datetime) -> List[x509.Certificate]:
        return [c for ca in self.fulcio if ca.valid_at(when) for c in ca.certs]


def b64decode(value: Any, what: str) -> bytes:
    """Strict standard base64 (proto3 JSON also allows URL-safe; accept both)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a base64 string")
    text = value.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


def parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{what} missing")
    text = value.strip().replace("Z", "+00:00")
    frac = ""
    if "." in text:  # fromisoformat on 3.9 accepts only 3 or 6 fraction digits
        head, rest = text.split(".", 1)
        digits = rest.split("+", 1)[0].split("-", 1)[0]
        frac, text = digits, head + rest[len(digits):]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what} is not an RFC 3339 time") from None
    if when.tzinfo is None:
        raise ValueError(f"{what} has no time zone")
    if frac:
        when = when.replace(microsecond=int((frac + "000000")[:6]))
    return when.astimezone(timezone.utc)


def _window(obj: Any, what: str) -> Tuple[datetime, Optional[datetime]]:
    valid = obj.get("validFor") if isinstance(obj, dict) else None
    if not isinstance(valid, dict) or "start" not in valid:
        raise ValueError(f"{what}: validFor.start missing")
    end = valid.get("end")
    return parse_time(valid["start"], what), (parse_time(end, what) if end else None)


def _log_keys(entries: Any, what: str) -> Dict[bytes, LogKey]:
    out: Dict[bytes, LogKey] = {}
    for n, entry in enumerate(entries if isinstance(entries, list) else []):
        name = f"{what}[{n}]"
        pk = entry.get("publicKey") if isinstance(entry, dict) else None
        if not isinstance(pk, dict):
            raise ValueError(f"{name}: publicKey missing")
        key = serialization.load_der_public_key(b64decode(pk.get("rawBytes"), f"{name} key"))
        key_id = b64decode((entry.get("logId") or {}).get("keyId"), f"{name} logId")
        start, end = _window(pk, name)
        out[key_id] = LogKey(key_id, key, start, end)
    return out


def parse_trusted_root(data: bytes, source: str) -> TrustRoot:
    """Parse ``trusted_root.json``; any problem is a MalformedInput naming ``source``."""
    if len(data) > MAX_ROOT_SIZE:
        raise MalformedInput(source, "trusted root is too large")
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("mediaType") != ROOT_MEDIA_TYPE:
            raise ValueError(f"unsupported trusted root mediaType {doc.get('mediaType')!r}")
        cas = []
        for n, ca in enumerate(doc.get("certificateAuthorities") or []):
            raw = ((ca or {}).get("certChain") or {}).get("certificates") or []
            certs = tuple(x509.load_der_x509_certificate(b64decode(c.get("rawBytes"), "CA cert"))
                          for c in raw)
            if not certs:
                raise ValueError(f"certificateAuthorities[{n}] has no certificate")
            start, end = _window(ca, f"certificateAuthorities[{n}]")
            cas.append(CertAuthority(certs, start, end))
        return TrustRoot(_log_keys(doc.get("tlogs"), "tlogs"),
                         _log_keys(doc.get("ctlogs"), "ctlogs"), tuple(cas))
    except (ValueError, TypeError, AttributeError) as exc:
        raise MalformedInput(source, f"bad trusted root: {exc}") from None


@functools.lru_cache(maxsize=8)
def cached_trusted_root(data: bytes, source: str) -> TrustRoot:
    """The same pinned root is parsed once per process (bytes hash is cached by Python)."""
    return parse_trusted_root(data, source)


def verify_with_key(key: Any, signature: bytes, data: bytes) -> None:
    """A log's signature over ``data``, hashed as its key type implies. Raises InvalidSignature."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        algo: hashes.HashAlgorithm = {"secp384r1": hashes.SHA384(),
                                      "secp521r1": hashes.SHA512()}.get(key.curve.name,
                                                                        hashes.SHA256())
        key.verify(signature, data, ec.ECDSA(algo))
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, data)
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise InvalidSignature(f"unsupported log key type {type(key).__name__}")


# -- Fulcio certificates: chain at a time, SCT, usage, identity --------------------------------

OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")  # raw bytes
OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")  # DER UTF8String
OID_OTHERNAME_SAN = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.7")
_EPOCH = datetime(1970, 1, 1)  # cryptography gives SCT times as naive UTC


class CertError(Exception):
    """The signing certificate is unacceptable; ``untrusted`` = no path to a trusted CA."""

    def __init__(self, message: str, untrusted: bool = False) -> None:
        super().__init__(message)
        self.untrusted = untrusted


def verify_fulcio_cert(leaf: x509.Certificate, when: datetime, root: TrustRoot) -> None:
    """Chain ``leaf`` to a Fulcio CA valid at ``when`` (the verified signing time), then check
    the leaf's validity at that time, its embedded SCT and its code-signing usage."""
    from cryptography.x509.verification import (
        Criticality,
        ExtensionPolicy,
        PolicyBuilder,
        Store,
        VerificationError,
    )

    anchors = root.fulcio_at(when)
    if not anchors:
        raise CertError("no Fulcio CA in the trusted root is valid at the signing time", True)
    # Fulcio leaves carry code-signing, not client-auth: relax only the EKU rule.
    eku = x509.ExtendedKeyUsage
    builder = (PolicyBuilder().store(Store(anchors)).time(when).extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca().may_be_present(
            eku, Criticality.NON_CRITICAL, None),
        ee_policy=ExtensionPolicy.webpki_defaults_ee().may_be_present(
            eku, Criticality.NON_CRITICAL, None)))
    if not leaf.not_valid_before_utc <= when <= leaf.not_valid_after_utc:
        raise CertError(f"certificate not valid at signing time {when.isoformat()} "
                        f"(valid {leaf.not_valid_before_utc.isoformat()} to "
                        f"{leaf.not_valid_after_utc.isoformat()})")
    try:
        chain = builder.build_client_verifier().verify(leaf, []).chain
    except (VerificationError, ValueError) as exc:
        raise CertError(f"certificate does not chain to a trusted Fulcio CA: {exc}", True) from None
    _check_usage(leaf)
    _verify_sct(leaf, chain[1], root)


def _check_usage(leaf: x509.Certificate) -> None:
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CertError(f"certificate lacks {exc.oid.dotted_string}") from None
    if not ku.digital_signature or x509.oid.ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise CertError("certificate is not for code signing (KU/EKU)")


def _verify_sct(leaf: x509.Certificate, issuer: x509.Certificate, root: TrustRoot) -> None:
    """RFC 6962 §3.2 precertificate SCT, signed by a CT log key from the trusted root."""
    try:
        scts = leaf.extensions.get_extension_for_class(
            x509.PrecertificateSignedCertificateTimestamps).value
    except x509.ExtensionNotFound:
        raise CertError("certificate has no embedded SCT") from None
    issuer_hash = hashes.Hash(hashes.SHA256())
    issuer_hash.update(issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    issuer_key_hash = issuer_hash.finalize()
    tbs = leaf.tbs_precertificate_bytes
    problems = []
    for sct in scts:
        log = root.ctlogs.get(sct.log_id)
        if log is None:
            problems.append(f"SCT from unknown CT log {sct.log_id.hex()[:16]}")
            continue
        ext = sct.extension_bytes
        millis = (sct.timestamp - _EPOCH) // timedelta(milliseconds=1)  # exact, no float
        signed = (b"\x00\x00" + millis.to_bytes(8, "big") + b"\x00\x01" + issuer_key_hash
                  + len(tbs).to_bytes(3, "big") + tbs + len(ext).to_bytes(2, "big") + ext)
        try:
            verify_with_key(log.public_key, sct.signature, signed)
            return
        except InvalidSignature:
            problems.append("SCT signature invalid")
    raise CertError("; ".join(problems) or "no SCT")


def _der_utf8(raw: bytes) -> str:
    """Decode a DER UTF8String (tag 0x0C, definite length)."""
    if len(raw) < 2 or raw[0] != 0x0C:
        raise ValueError("not a DER UTF8String")
    length, pos = raw[1], 2
    if length & 0x80:
        n = length & 0x7F
        length, pos = int.from_bytes(raw[2:2 + n], "big"), 2 + n
    if pos + length != len(raw):
        raise ValueError("bad DER length")
    return raw[pos:].decode("utf-8")


def cert_identity(cert: x509.Certificate) -> Tuple[List[str], Optional[str]]:
    """(SAN values: email, URI, Sigstore otherName; OIDC issuer from ext 1.8 else 1.1)."""
    sans: List[str] = []
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans += names.get_values_for_type(x509.RFC822Name)
        sans += names.get_values_for_type(x509.UniformResourceIdentifier)
        for other in names.get_values_for_type(x509.OtherName):
            if other.type_id == OID_OTHERNAME_SAN:
                sans.append(_der_utf8(other.value))
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        pass
    issuer = None
    for oid, decode in ((OID_ISSUER_V2, _der_utf8), (OID_ISSUER_V1, bytes.decode)):
        try:
            ext = cert.extensions.get_extension_for_oid(oid).value
            issuer = decode(ext.value)  # type: ignore[attr-defined]
            break
        except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError,
                UnicodeDecodeError):
            continue
    return sans, issuer
