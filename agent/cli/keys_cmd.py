"""``execguard keygen`` and ``execguard sign``: cosign-compatible keys and ``.sig`` files."""

from __future__ import annotations

import argparse
import base64
import getpass
import os
import sys
from typing import Any

from agent import signing
from agent.cli.exits import EXIT_ERROR, EXIT_OK
from agent.digest import Artifact
from agent.errors import ExecguardError
from agent.fileio import read_small_file
from agent.verify import keys
from agent.verify.bundle import build_key_bundle


def add_parser(sub: Any) -> None:
    k = sub.add_parser(
        "keygen", help="generate a cosign-compatible key pair (PREFIX.key, PREFIX.pub)",
        description="Write PREFIX.key (cosign 'ENCRYPTED SIGSTORE PRIVATE KEY', password "
        "from COSIGN_PASSWORD or asked twice; empty is allowed) and PREFIX.pub (PEM).")
    k.add_argument("--output-prefix", default="cosign", metavar="PATH")
    k.add_argument("--algorithm", default="ecdsa-p256", choices=signing.ALGORITHMS)
    k.add_argument("--no-password", action="store_true",
                   help="write an unencrypted PKCS#8 PEM private key")
    k.add_argument("--force", action="store_true", help="overwrite existing key files")
    k.set_defaults(run=run_keygen)

    s = sub.add_parser(
        "sign", help="sign a file like 'cosign sign-blob --key' (writes FILE.sig)",
        description="Write FILE.sig: base64 of the signature over FILE's bytes, as cosign "
        "sign-blob --key does. Encrypted keys take their password from COSIGN_PASSWORD "
        "or a prompt.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--key", required=True, metavar="PRIV", help="private key (cosign or PEM)")
    s.add_argument("--output-signature", metavar="PATH", help="default FILE.sig")
    s.add_argument("--bundle", nargs="?", const="", default=None, metavar="PATH",
                   help="also write a managed-key Sigstore bundle (default FILE.sigstore.json)")
    s.set_defaults(run=run_sign)


def _err(verb: str, message: str) -> int:
    print(f"execguard {verb}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _new_password() -> bytes:
    env = os.environ.get("COSIGN_PASSWORD")
    if env is not None:
        return env.encode()
    first = getpass.getpass("Enter password for private key: ")
    if getpass.getpass("Enter password for private key again: ") != first:
        raise ExecguardError("passwords do not match")
    return first.encode()


def _password() -> bytes:
    env = os.environ.get("COSIGN_PASSWORD")
    if env is not None:
        return env.encode()
    return getpass.getpass("Enter password for private key: ").encode()


def run_keygen(args: argparse.Namespace) -> int:
    priv_path, pub_path = args.output_prefix + ".key", args.output_prefix + ".pub"
    if not args.force:
        for path in (priv_path, pub_path):
            if os.path.lexists(path):
                return _err("keygen", f"{path}: already exists (use --force to overwrite)")
    try:
        key = signing.generate(args.algorithm)
        priv = (signing.plain_private_pem(key) if args.no_password
                else signing.encrypt_private_key(key, _new_password()))
        signing.write_file(priv_path, priv, 0o600, args.force)
        signing.write_file(pub_path, signing.public_pem(key.public_key()), 0o644, args.force)
    except FileExistsError as exc:
        return _err("keygen", f"{exc.args[0]}: already exists (use --force to overwrite)")
    except OSError as exc:
        return _err("keygen", f"{exc.filename or args.output_prefix}: {exc.strerror or exc}")
    except ExecguardError as exc:
        return _err("keygen", str(exc))
    print(f"Private key written to {priv_path}\nPublic key written to {pub_path}",
          file=sys.stderr)
    return EXIT_OK


def _read_key(path: str) -> bytes:
    return read_small_file(path, signing.MAX_PRIVATE_KEY_FILE, "a private key")


def run_sign(args: argparse.Namespace) -> int:
    bundle_path = None if args.bundle is None else (args.bundle or args.file + ".sigstore.json")
    out_path = bundle_path or args.output_signature or args.file + ".sig"
    try:
        key = signing.load_private_key(_read_key(args.key), args.key, _password)
        with Artifact.open(args.file) as artifact:
            raw = signing.sign_artifact(key, artifact)
            if bundle_path is None:
                output = base64.b64encode(raw)
            else:  # the bundle records the digest the signature was made over
                hash_name = keys.candidate_hashes(key.public_key())[0] or "sha256"
                output = build_key_bundle(artifact.digest(hash_name), raw, key.public_key(),
                                          hash_name)
        signing.write_file(out_path, output, 0o644, force=True)
    except ExecguardError as exc:
        return _err("sign", str(exc))
    except OSError as exc:
        return _err("sign", f"{exc.filename or out_path}: {exc.strerror or exc}")
    print(f"{'Bundle' if bundle_path else 'Signature'} written to {out_path}", file=sys.stderr)
    return EXIT_OK
