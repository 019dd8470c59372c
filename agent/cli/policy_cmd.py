"""``execguard policy``: build, sign, verify, diff and apply signed policy bundles."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import Any, Dict

from agent.cli.exits import EXIT_ERROR, EXIT_NO_AGENT, EXIT_OK
from agent.cli.exits import EXIT_NO as EXIT_REJECTED
from agent.errors import ExecguardError

DEFAULT_KEYS = "/etc/execguard/keys/policy"
DEFAULT_DROP = "/etc/execguard/policy.d"

_REASONS = ("ok (applied/would apply), threshold (too few distinct pinned signers; keys not "
            "pinned do not count), bad-signature (a pinned key's signature does not verify: "
            "e.g. a tampered payload), malformed, rollback (version not above the minimum), "
            "expired. When several apply the first in the order malformed envelope, "
            "bad-signature, threshold, malformed content, rollback, expired wins.")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "policy", help="build, sign, verify, diff and apply signed policy bundles",
        description="A policy bundle is a DSSE envelope holding a policy, its version, its "
        "validity window and the public keys and trusted root it trusts, so hosts verify it "
        "offline. Hosts apply it only when enough pinned policy keys signed it, its version "
        "is above the one in force and it has not expired (docs/bundles.md).")
    verbs = p.add_subparsers(dest="policy_verb", metavar="ACTION")
    verbs.required = True

    b = verbs.add_parser("build", help="make an unsigned bundle from a policy file",
                         description="Validate SRC as a host would, embed the public keys "
                         "its trust.keys and signers resolve to here, and its trusted root, "
                         "and write the unsigned bundle. Exit 0, or 2 on any error.")
    b.add_argument("source", metavar="SRC", help="policy file (TOML or JSON)")
    b.add_argument("-o", "--output", required=True, metavar="BUNDLE")
    b.add_argument("--version", type=int, metavar="N",
                   help="bundle (and policy) version; default: the policy's own version")
    b.add_argument("--expires", default="90d", metavar="WHEN",
                   help="30d, 12h, 2w after issued-at, or an ISO-8601 time (default 90d)")
    b.add_argument("--issued-at", metavar="TIME", help="ISO-8601 time (default: now)")
    b.add_argument("--force", action="store_true", help="replace an existing BUNDLE")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=run_build)

    s = verbs.add_parser("sign", help="add a signature to a bundle",
                         description="Sign BUNDLE's payload with a private key (cosign "
                         "encrypted or PEM). Several signers may sign one bundle; signing "
                         "again with the same key replaces its signature. The file is "
                         "replaced atomically. Exit 0, or 2 on any error.")
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument("--key", required=True, metavar="PRIV")
    s.add_argument("--password-env", metavar="VAR", default="COSIGN_PASSWORD",
                   help="environment variable holding the key's password (default "
                   "COSIGN_PASSWORD; asked on the terminal when unset)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run_sign)

    v = verbs.add_parser("verify", help="would a host apply this bundle?",
                         description="Check BUNDLE against the pinned policy keys in DIR. "
                         "Exit 0 when a host would apply it, 1 when it would refuse it, 2 on "
                         "an error (unreadable key directory, impossible threshold). Reasons: "
                         + _REASONS)
    v.add_argument("bundle", metavar="BUNDLE")
    # the names `execguard run` and `policy whatif` use; --keys and --threshold still work
    v.add_argument("--policy-keys", "--keys", dest="keys", default=DEFAULT_KEYS, metavar="DIR",
                   help=f"pinned policy root keys, *.pub/*.pem (default {DEFAULT_KEYS})")
    v.add_argument("--policy-threshold", "--threshold", dest="threshold", type=_positive,
                   default=1, metavar="M",
                   help="distinct pinned keys that must have signed (default 1)")
    v.add_argument("--min-version", type=int, metavar="N",
                   help="refuse versions below N (rollback); a host uses its applied + 1")
    v.add_argument("--at", metavar="TIME", help="judge expiry at this ISO-8601 time")
    v.add_argument("--json", action="store_true")
    v.set_defaults(run=run_verify)

    lint = verbs.add_parser("lint", help="load a policy file as the agent would; print its "
                            "warnings",
                            description="Validate SRC (a policy file; the embedded default "
                            "when omitted) exactly as 'execguard run' loads it, with --mode "
                            "applied as the run flag would, and print every warning: among "
                            "them each rule or fallthrough through which an enforce policy "
                            "lets executables run without a signature. Exit 0 valid and no "
                            "warnings, 1 valid with warnings, 2 invalid or unreadable.")
    lint.add_argument("source", metavar="SRC", nargs="?",
                      help="policy file (TOML or JSON); default: the embedded default policy")
    lint.add_argument("--mode", choices=("monitor", "enforce"),
                      help="as 'execguard run --mode' (overrides the policy's mode)")
    lint.add_argument("--json", action="store_true")
    lint.set_defaults(run=run_lint)

    d = verbs.add_parser("diff", help="what changes from A to B (bundles or policy files)",
                         description="Rule-level difference: rules added, removed and "
                         "changed by id, order, mode/scopes/trust and other fields, and for "
                         "bundles version, validity and embedded keys. Signatures are not "
                         "checked (use verify). Exit 0 when equal, 1 when they differ, 2 on "
                         "an error.")
    d.add_argument("a", metavar="A")
    d.add_argument("b", metavar="B")
    d.add_argument("--json", action="store_true")
    d.set_defaults(run=run_diff)

    a = verbs.add_parser("apply", help="send a bundle to the running agent",
                         description="The agent verifies BUNDLE with its pinned policy keys "
                         "and threshold and applies it atomically, or refuses it and keeps "
                         "the current policy. Exit 0 applied, 1 refused, 2 on an error (no "
                         "agent answering, unreadable file). Reasons: " + _REASONS)
    a.add_argument("bundle", metavar="BUNDLE")
    a.add_argument("--state-dir", metavar="DIR",
                   help="the agent's state directory (socket DIR/control.sock)")
    a.add_argument("--socket", metavar="PATH", help="control socket (overrides --state-dir)")
    a.add_argument("--timeout", type=float, default=30.0, metavar="S")
    a.add_argument("--json", action="store_true")
    a.set_defaults(run=run_apply)

    from agent.cli import whatif_cmd  # replay the decision log against a candidate

    whatif_cmd.add_subparser(verbs)


def _fail(args: argparse.Namespace, verb: str, exc: Exception, code: int = EXIT_ERROR) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": str(exc)}))
    else:
        print(f"execguard policy {verb}: {exc}", file=sys.stderr)
    return code


def run_build(args: argparse.Namespace) -> int:
    from agent.policy.bundle import build_bundle, format_time, parse_expiry, parse_time
    from agent.signing import write_file

    try:
        issued = parse_time(args.issued_at) if args.issued_at else datetime.now(timezone.utc)
        issued = issued.replace(microsecond=0)
        expires = parse_expiry(args.expires, issued)
        env, bundle, snap = build_bundle(args.source, args.version, issued, expires)
        write_file(args.output, env.to_bytes(), 0o644, args.force)
    except (ExecguardError, ValueError) as exc:
        return _fail(args, "build", exc)
    except FileExistsError:
        return _fail(args, "build", ExecguardError(f"{args.output}: exists (use --force)"))
    except OSError as exc:
        return _fail(args, "build", ExecguardError(f"{args.output}: {exc.strerror or exc}"))
    out = {"bundle": args.output, "version": bundle.version, "digest": bundle.digest,
           "policy_digest": snap.digest, "issued_at": format_time(bundle.issued_at),
           "expires": format_time(bundle.expires), "keys": bundle.fingerprints(),
           "warnings": list(snap.warnings)}
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"{args.output}: unsigned bundle v{bundle.version} {bundle.digest}, expires "
              f"{out['expires']}, {len(out['keys'])} embedded key(s); sign it with "
              f"'execguard policy sign {args.output} --key KEY'")
        for w in snap.warnings:
            print(f"WARNING: {w}", file=sys.stderr)
    return EXIT_OK


def run_sign(args: argparse.Namespace) -> int:
    import getpass

    from agent import signing
    from agent.policy.bundle import parse_envelope_bytes, read_bundle_file
    from agent.policy.rollback import write_atomic

    def password() -> bytes:
        value = os.environ.get(args.password_env)
        if value is not None:
            return value.encode()
        return getpass.getpass(f"Enter password for {args.key}: ").encode()

    try:
        env = parse_envelope_bytes(read_bundle_file(args.bundle), args.bundle)
        try:
            with open(args.key, "rb") as fh:
                key_bytes = fh.read(1 << 20)
        except OSError as exc:
            raise ExecguardError(f"{args.key}: {exc.strerror or exc}") from None
        key = signing.load_private_key(key_bytes, args.key, password)
        signed = env.signed_by(key)
        path = os.path.abspath(args.bundle)
        write_atomic(path, signed.to_bytes(), 0o644)
    except ExecguardError as exc:
        return _fail(args, "sign", exc)
    except OSError as exc:
        return _fail(args, "sign", ExecguardError(f"{args.bundle}: {exc.strerror or exc}"))
    keyid = signed.signatures[-1].keyid
    if args.json:
        print(json.dumps({"bundle": args.bundle, "keyid": keyid,
                          "signatures": [s.keyid for s in signed.signatures]}))
    else:
        print(f"{args.bundle}: signed by {keyid} ({len(signed.signatures)} signature(s))")
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    from agent.policy.bundle import parse_time, read_bundle_file
    from agent.policy.bundle_verify import check_bundle, check_threshold, load_pinned

    try:
        now = parse_time(args.at) if args.at else datetime.now(timezone.utc)
        pinned = load_pinned(args.keys)
        check_threshold(args.threshold, pinned, f"--policy-keys {args.keys}")
        data = read_bundle_file(args.bundle)
    except (ExecguardError, ValueError) as exc:
        return _fail(args, "verify", exc)
    check, snap = check_bundle(data, args.bundle, pinned, args.threshold, now,
                               args.min_version)
    out = check.to_json()
    warnings = list(snap.warnings) if snap is not None else []
    if args.json:
        print(json.dumps({**out, "warnings": warnings}, sort_keys=True))
    else:
        verdict = "OK" if check.accepted else f"REJECTED ({check.reason.value})"
        print(f"{args.bundle}: {verdict}: {check.detail}")
        if out["version"] is not None:
            print(f"  version {out['version']}, digest {out['digest']}, "
                  f"expires {out['expires']}")
        for kind in ("valid", "invalid", "unknown"):
            for keyid in out["signers"][kind]:
                print(f"  signer {kind}: {keyid}")
        for w in warnings:  # the policy it carries, as a host would load it
            print(f"WARNING: {w}", file=sys.stderr)
    return EXIT_OK if check.accepted else EXIT_REJECTED


def run_lint(args: argparse.Namespace) -> int:
    from agent.policy import apply_overrides, default_policy, load_policy

    try:
        base = load_policy(args.source) if args.source else default_policy()
        snap = apply_overrides(base, mode=args.mode)
    except ExecguardError as exc:
        return _fail(args, "lint", exc)
    if args.json:
        print(json.dumps({"policy": snap.source, "mode": snap.mode.value,
                          "digest": snap.digest, "warnings": list(snap.warnings)},
                         sort_keys=True))
    else:
        for w in snap.warnings:
            print(f"{snap.source}: WARNING: {w}")
        if not snap.warnings:
            print(f"{snap.source}: OK ({snap.mode.value} mode, no warnings)")
    return EXIT_REJECTED if snap.warnings else EXIT_OK


def run_diff(args: argparse.Namespace) -> int:
    from agent.policy.diff import diff, load_side, render

    try:
        result = diff(load_side(args.a), load_side(args.b))
    except ExecguardError as exc:
        return _fail(args, "diff", exc)
    print(json.dumps(result, sort_keys=True) if args.json else render(result))
    return EXIT_REJECTED if result["changed"] else EXIT_OK


def run_apply(args: argparse.Namespace) -> int:
    from agent.control import ControlError, client_socket, request

    path = os.path.abspath(args.bundle)
    if not os.path.isfile(path):
        return _fail(args, "apply", ExecguardError(f"{args.bundle}: no such bundle file"))
    try:
        reply = request(client_socket(args.socket, args.state_dir), "policy-apply",
                        timeout=args.timeout, bundle=path)
    except ControlError as exc:
        return _fail(args, "apply", exc, EXIT_NO_AGENT)
    if "error" in reply:
        return _fail(args, "apply", ExecguardError(str(reply["error"])))
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    else:
        verdict = "applied" if reply.get("applied") else f"REFUSED ({reply.get('reason')})"
        print(f"{args.bundle}: {verdict}: version {reply.get('version')} (was "
              f"{reply.get('old_version')}): {reply.get('detail')}")
    return EXIT_OK if reply.get("applied") else EXIT_REJECTED


# -- `execguard run` flags --------------------------------------------------------------
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy-keys", default=DEFAULT_KEYS, metavar="DIR",
                   help=f"pinned policy root keys for signed bundles (default {DEFAULT_KEYS})")
    p.add_argument("--policy-threshold", type=_positive, default=1, metavar="M",
                   help="distinct pinned keys that must sign a bundle (default 1)")
    p.add_argument("--policy-drop-dir", default=DEFAULT_DROP, metavar="DIR",
                   help="SIGHUP (and start) applies the newest valid bundle found here "
                   f"(default {DEFAULT_DROP})")
    p.add_argument("--policy-expiry-warning", type=_duration, default=7 * 86400.0,
                   metavar="DURATION",
                   help="warn this long before the bundle in force expires (default 7d)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _duration(text: str) -> float:
    from agent.policy.bundle import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The RunOptions fields these flags set."""
    return {"policy_keys": args.policy_keys, "policy_threshold": args.policy_threshold,
            "policy_drop_dir": args.policy_drop_dir,
            "policy_expiry_warning": args.policy_expiry_warning}
