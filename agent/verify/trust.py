"""Build a ``TrustConfig`` from operator options (key files, identity, trusted root, stores)."""

from __future__ import annotations

import json
import os
import re
from typing import List, Sequence

from agent.errors import ExecguardError, InputError, MalformedInput
from agent.fileio import read_small_file
from agent.verify.keys import load_public_key
from agent.verify.model import IdentityRule, TrustConfig, TrustedKey

MAX_TRUSTED_ROOT = 4 << 20  # real trusted_root.json files are ~10 KiB


class TrustOptionsError(ExecguardError):
    """The options contradict each other (a usage error, exit code 2)."""


def _read_trusted_root(path: str) -> bytes:
    data = read_small_file(path, MAX_TRUSTED_ROOT, "a trusted_root.json")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise MalformedInput(path, f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MalformedInput(path, "not a JSON object, so not a trusted root")
    return data


def identity_rule(identity: str | None, identity_regex: str | None,
                  issuer: str | None) -> IdentityRule | None:
    """The keyless signer rule; a SAN without an issuer (or the reverse) is a usage error."""
    if identity is not None and identity_regex is not None:
        raise TrustOptionsError("--identity and --identity-regex are mutually exclusive")
    has_san = identity is not None or identity_regex is not None
    if has_san and issuer is None:
        raise TrustOptionsError("--identity/--identity-regex need --issuer: "
                                "a SAN means nothing without the issuer that vouched for it")
    if issuer is not None and not has_san:
        raise TrustOptionsError("--issuer needs --identity or --identity-regex: "
                                "an issuer alone trusts everyone it ever issued to")
    if issuer is None:
        return None
    if identity_regex is not None:
        try:
            re.compile(identity_regex)
        except re.error as exc:
            raise TrustOptionsError(f"--identity-regex {identity_regex!r}: {exc}") from None
    return IdentityRule(issuer=issuer, san=identity, san_regex=identity_regex)


def build_trust(key_paths: Sequence[str] = (), trusted_root: str | None = None,
                identity: str | None = None, identity_regex: str | None = None,
                issuer: str | None = None, store_dirs: Sequence[str] = ()) -> TrustConfig:
    """Load and check everything now, so a bad option fails before any file is judged."""
    rule = identity_rule(identity, identity_regex, issuer)
    keys: List[TrustedKey] = []
    seen = set()
    for path in key_paths:
        if os.path.isdir(path):
            raise InputError(path, "is a directory, not a public key file")
        key = load_public_key(path)
        if key.fingerprint not in seen:  # the same key twice would only double the work
            seen.add(key.fingerprint)
            keys.append(key)
    for store in store_dirs:
        if not os.path.isdir(store):
            raise InputError(store, "signature store is not a directory"
                             if os.path.exists(store) else "signature store does not exist")
    root = _read_trusted_root(trusted_root) if trusted_root is not None else None
    return TrustConfig(keys=tuple(keys), identities=(rule,) if rule is not None else (),
                       trusted_root=root, trusted_root_source=trusted_root,
                       store_dirs=tuple(store_dirs))
