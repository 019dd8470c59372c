"""Go binaries built by others: Debian bookworm packages (go1.19, PIE, externally linked),
Debian bullseye packages built without modules (go1.15, GOPATH mode) and esbuild npm
releases built with go1.15/go1.17 (the pre-1.18 pointer format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

from agent.digest import Artifact
from agent.goinfo import BuildInfo, read_buildinfo
from tests import goinfo_fixtures as fx

pytestmark = pytest.mark.slow
Bins = Dict[str, Path]


def read(path: Path) -> BuildInfo:
    with Artifact.open(str(path)) as art:
        return read_buildinfo(art)


@pytest.mark.parametrize("pkg", sorted(fx.DEBIAN))
def test_debian_package_same_as_go_version_m(debian_bins: Bins, pkg: str) -> None:
    path = debian_bins[pkg]
    out, err = fx.go_version_m(path)
    assert err == "" and out.startswith(f"{path}: go1.")
    info = read(path)
    assert info.format_like_go_version_m(str(path)) == out
    # dh-golang builds in GOPATH mode: a path line, no module lines.
    assert info.main is None and info.path and info.setting("-trimpath") == "true"


def test_debian_age_section_stripped_blob_over_1mib_deep(debian_bins: Bins, tmp_path: Path) -> None:
    age = debian_bins["age"]
    data = age.read_bytes()
    rw = fx.first_rw_segment_offset(data)
    assert data.index(b"\xff Go buildinf:", rw) - rw > 1 << 20  # past one 1 MiB read window
    stripped = fx.strip_section_headers(age, tmp_path / "age")
    _, err = fx.go_version_m(stripped)
    assert err.strip().endswith("not a Go executable")  # go1.19's 64 KiB window
    ref, _ = fx.go_version_m(age)
    expected = ref.replace(str(age), str(stripped))
    assert read(stripped).format_like_go_version_m(str(stripped)) == expected


@pytest.mark.parametrize("spec", sorted(fx.ESBUILD))
def test_esbuild_pointer_format_same_as_go_version_m(esbuild_bins: Bins, spec: str) -> None:
    path = esbuild_bins[spec]
    out, err = fx.go_version_m(path)
    assert err == "" and out.startswith(f"{path}: {fx.ESBUILD[spec]}\n")
    info = read(path)
    assert info.pointer_format and info.go_version == fx.ESBUILD[spec]
    assert info.format_like_go_version_m(str(path)) == out
    assert info.main is not None and info.main.path == "github.com/evanw/esbuild"
    assert info.deps and info.deps[0].sum.startswith("h1:")
    assert info.settings == ()  # settings exist only since go1.18


def test_esbuild_32_bit(esbuild_bins: Bins) -> None:
    assert esbuild_bins["esbuild-linux-32@0.13.0"].read_bytes()[4] == 1  # ELFCLASS32


@pytest.mark.parametrize("pkg", sorted(fx.DEBIAN_OLD))
def test_a_go_build_without_modules_reads_as_go_version_m_shows_it(old_debian_bins: Bins,
                                                                   pkg: str) -> None:
    """GOPATH mode (Go 1.15, dh-golang): runtime.modinfo is empty, its string header in
    .bss (no file bytes). This used to be an error ("module info pointer ... is outside
    every segment"), which the agent treated as malformed build info."""
    path = old_debian_bins[pkg]
    out, err = fx.go_version_m(path)
    assert err == "" and out == f"{path}: {fx.DEBIAN_OLD[pkg][2]}\n"
    info = read(path)
    assert info.pointer_format and info.go_version == fx.DEBIAN_OLD[pkg][2]
    assert info.format_like_go_version_m(str(path)) == out
    assert info.main is None and info.deps == () and info.path == ""
    assert "built without modules" in info.no_module_info
