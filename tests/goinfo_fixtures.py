"""Real Go binaries for the goinfo tests: local builds, Debian packages, old esbuild releases.

Everything is built or downloaded once per session under a pytest tmp dir (module-level
cache, so several test modules share it). Missing go/apt-get/npm fail loudly: no skips.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

GO = shutil.which("go") or "/usr/bin/go"
HUGE_X = "a" * 70_000  # makes modinfo larger than go1.19's 64 KiB window

MAIN_GO = """package main

import (
	"fmt"
	"os"
	"runtime/debug"
)

var big string

func main() {
	if len(os.Args) > 1 && os.Args[1] == "buildinfo" {
		bi, ok := debug.ReadBuildInfo()
		if !ok {
			os.Exit(3)
		}
		fmt.Print(bi.String())
		return
	}
	fmt.Println("hello", len(big))
}
"""
CGO_GO = """package main

// static int answer(void) { return 42; }
import "C"

func answer() int { return int(C.answer()) }
"""
WITHDEP_GO = """package main

import (
	"fmt"

	"example.com/lib"
)

func main() { fmt.Println(lib.Name()) }
"""
# Debian bookworm packages that ship small Go programs (see docs/goinfo.md).
DEBIAN = {"age": "usr/bin/age", "shfmt": "usr/bin/shfmt", "gron": "usr/bin/gron"}
# Go programs built without modules (GOPATH mode, go1.15, dh-golang): Debian bullseye's,
# fetched from Debian's archive by pool path and pinned by the SHA-256 its Packages index
# gives (the host's apt sources are bookworm's and stay as they are). Their build info
# has a version and a zero runtime.modinfo in .bss.
DEBIAN_OLD = {
    "fzf": ("pool/main/f/fzf/fzf_0.24.3-1+b6_amd64.deb", "usr/bin/fzf", "go1.15.9",
            "15912ab0d9d2963c116573a5b438395f3153d4a1682b0ff7b47cc764c0cf578c"),
}
DEBIAN_ARCHIVE = "http://deb.debian.org/debian/"
# npm packages that ship pre-1.18 Go binaries (pointer-format build info).
ESBUILD = {
    "esbuild-linux-64@0.8.0": "go1.15",
    "esbuild-linux-64@0.14.0": "go1.17.2",
    "esbuild-linux-32@0.13.0": "go1.17.1",
}
# A go1.20+ build (pclntab magic 0xfffffff1): Debian 12's go1.19 cannot make one.
MODERN_ESBUILD = {"@esbuild/linux-x64@0.24.0": "go1.23.1"}
BUILDINFO_MAGIC = b"\xff Go buildinf:"
C_HELLO = '#include <stdio.h>\nint main(void) { puts("c says hi"); return 0; }\n'
C_LIB = "int answer(void) { return 42; }\n"


def run(
    cmd: List[str],
    cwd: Optional[Path] = None,
    env: Optional[Dict[str, str]] = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        errors="surrogateescape",
    )
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def go_version_m(path: Path) -> Tuple[str, str]:
    """(stdout, stderr) of the reference: the host's ``go version -m``."""
    proc = subprocess.run(
        [GO, "version", "-m", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        errors="surrogateescape",
        env=_go_env(path.parent),
    )
    return proc.stdout, proc.stderr


def strip_section_headers(src: Path, dst: Path) -> Path:
    """Copy with e_shoff, e_shnum and e_shstrndx zeroed, as sstrip leaves a file."""
    data = bytearray(src.read_bytes())
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:
        struct.pack_into(order + "Q", data, 0x28, 0)
        struct.pack_into(order + "HH", data, 0x3C, 0, 0)
    else:
        struct.pack_into(order + "I", data, 0x20, 0)
        struct.pack_into(order + "HH", data, 0x30, 0, 0)
    dst.write_bytes(bytes(data))
    dst.chmod(0o755)
    return dst


def zero_buildinfo_magic(src: Path, dst: Path) -> Path:
    """Copy with every build-info magic overwritten: the program still runs (the runtime
    does not need it), and ``go version`` says "not a Go executable"."""
    data = src.read_bytes()
    assert BUILDINFO_MAGIC in data, src
    dst.write_bytes(data.replace(BUILDINFO_MAGIC, bytes(len(BUILDINFO_MAGIC))))
    dst.chmod(0o755)
    return dst


def section_span(path: Path, name: str) -> Tuple[int, int]:
    """(file offset, size) of section ``name``, as binutils' readelf reports it."""
    out = run(["readelf", "-SW", str(path)]).stdout
    for line in out.splitlines():
        cols = line.replace("[ ", "[").split()
        if len(cols) > 5 and cols[1] == name:
            return int(cols[4], 16), int(cols[5], 16)
    raise AssertionError(f"{path}: no section {name}:\n{out}")


def zero_section(src: Path, dst: Path, name: str) -> Path:
    """Copy with the bytes of section ``name`` all zero (section headers kept)."""
    offset, size = section_span(src, name)
    data = bytearray(src.read_bytes())
    data[offset : offset + size] = bytes(size)
    dst.write_bytes(bytes(data))
    dst.chmod(0o755)
    return dst


def _go_env(base: Path, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GO", "CGO_"))}
    env.update(
        GOFLAGS="-mod=mod",
        GOPROXY="off",
        GOTOOLCHAIN="local",
        GOENV="off",
        GOCACHE=str(base / "gocache"),
        GOPATH=str(base / "gopath"),
        GONOSUMDB="*",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        HOME=str(base),
    )
    env.update(extra)
    return env


def _write(root: Path, files: Dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def _module(name: str, go_files: Dict[str, str], extra_mod: str = "") -> Dict[str, str]:
    return {"go.mod": f"module {name}\n\ngo 1.19\n{extra_mod}", **go_files}


def _build_all(base: Path) -> Dict[str, Path]:
    src, out = base / "src", base / "bin"
    out.mkdir(parents=True)
    hello = _write(src / "hello", _module("example.com/hello", {"main.go": MAIN_GO}))
    cgo = _write(src / "cgo", _module("example.com/cgo", {"main.go": MAIN_GO, "cgo.go": CGO_GO}))
    _write(
        src / "lib",
        _module(
            "example.com/lib", {"lib.go": 'package lib\n\nfunc Name() string { return "lib" }\n'}
        ),
    )
    withdep = _write(
        src / "withdep",
        _module(
            "example.com/withdep",
            {"main.go": WITHDEP_GO},
            "\nrequire example.com/lib v0.0.0\n\nreplace example.com/lib => ../lib\n",
        ),
    )
    bins: Dict[str, Path] = {}

    def build(name: str, cwd: Path, *flags: str, **env: str) -> None:
        target = out / name
        run([GO, "build", "-o", str(target), *flags, "."], cwd=cwd, env=_go_env(base, **env))
        bins[name] = target

    build("hello", hello)
    build("hello-trimpath", hello, "-trimpath")
    build("hello-sw", hello, "-ldflags=-s -w")
    build("hello-pie", hello, "-buildmode=pie")
    build("hello-huge-ldflags", hello, f"-ldflags=-X main.big={HUGE_X}")
    build("hello-small-ldflags", hello, "-ldflags=-X main.big=SMALL")
    build("cgo", cgo, CGO_ENABLED="1")
    build("cgo-pie", cgo, "-buildmode=pie", CGO_ENABLED="1")
    build("libcgo.so", cgo, "-buildmode=c-shared", CGO_ENABLED="1")
    build("withdep", withdep)
    for arch in ("386", "arm64", "s390x", "mips"):
        build(f"hello-{arch}", hello, CGO_ENABLED="0", GOARCH=arch)
    _vcs_builds(base, hello, build)
    for name in ("hello", "hello-pie", "cgo-pie", "hello-386", "hello-s390x"):
        bins[f"{name}-noshdr"] = strip_section_headers(bins[name], out / f"{name}-noshdr")
    return bins


def _vcs_builds(base: Path, hello: Path, build: object) -> None:
    repo = base / "src" / "vcs"
    shutil.copytree(hello, repo)
    git_env = _go_env(
        base,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        GIT_AUTHOR_DATE="2024-03-01T12:00:00Z",
        GIT_COMMITTER_DATE="2024-03-01T12:00:00Z",
    )
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
        run(["git", *cmd], cwd=repo, env=git_env)
    assert callable(build)
    build("vcs-clean", repo)
    (repo / "main.go").write_text(MAIN_GO + "\n// edited\n")
    build("vcs-dirty", repo)


def _apt_download(dest: Path, packages: List[str]) -> None:
    cmd = ["apt-get", "download", "-q", *packages]
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:  # most likely no package lists yet
        run(["apt-get", "update", "-q"], timeout=600)
        run(cmd, cwd=dest)


def _debian(base: Path) -> Dict[str, Path]:
    debs, root = base / "debs", base / "debroot"
    debs.mkdir(parents=True)
    root.mkdir()
    _apt_download(debs, list(DEBIAN))
    found: Dict[str, Path] = {}
    for deb in sorted(debs.glob("*.deb")):
        pkg = deb.name.split("_", 1)[0]
        run(["dpkg-deb", "-x", str(deb), str(root / pkg)])
        found[pkg] = root / pkg / DEBIAN[pkg]
    assert set(found) == set(DEBIAN), found
    return found


def _debian_old(base: Path) -> Dict[str, Path]:
    import hashlib
    import urllib.request

    found: Dict[str, Path] = {}
    for pkg, (pool, member, _version, sha256) in DEBIAN_OLD.items():
        deb = base / Path(pool).name
        with urllib.request.urlopen(DEBIAN_ARCHIVE + pool, timeout=120) as resp:
            deb.write_bytes(resp.read())
        got = hashlib.sha256(deb.read_bytes()).hexdigest()
        assert got == sha256, f"{pool}: sha256 {got}, the archive's index says {sha256}"
        run(["dpkg-deb", "-x", str(deb), str(base / pkg)])
        found[pkg] = base / pkg / member
    return found


def _esbuild(base: Path, specs: Optional[Dict[str, str]] = None) -> Dict[str, Path]:
    packs, out = base / "npm", base / "esbuild"
    packs.mkdir(parents=True)
    out.mkdir()
    env = {
        **os.environ,
        "npm_config_cache": str(base / "npm-cache"),
        "npm_config_audit": "false",
        "npm_config_fund": "false",
        "npm_config_update_notifier": "false",
    }
    found: Dict[str, Path] = {}
    for spec in ESBUILD if specs is None else specs:
        proc = run(["npm", "pack", "--silent", "--pack-destination", str(packs), spec], env=env)
        tgz = packs / proc.stdout.strip().splitlines()[-1]
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/bin/esbuild")
            assert member is not None, spec
            target = out / spec.lstrip("@").replace("@", "-").replace("/", "-")
            target.write_bytes(member.read())
        target.chmod(0o755)
        found[spec] = target
    return found


_CACHE: Dict[str, object] = {}


def _cached(key: str, factory: pytest.TempPathFactory, make: object) -> Dict[str, Path]:
    if key not in _CACHE:
        assert callable(make)
        _CACHE[key] = make(factory.mktemp(f"goinfo-{key}"))
    result = _CACHE[key]
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="session", name="go_bins")
def go_bins_fixture(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    return _cached("go", tmp_path_factory, _build_all)


@pytest.fixture(scope="session", name="debian_bins")
def debian_bins_fixture(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    return _cached("debian", tmp_path_factory, _debian)


@pytest.fixture(scope="session", name="old_debian_bins")
def old_debian_bins_fixture(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Go programs built without modules (Debian bullseye's, go1.15)."""
    return _cached("debian-old", tmp_path_factory, _debian_old)


@pytest.fixture(scope="session", name="esbuild_bins")
def esbuild_bins_fixture(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    return _cached("esbuild", tmp_path_factory, _esbuild)


@pytest.fixture(scope="session", name="modern_go_bins")
def modern_go_bins_fixture(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Go 1.20+ binaries (pclntab magic 0xfffffff1), by npm spec."""
    return _cached("modern", tmp_path_factory, lambda base: _esbuild(base, MODERN_ESBUILD))


def _c_builds(base: Path) -> Dict[str, Path]:
    """C programs and a shared library built by gcc: ELF files that are not Go."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "hello.c").write_text(C_HELLO)
    (base / "lib.c").write_text(C_LIB)
    variants = {
        "c-dynamic": ["hello.c"],
        "c-pie": ["-fPIE", "-pie", "hello.c"],
        "c-no-pie": ["-no-pie", "hello.c"],
        "c-static": ["-static", "hello.c"],
        "c-static-pie": ["-static-pie", "hello.c"],
        "c-o2-stripped": ["-O2", "-s", "hello.c"],
        "libc-answer.so": ["-shared", "-fPIC", "lib.c"],
    }
    out: Dict[str, Path] = {}
    for name, args in variants.items():
        run(["gcc", "-o", name, *args], cwd=base)
        out[name] = base / name
    out["c-noshdr"] = strip_section_headers(out["c-dynamic"], base / "c-noshdr")
    return out


@pytest.fixture(scope="session", name="c_bins")
def c_bins_fixture(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    return _cached("c", tmp_path_factory, _c_builds)


def reference_json(paths: List[Path], base: Path) -> Iterator[Tuple[Path, object]]:
    """Go's own debug/buildinfo.ReadFile, as JSON, for each path (built once per base)."""
    tool = base / "bijson"
    if not tool.exists():
        src = _write(base / "bijson-src", _module("example.com/bijson", {"main.go": BIJSON_GO}))
        run([GO, "build", "-o", str(tool), "."], cwd=src, env=_go_env(base))
    proc = run([str(tool), *map(str, paths)])
    for path, line in zip(paths, proc.stdout.splitlines()):
        yield path, json.loads(line)


BIJSON_GO = """package main

import (
	"debug/buildinfo"
	"encoding/json"
	"fmt"
	"os"
)

func main() {
	for _, f := range os.Args[1:] {
		bi, err := buildinfo.ReadFile(f)
		if err != nil {
			fmt.Printf("{\\"error\\": %q}\\n", err.Error())
			continue
		}
		out, _ := json.Marshal(bi)
		fmt.Println(string(out))
	}
}
"""


def first_rw_segment_offset(elf: bytes) -> int:
    """File offset of the first writable, non-executable PT_LOAD of a 64-bit LE ELF."""
    phoff, phentsize, phnum = struct.unpack_from("<Q", elf, 0x20)[0], 56, elf[0x38]
    for i in range(phnum):
        p_type, flags, offset = struct.unpack_from("<IIQ", elf, phoff + i * phentsize)
        if p_type == 1 and flags & 2 and not flags & 1:
            return int(offset)
    raise AssertionError("no RW segment")
