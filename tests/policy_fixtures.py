"""Real material for the policy tests: Go binaries built here, OpenSSL keys and ``.sig`` files.

Built once per session. Signatures are made by the OpenSSL CLI (not our signing code), in
cosign's ``.sig`` form: base64 of a DER ECDSA signature over the file's SHA-256.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import pytest

from agent.digest import Artifact
from agent.goinfo import BuildInfo, parse_bytes
from agent.verify import verify_artifact
from agent.verify.model import TrustConfig, Verdict
from tests.goinfo_fixtures import GO, _go_env, run

APP_GO = 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("app") }\n'
TOOL_GO = ('package main\n\nimport (\n\t"fmt"\n\n\t"example.com/lib"\n)\n\n'
           "func main() { fmt.Println(lib.Name()) }\n")
LIB_GO = 'package lib\n\nfunc Name() string { return "lib" }\n'


@dataclass(frozen=True)
class GoBin:
    path: Path
    info: BuildInfo


@dataclass(frozen=True)
class Material:
    bins: Dict[str, GoBin]  # app (vcs clean), app-dirty (vcs.modified=true), tool (with a dep)
    keys: Dict[str, Path]  # name -> public key PEM ("a", "b")
    private: Dict[str, Path]
    script: Path  # a non-Go executable


def sign(path: Path, private_pem: Path) -> Path:
    """Write ``path.sig`` with OpenSSL: base64(DER ECDSA P-256 over sha256(file))."""
    der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(private_pem), str(path)],
                         check=True, capture_output=True).stdout
    sig = Path(str(path) + ".sig")
    sig.write_bytes(base64.b64encode(der))
    return sig


def verifier(path: Path):  # type: ignore[no-untyped-def]
    """A ``verify_fn`` for ``decide``: the real offline verifier over the file at ``path``."""
    def verify(trust: TrustConfig) -> Verdict:
        with Artifact.open(str(path)) as art:
            return verify_artifact(art, trust)
    return verify


def _git(repo: Path, *args: str) -> None:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": str(repo),
           "PATH": "/usr/bin:/bin"}
    run(["git", *args], cwd=repo, env=env)


def _build(base: Path) -> Dict[str, GoBin]:
    src, out = base / "src", base / "bin"
    out.mkdir(parents=True)
    app, lib, tool = src / "app", src / "lib", src / "tool"
    for d, mod, files in (
        (app, "example.com/app", {"main.go": APP_GO}),
        (lib, "example.com/lib", {"lib.go": LIB_GO}),
        (tool, "example.com/tool", {"main.go": TOOL_GO}),
    ):
        d.mkdir(parents=True)
        extra = ("\nrequire example.com/lib v0.3.1\n\nreplace example.com/lib v0.3.1 => ../lib\n"
                 if d == tool else "")
        (d / "go.mod").write_text(f"module {mod}\n\ngo 1.19\n{extra}")
        for name, text in files.items():
            (d / name).write_text(text)

    def build(name: str, cwd: Path) -> None:
        run([GO, "build", "-o", str(out / name), "."], cwd=cwd, env=_go_env(base))

    _git(app, "init", "-q")
    _git(app, "add", ".")
    _git(app, "commit", "-q", "-m", "init")
    build("app", app)
    (app / "main.go").write_text(APP_GO + "\n// uncommitted edit\n")
    build("app-dirty", app)
    build("tool", tool)
    return {name: GoBin(out / name, parse_bytes((out / name).read_bytes(), name))
            for name in ("app", "app-dirty", "tool")}


_CACHE: Dict[str, Material] = {}


@pytest.fixture(scope="session", name="material")
def material_fixture(tmp_path_factory: pytest.TempPathFactory) -> Material:
    if "m" not in _CACHE:
        base = tmp_path_factory.mktemp("policy")
        bins = _build(base)
        keys, private = {}, {}
        for name in ("a", "b"):
            priv, pub = base / f"{name}.pem", base / f"{name}.pub"
            run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-out", str(priv)])
            run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)])
            keys[name], private[name] = pub, priv
        script = base / "script.sh"
        script.write_text("#!/bin/sh\necho hi\n")
        script.chmod(0o755)
        _CACHE["m"] = Material(bins, keys, private, script)
    return _CACHE["m"]


def copy_signed(bin_: GoBin, dest: Path, key: Optional[Path]) -> Path:
    """A copy of a Go binary in ``dest``, signed by ``key`` (unsigned when None)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / bin_.path.name
    shutil.copy2(bin_.path, target)
    if key is not None:
        sign(target, key)
    # settled, as a deployed file is: the agent does not cache a verdict for a file changed
    # within the last clock ticks (agent/decide.py SETTLE_NS), and tests count cache hits
    time.sleep(0.03)
    return target
