"""Fulcio certificate extensions (OID arc 1.3.6.1.4.1.57264.1): the OIDC claims a keyless
signing certificate carries about the workflow that signed (repository, ref, workflow...).

Names follow Fulcio's ``docs/oid-info.md``. 1.1-1.6 are the deprecated extensions whose value
is the raw UTF-8 text; 1.8 and later hold a DER UTF8String. 1.7 is the otherName SAN type, not
an extension. A value that does not decode is left out, so a policy requiring it fails closed.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from cryptography import x509

ARC = "1.3.6.1.4.1.57264.1."
_RAW = frozenset(range(1, 7))  # deprecated: raw bytes, no DER wrapping

# policy name -> OID; one name per OID
NAMES: Dict[str, str] = {
    "issuer_v1": ARC + "1",
    "github_workflow_trigger": ARC + "2",
    "github_workflow_sha": ARC + "3",
    "github_workflow_name": ARC + "4",
    "github_workflow_repository": ARC + "5",
    "github_workflow_ref": ARC + "6",
    "issuer": ARC + "8",
    "build_signer_uri": ARC + "9",
    "build_signer_digest": ARC + "10",
    "runner_environment": ARC + "11",
    "source_repository_uri": ARC + "12",
    "source_repository_digest": ARC + "13",
    "source_repository_ref": ARC + "14",
    "source_repository_identifier": ARC + "15",
    "source_repository_owner_uri": ARC + "16",
    "source_repository_owner_identifier": ARC + "17",
    "build_config_uri": ARC + "18",
    "build_config_digest": ARC + "19",
    "build_trigger": ARC + "20",
    "run_invocation_uri": ARC + "21",
    "source_repository_visibility_at_signing": ARC + "22",
}
OIDS: Dict[str, str] = {oid: name for name, oid in NAMES.items()}

Extensions = Tuple[Tuple[str, str], ...]  # (dotted OID, value), sorted by OID


def oid_for(key: str) -> Optional[str]:
    """The OID a policy key names: a name from ``NAMES`` or a dotted OID in the arc."""
    if key in NAMES:
        return NAMES[key]
    if key.startswith(ARC):
        tail = key[len(ARC):]
        if tail.isdigit() and tail == str(int(tail)) and int(tail) != 7:
            return key
    return None


def name_of(oid: str) -> str:
    return OIDS.get(oid, oid)


def _der_utf8(data: bytes) -> Optional[str]:
    """The text of a DER UTF8String (tag 12) that fills ``data`` exactly, else None."""
    if len(data) < 2 or data[0] != 0x0C:
        return None
    first = data[1]
    if first < 0x80:
        size, start = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            return None
        size, start = int.from_bytes(data[2:2 + count], "big"), 2 + count
        if size < 0x80 or data[2] == 0:  # not the minimal (DER) length form
            return None
    if start + size != len(data):
        return None
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def fulcio_extensions(cert: x509.Certificate) -> Extensions:
    """Every decodable extension of the Fulcio arc in ``cert``."""
    out: Dict[str, str] = {}
    try:
        extensions = list(cert.extensions)
    except (ValueError, x509.DuplicateExtension):  # not a ValueError in cryptography 50
        # a malformed or repeated extension: nothing is provable from them
        return ()
    for ext in extensions:
        oid = ext.oid.dotted_string
        if not oid.startswith(ARC) or oid_for(oid) is None:
            continue
        raw = ext.value
        data = raw.value if isinstance(raw, x509.UnrecognizedExtension) else None
        if data is None:
            continue
        number = int(oid[len(ARC):])
        if number in _RAW:
            try:
                text: Optional[str] = data.decode("utf-8")
            except UnicodeDecodeError:
                text = None
        else:
            text = _der_utf8(data)
        if text is not None and "\x00" not in text:
            out[oid] = text
    return tuple(sorted(out.items(), key=lambda kv: [int(p) for p in kv[0].split(".")]))
