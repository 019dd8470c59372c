"""Go-ness from the runtime's tables on real binaries: Go built here (PIE, cgo, 32-bit,
big-endian, section headers removed), Debian's and esbuild's (go1.15 to go1.23), with the
build info zeroed every way an attacker can; and ELF files that are not Go (gcc builds,
this host's programs and libraries), which must never be called Go.

Each evasion is first shown to be real: the changed binary still runs, and Go's own
``go version`` no longer calls it a Go executable.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

from agent.digest import Artifact
from agent.errors import InputError
from agent.goinfo import RUNTIME, GoEvidence, inspect_go
from tests import goinfo_fixtures as fx

pytestmark = pytest.mark.slow
Bins = Dict[str, Path]
# ptr size and byte order of each local build (arch suffix); the rest are amd64
ARCH = {"386": (4, "little"), "arm64": (8, "little"), "s390x": (8, "big"),
        "mips": (4, "big")}


def inspect(path: Path, runtime_always: bool = False) -> GoEvidence:
    with Artifact.open(str(path)) as art:
        return inspect_go(art, runtime_always)


def runs(path: Path) -> str:
    return subprocess.run([str(path)], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def go_says_not_go(path: Path) -> bool:
    out, err = fx.go_version_m(path)
    return out == "" and "not a Go executable" in err


def _arch(name: str) -> Optional[str]:
    return next((a for a in ARCH if f"-{a}" in name), None)


@pytest.mark.parametrize("name", ["hello", "hello-trimpath", "hello-sw", "hello-pie",
                                  "hello-huge-ldflags", "cgo", "cgo-pie", "libcgo.so",
                                  "withdep", "hello-386", "hello-arm64", "hello-s390x",
                                  "hello-mips", "vcs-dirty", "hello-noshdr",
                                  "hello-pie-noshdr", "cgo-pie-noshdr", "hello-386-noshdr",
                                  "hello-s390x-noshdr"])
def test_zeroed_build_info_magic_is_still_go(go_bins: Bins, tmp_path: Path, name: str) -> None:
    zeroed = fx.zero_buildinfo_magic(go_bins[name], tmp_path / name)
    found = inspect(zeroed)
    assert found.established_by == RUNTIME and found.buildinfo is None, found.detail
    rt = found.runtime
    assert rt is not None and rt.formats == "go1.18-1.19" and rt.moduledata is not None
    arch = _arch(name)
    assert (rt.ptr_size, rt.byte_order) == (ARCH[arch] if arch else (8, "little"))
    assert rt.min_lc == {"s390x": 2, "arm64": 4, "mips": 4}.get(arch or "", 1)
    # without section headers the scan finds it; cgo-pie's pclntab has no section of its own
    scanned = name.endswith("-noshdr") or name in ("cgo-pie", "libcgo.so")
    assert rt.found_by == ("scan" if scanned else
                           "section .data.rel.ro.gopclntab" if name == "hello-pie" else
                           "section .gopclntab")
    # the same pclntab as in the untouched binary
    assert inspect(go_bins[name], runtime_always=True).runtime == rt


def test_the_evasions_are_real(go_bins: Bins, tmp_path: Path) -> None:
    """What the attacker gets: programs that run and that Go's own tool calls not Go."""
    for name in ("hello", "hello-pie", "cgo-pie", "hello-386", "hello-noshdr"):
        zeroed = fx.zero_buildinfo_magic(go_bins[name], tmp_path / f"{name}-magic")
        section = fx.zero_section(go_bins[name.replace("-noshdr", "")],
                                  tmp_path / f"{name}-section", ".go.buildinfo")
        for path in (zeroed, section):
            assert runs(path) == "hello 0\n"
            assert go_says_not_go(path)
            assert inspect(path).established_by == RUNTIME


@pytest.mark.parametrize("name", ["hello", "hello-pie", "cgo", "cgo-pie", "hello-386",
                                  "hello-s390x"])
def test_whole_buildinfo_section_zeroed(go_bins: Bins, tmp_path: Path, name: str) -> None:
    zeroed = fx.zero_section(go_bins[name], tmp_path / name, ".go.buildinfo")
    found = inspect(zeroed)
    assert found.established_by == RUNTIME and found.runtime is not None
    assert found.runtime.moduledata is not None


def test_section_headers_stripped_and_section_zeroed(go_bins: Bins, tmp_path: Path) -> None:
    for name in ("hello-pie", "cgo-pie", "hello-386"):
        zeroed = fx.zero_section(go_bins[name], tmp_path / f"{name}-z", ".go.buildinfo")
        bare = fx.strip_section_headers(zeroed, tmp_path / f"{name}-bare")
        found = inspect(bare)
        assert found.established_by == RUNTIME, found.detail
        assert found.runtime is not None and found.runtime.found_by == "scan"


def test_pie_moduledata_pointers_zeroed_on_disk(go_bins: Bins, tmp_path: Path) -> None:
    """In a PIE the loader fills moduledata's pointers from RELA relocations, so the bytes
    in the file may be zero (lld leaves them so; anyone can zero them): the program runs,
    and the cross-check finds the moduledata through the relocations."""
    for name in ("hello-pie", "cgo-pie"):
        path = fx.zero_buildinfo_magic(go_bins[name], tmp_path / name)
        rt = inspect(path).runtime
        assert rt is not None and rt.moduledata is not None
        data = bytearray(path.read_bytes())
        md_off = _file_offset(path, rt.moduledata)
        for word in (0, 1, 4, 7, 10, 13, 16):  # every pointer of the checked words
            data[md_off + 8 * word : md_off + 8 * word + 8] = bytes(8)
        path.write_bytes(bytes(data))
        assert runs(path) == "hello 0\n"
        again = inspect(path).runtime
        assert again is not None and again.moduledata == rt.moduledata


def _file_offset(path: Path, addr: int) -> int:
    out = fx.run(["readelf", "-lW", str(path)]).stdout
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[0] == "LOAD":
            off, va, filesz = int(cols[1], 16), int(cols[2], 16), int(cols[4], 16)
            if va <= addr < va + filesz:
                return off + addr - va
    raise AssertionError(f"{addr:#x} not mapped in {path}")


@pytest.mark.parametrize("spec", sorted(fx.ESBUILD))
def test_old_formats(esbuild_bins: Bins, tmp_path: Path, spec: str) -> None:
    expect = "go1.2-1.15" if fx.ESBUILD[spec] == "go1.15" else "go1.16-1.17"
    zeroed = fx.zero_buildinfo_magic(esbuild_bins[spec], tmp_path / "esbuild")
    assert go_says_not_go(zeroed)
    found = inspect(zeroed)
    assert found.established_by == RUNTIME and found.runtime is not None
    assert found.runtime.formats == expect and found.runtime.moduledata is not None
    assert found.runtime.ptr_size == (4 if "linux-32" in spec else 8)


def test_go_1_20_and_later(modern_go_bins: Bins, tmp_path: Path) -> None:
    for spec, version in fx.MODERN_ESBUILD.items():
        path = modern_go_bins[spec]
        assert fx.go_version_m(path)[0].startswith(f"{path}: {version}\n")
        stripped = fx.strip_section_headers(path, tmp_path / "esbuild-noshdr")
        zeroed = fx.zero_buildinfo_magic(stripped, tmp_path / "esbuild-bare")
        found = inspect(zeroed)
        assert found.established_by == RUNTIME and found.runtime is not None
        rt = found.runtime
        assert (rt.formats, rt.magic, rt.found_by) == ("go1.20+", 0xFFFFFFF1, "scan")
        assert rt.moduledata is not None


@pytest.mark.parametrize("pkg", sorted(fx.DEBIAN))
def test_debian_packages(debian_bins: Bins, tmp_path: Path, pkg: str) -> None:
    zeroed = fx.zero_buildinfo_magic(debian_bins[pkg], tmp_path / pkg)
    found = inspect(fx.strip_section_headers(zeroed, tmp_path / f"{pkg}-bare"))
    assert found.established_by == RUNTIME and found.runtime is not None
    assert found.runtime.moduledata is not None


def test_c_programs_and_libraries_are_not_go(c_bins: Bins) -> None:
    for name, path in c_bins.items():
        found = inspect(path, runtime_always=True)
        assert not found.is_go and found.runtime is None, (name, found.detail)
        assert "no Go build info" in found.detail and "no Go runtime" in found.detail
    assert runs(c_bins["c-static-pie"]) == "c says hi\n"


GO_ROOT = Path(os.path.realpath(fx.GO)).parents[1]  # Debian: /usr/lib/go-1.19
HOST_DIRS = ("/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/libexec",
             "/usr/lib/gcc", str(GO_ROOT / "bin"), str(GO_ROOT / "pkg" / "tool"))


def _host_elf_files() -> List[Path]:
    seen: Set[tuple[int, int]] = set()
    out: List[Path] = []
    for top in HOST_DIRS:
        for root, _, names in os.walk(top):
            for name in names:
                path = Path(root, name)
                try:
                    st = path.stat()  # a symlink counts as its target, once
                    if not path.is_file() or st.st_size < 64:
                        continue
                    with open(path, "rb") as fh:
                        if fh.read(4) != b"\x7fELF":
                            continue
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    out.append(path)
    return out


def test_this_hosts_elf_files_agree_with_go(tmp_path: Path) -> None:
    """Every ELF program and library of this host: called Go exactly when it is Go.

    The reference for "is Go" is Go's own ``go version`` (it reads build info, and skips
    files without an exec bit) and, for what it skips, binutils' section list."""
    files = _host_elf_files()
    assert len(files) > 500
    called_go = []
    for path in files:
        try:
            found = inspect(path)
        except InputError:
            continue  # vanished or unreadable while walking
        if found.is_go:
            called_go.append(path)
    for path in called_go:
        out, _ = fx.go_version_m(path)
        sections = fx.run(["readelf", "-SW", str(path)]).stdout
        assert out or ".gopclntab" in sections or ".go.buildinfo" in sections, path
    # and nothing Go missed: `go version DIR` walks a directory for Go executables
    walked = subprocess.run([fx.GO, "version", *HOST_DIRS], capture_output=True, text=True,
                            timeout=300).stdout
    reference = {Path(line.split(": ")[0]) for line in walked.splitlines() if ": go1." in line}
    assert len(reference) >= 5  # the Go toolchain itself: go, gofmt, compile, link, ...
    missed = {p for p in reference if p.resolve() not in {c.resolve() for c in called_go}}
    assert not missed
