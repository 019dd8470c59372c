"""Hand-written decision records and real keys for the what-if tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from agent import signing
from agent.decision import Decision, Enforcement, ExecEvent, FileIdentity, Source
from agent.errors import Reason
from agent.verify.keys import load_public_key
from agent.verify.model import Evidence, SignatureKind

APP = "/srv/app/bin/app"
DIGEST = "sha256:" + "cd" * 32
GO = {"go_version": "go1.19.8", "path": "example.com/app", "module": "example.com/app",
      "version": "(devel)", "vcs.modified": None}
ISSUER = "https://token.actions.githubusercontent.com"
SAN = "https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1"


def keypair(tmp: Path, name: str) -> Tuple[Any, str, str]:
    """(private key, public PEM path, fingerprint)."""
    key = signing.generate()
    pub = tmp / f"{name}.pub"
    pub.write_bytes(signing.public_pem(key.public_key()))
    return key, str(pub), load_public_key(str(pub)).fingerprint


def record(path: str = APP, *, allow: bool = True, reason: Reason = Reason.OK,
           uid: int = 1000, sha256: Optional[str] = "ab" * 32,
           evidence: Optional[Evidence] = None, go: Optional[Dict[str, Any]] = GO,
           rule_id: Optional[str] = "go-signed", digest: Optional[str] = DIGEST,
           source: Source = Source.VERIFY, detail: str = "recorded", n: int = 0,
           size: int = 2_000_000, ident: Optional[FileIdentity] = None) -> Decision:
    event = ExecEvent(pid=100 + n, ppid=1, uid=uid, auid=uid, comm="app", path=path,
                      identity=ident or FileIdentity(os.makedev(254, 1), 77, 1_700_000_000,
                                                     size),
                      timestamp_ns=1_795_000_000_000_000_000 + n * 1_000_000_000,
                      backend="fanotify-exec")
    return Decision(event, allow, reason, detail,
                    Enforcement.NONE if allow else Enforcement.MONITOR, source, sha256,
                    evidence, rule_id, 1, digest, go, 10)


def by_key(fp: str, source: str = APP + ".sig") -> Evidence:
    return Evidence(SignatureKind.COSIGN_SIG, source, key_fingerprint=fp)



