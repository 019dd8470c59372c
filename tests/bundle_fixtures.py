"""Test material for bundle verification, made by the real npm sigstore client (offline).

``generated()`` builds two Go binaries, runs ``npm ci`` in tests/sigstore_js (skipped when
node_modules already matches package-lock.json) and runs generate.mjs against the binaries.
It is memoised per process so every test module shares one run. Missing node/npm/go fail.
"""

from __future__ import annotations

import atexit
import base64
import copy
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from agent.digest import Artifact
from agent.verify.bundle import verify_bundle
from agent.verify.keys import parse_public_key
from agent.verify.model import IdentityRule, TrustConfig, Verdict

JS_DIR = Path(__file__).resolve().parent / "sigstore_js"
HELLO_GO = 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("%s") }\n'


def _run(cmd: Sequence[str], cwd: Path, env: Optional[Dict[str, str]] = None,
         timeout: int = 300) -> str:
    tool = shutil.which(cmd[0])
    if tool is None:
        raise RuntimeError(f"{cmd[0]} is required for the bundle tests and is not installed")
    proc = subprocess.run([tool, *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def npm_ci() -> None:
    """Install the pinned sigstore-js packages; reuse node_modules when the lock is unchanged."""
    lock = (JS_DIR / "package-lock.json").read_bytes()
    stamp = JS_DIR / "node_modules" / ".execguard-lock-sha256"
    want = hashlib.sha256(lock).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], JS_DIR)
    stamp.write_text(want)


def go_build(workdir: Path, name: str, message: str) -> Path:
    src = workdir / f"{name}.go"
    src.write_text(HELLO_GO % message)
    env = dict(os.environ, GOCACHE=str(workdir / "gocache"), GOPATH=str(workdir / "gopath"),
               GO111MODULE="off", CGO_ENABLED="0")
    _run(["go", "build", "-o", str(workdir / name), str(src)], workdir, env)
    return workdir / name


@dataclass(frozen=True)
class Generated:
    dir: Path
    hello: Path  # the signed Go binary
    other: Path  # a second Go binary (keyless-other-artifact.json signs it)
    identity: str
    issuer: str

    def path(self, name: str) -> Path:
        return self.dir / name

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def doc(self, name: str) -> Dict[str, Any]:
        return dict(json.loads(self.read(name)))

    def trust(self, root: str = "trusted_root.json", keys: Sequence[str] = ("managed.pub",),
              identities: Optional[Sequence[IdentityRule]] = None) -> TrustConfig:
        rules = (tuple(identities) if identities is not None
                 else (IdentityRule(issuer=self.issuer, san=self.identity),))
        return TrustConfig(keys=tuple(parse_public_key(self.read(k), k) for k in keys),
                           identities=rules, trusted_root=self.read(root),
                           trusted_root_source=root)


@functools.cache
def generated() -> Generated:
    work = Path(tempfile.mkdtemp(prefix="execguard-bundles-"))
    atexit.register(shutil.rmtree, work, True)
    hello = go_build(work, "hello", "hello from a signed binary")
    other = go_build(work, "other", "some other binary")
    npm_ci()
    out = work / "out"
    _run(["node", str(JS_DIR / "generate.mjs"), str(out), str(hello), str(other)], JS_DIR)
    manifest = json.loads((out / "manifest.json").read_text())
    return Generated(out, hello, other, manifest["identity"], manifest["issuer"])


def verify_file(path: Path, data: bytes, source: str, trust: TrustConfig) -> Verdict:
    with Artifact.open(str(path)) as artifact:
        return verify_bundle(artifact, data, source, trust)


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def to_legacy(bundle: Dict[str, Any]) -> Dict[str, Any]:
    """cosign legacy ``--bundle`` JSON from a protobuf bundle's parts. Nothing is re-signed: the
    signature, SET, body, integratedTime, logIndex and logID are the npm client's own output;
    only their container changes (certificate as base64 PEM, logID as hex, ints as numbers)."""
    vm = bundle["verificationMaterial"]
    entry = vm["tlogEntries"][0]
    if "publicKey" in vm:
        raise ValueError("managed-key bundles carry no key: pass the PEM to to_legacy_keyed")
    certs = vm.get("x509CertificateChain", {}).get("certificates") or [vm["certificate"]]
    der = base64.b64decode(certs[0]["rawBytes"])
    body = base64.b64decode(entry["canonicalizedBody"])
    # Re-use the exact PEM text the client logged: cosign puts the same PEM in both places.
    pem = base64.b64decode(json.loads(body)["spec"]["signature"]["publicKey"]["content"])
    assert der in base64.b64decode("".join(pem.decode().splitlines()[1:-1]))
    return _legacy(bundle, entry, pem)


def to_legacy_keyed(bundle: Dict[str, Any], public_pem: bytes) -> Dict[str, Any]:
    return _legacy(bundle, bundle["verificationMaterial"]["tlogEntries"][0], public_pem)


def _legacy(bundle: Dict[str, Any], entry: Dict[str, Any], pem: bytes) -> Dict[str, Any]:
    return {
        "base64Signature": bundle["messageSignature"]["signature"],
        "cert": base64.b64encode(pem).decode(),
        "rekorBundle": {
            "SignedEntryTimestamp": entry["inclusionPromise"]["signedEntryTimestamp"],
            "Payload": {
                "body": entry["canonicalizedBody"],
                "integratedTime": int(entry["integratedTime"]),
                "logIndex": int(entry["logIndex"]),
                "logID": base64.b64decode(entry["logId"]["keyId"]).hex(),
            },
        },
    }


def edited(doc: Dict[str, Any], **changes: Any) -> Dict[str, Any]:
    """A deep copy with dotted-path keys replaced (``a__b__0__c`` = doc[a][b][0][c])."""
    out = copy.deepcopy(doc)
    for dotted, value in changes.items():
        parts = dotted.split("__")
        node: Any = out
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


DELETE = object()
