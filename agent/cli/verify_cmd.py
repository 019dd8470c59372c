"""``execguard verify FILE``: is this file signed by someone the given trust accepts?"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Dict

from agent.cli.exits import EXIT_ERROR, EXIT_OK
from agent.cli.exits import EXIT_NO as EXIT_UNTRUSTED
from agent.digest import Artifact
from agent.errors import ExecguardError, MalformedInput, NotGoBinary
from agent.verify import verify_artifact
from agent.verify.keys import describe_key
from agent.verify.model import TrustConfig, Verdict
from agent.verify.trust import build_trust


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "verify", help="check a file's cosign/Sigstore signature against trusted keys/identities",
        description="Verify FILE offline. Signatures are found beside it (FILE.sig, "
        "FILE.sigstore.json, FILE.bundle) and in --store directories (<sha256>.sig, ...), "
        "unless --signature/--bundle name one. Exit 0 trusted, 1 untrusted, 2 error.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key", action="append", default=[], metavar="PEM",
                   help="trusted public key (PEM); repeatable")
    p.add_argument("--signature", metavar="SIG", help="cosign .sig file (disables discovery)")
    p.add_argument("--bundle", metavar="FILE",
                   help="Sigstore or cosign bundle (disables discovery)")
    p.add_argument("--trusted-root", metavar="JSON", help="trusted_root.json for keyless bundles")
    # --identity and --identity-regex exclude each other; checked in build_trust so that
    # the error is JSON under --json
    p.add_argument("--identity", metavar="SAN", help="keyless signer identity (exact SAN)")
    p.add_argument("--identity-regex", metavar="RE", help="keyless signer identity (regex)")
    p.add_argument("--issuer", metavar="URL", help="OIDC issuer the identity must come from")
    p.add_argument("--store", action="append", default=[], metavar="DIR",
                   help="signature store directory (files named by sha256); repeatable")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def go_info(artifact: Artifact) -> Dict[str, Any] | None:
    """Build info JSON, None when not Go, an error object when it is malformed, or the Go
    runtime evidence when a Go binary has no build info (as the agent reads it)."""
    try:
        module = importlib.import_module("agent.goinfo")
        read_buildinfo = module.read_buildinfo
    except (ImportError, AttributeError):
        return None  # the Go parser is not part of this build
    try:
        info = read_buildinfo(artifact)
    except NotGoBinary:
        found = module.inspect_go(artifact)
        if found.runtime is None:
            return {"error": found.detail} if found.is_go else None
        return {"is_go": True, "evidence": "runtime", "go_version": None,
                "detail": found.detail, "runtime": found.runtime.to_json()}
    except MalformedInput as exc:
        return {"error": str(exc)}
    result = info.to_json()
    return result if isinstance(result, dict) else None


def to_json(artifact: Artifact, verdict: Verdict) -> Dict[str, Any]:
    return {
        "file": artifact.path,
        "sha256": artifact.sha256.hex(),
        "size": artifact.size,
        "verdict": "trusted" if verdict.trusted else "untrusted",
        "reason": verdict.reason.value,
        "detail": verdict.detail,
        "signature": verdict.evidence.to_json() if verdict.evidence else None,
        "attempts": [{"source": a.evidence.source if a.evidence else None,
                      "kind": a.evidence.kind.value if a.evidence else None,
                      "reason": a.reason.value, "detail": a.detail} for a in verdict.attempts],
        "go": go_info(artifact),
    }


def _signer(verdict: Verdict, trust: TrustConfig) -> str:
    ev = verdict.evidence
    if ev is None:
        return ""
    if not verdict.trusted:
        return f"{ev.kind.value} {ev.source}"
    if ev.key_fingerprint:
        who = ev.key_fingerprint[:19] + "…"
        for key in trust.keys:
            if key.fingerprint == ev.key_fingerprint:
                who += f" ({describe_key(key.public_key)})"
    elif ev.identity:
        who = f"{ev.identity} ({ev.issuer})"
    else:
        return ev.kind.value
    return f"{ev.kind.value} by {who}"


def human(artifact: Artifact, verdict: Verdict, trust: TrustConfig) -> str:
    head = "TRUSTED" if verdict.trusted else "UNTRUSTED"
    lines = [f"{head}  {artifact.path}  {_signer(verdict, trust)}".rstrip(),
             f"reason: {verdict.reason.value}: {verdict.detail}"]
    for attempt in verdict.attempts:
        if attempt.trusted:
            continue
        source = attempt.evidence.source if attempt.evidence else "?"
        detail = "" if attempt.detail == verdict.detail else f": {attempt.detail}"
        lines.append(f"  {source}: {attempt.reason.value}{detail}")
    return "\n".join(lines)


def fail(args: argparse.Namespace, message: str) -> int:
    if args.json:
        print(json.dumps({"error": message}))
    else:
        print(f"execguard verify: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def run(args: argparse.Namespace) -> int:
    try:
        trust = build_trust(args.key, args.trusted_root, args.identity, args.identity_regex,
                            args.issuer, args.store)
        with Artifact.open(args.file) as artifact:
            verdict = verify_artifact(artifact, trust, args.signature, args.bundle)
            out = (json.dumps(to_json(artifact, verdict), indent=2) if args.json
                   else human(artifact, verdict, trust))
    except ExecguardError as exc:
        return fail(args, str(exc))
    print(out)
    return EXIT_OK if verdict.trusted else EXIT_UNTRUSTED
