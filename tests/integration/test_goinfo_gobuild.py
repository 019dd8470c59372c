"""Locally built Go binaries in many modes, compared with the reference ``go version -m``,
with Go's own debug/buildinfo (JSON) and with what each program reports about itself.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from agent.digest import Artifact
from agent.errors import MalformedInput
from agent.goinfo import BuildInfo, Module, read_buildinfo
from tests import goinfo_fixtures as fx

pytestmark = pytest.mark.slow
Bins = Dict[str, Path]

# Binaries that go1.19's reader handles correctly: ours must print exactly the same.
AGREE = [
    "hello", "hello-trimpath", "hello-sw", "hello-pie", "hello-small-ldflags", "cgo", "cgo-pie",
    "withdep", "hello-386", "hello-arm64", "hello-s390x", "hello-mips", "vcs-clean",
    "vcs-dirty", "hello-noshdr", "hello-386-noshdr", "hello-s390x-noshdr",
]  # fmt: skip
# Host binaries that can print their own runtime/debug.ReadBuildInfo().
RUNNABLE = [
    "hello", "hello-trimpath", "hello-sw", "hello-pie", "hello-huge-ldflags", "cgo", "cgo-pie",
    "vcs-dirty", "hello-noshdr", "hello-pie-noshdr", "cgo-pie-noshdr",
]  # fmt: skip


def read(path: Path) -> BuildInfo:
    with Artifact.open(str(path)) as art:
        return read_buildinfo(art)


def as_go_json(info: BuildInfo) -> Dict[str, Any]:
    """Our result in the shape encoding/json gives Go's debug.BuildInfo."""

    def mod(m: Optional[Module]) -> Optional[Dict[str, Any]]:
        if m is None:
            return None
        return {"Path": m.path, "Version": m.version, "Sum": m.sum, "Replace": mod(m.replace)}

    empty = {"Path": "", "Version": "", "Sum": "", "Replace": None}
    return {
        "GoVersion": info.go_version,
        "Path": info.path,
        "Main": mod(info.main) or empty,
        "Deps": [mod(d) for d in info.deps] or None,
        "Settings": [{"Key": k, "Value": v} for k, v in info.settings] or None,
    }


@pytest.mark.parametrize("name", AGREE)
def test_same_as_go_version_m(go_bins: Bins, name: str) -> None:
    path = go_bins[name]
    out, err = fx.go_version_m(path)
    assert err == "" and out.startswith(f"{path}: go1.")
    assert read(path).format_like_go_version_m(str(path)) == out


def test_json_same_as_go_debug_buildinfo(go_bins: Bins, tmp_path: Path) -> None:
    paths = [go_bins[n] for n in AGREE]
    for path, ref in fx.reference_json(paths, tmp_path):
        info = read(path)
        assert as_go_json(info) == ref, path
        doc = info.to_json()
        assert doc["go_version"] == ref["GoVersion"] and doc["path"] == ref["Path"]  # type: ignore[index]
        assert doc["settings"] == {s["Key"]: s["Value"] for s in ref["Settings"]}  # type: ignore[index]


@pytest.mark.parametrize("name", RUNNABLE)
def test_same_as_the_program_reports_about_itself(go_bins: Bins, name: str) -> None:
    proc = subprocess.run(
        [str(go_bins[name]), "buildinfo"], capture_output=True, timeout=30, check=True
    )
    info = read(go_bins[name])
    assert f"go\t{info.go_version}\n{info.modinfo_text()}".encode() == proc.stdout


def test_build_modes_show_up_in_settings(go_bins: Bins) -> None:
    assert read(go_bins["hello-trimpath"]).setting("-trimpath") == "true"
    assert read(go_bins["hello-sw"]).setting("-ldflags") == "-s -w"
    assert read(go_bins["cgo"]).setting("CGO_ENABLED") == "1"
    assert read(go_bins["hello-386"]).setting("GO386") == "softfloat"  # go1.19 default
    assert read(go_bins["hello-mips"]).setting("GOMIPS") == "hardfloat"
    for name in ("hello-s390x", "hello-mips"):
        assert go_bins[name].read_bytes()[5] == 2  # really big-endian ELF
    assert read(go_bins["hello-pie"]).setting("-buildmode") is None  # only since go1.20


def test_vcs_clean_and_dirty(go_bins: Bins) -> None:
    clean, dirty = read(go_bins["vcs-clean"]), read(go_bins["vcs-dirty"])
    assert clean.setting("vcs") == "git" and clean.setting("vcs.modified") == "false"
    assert dirty.setting("vcs.modified") == "true"
    assert clean.setting("vcs.revision") == dirty.setting("vcs.revision")
    assert len(clean.setting("vcs.revision") or "") == 40
    assert clean.setting("vcs.time") == "2024-03-01T12:00:00Z"


def test_directory_replace_gives_arrow_line_and_blank_line(go_bins: Bins) -> None:
    info = read(go_bins["withdep"])
    assert info.deps == (Module("example.com/lib", "v0.0.0", "", Module("../lib", "(devel)", "")),)
    assert "\t=>\t../lib\t(devel)\t\n\t\n" in info.format_like_go_version_m("x")


def test_huge_modinfo_read_in_full_where_go119_gives_version_only(go_bins: Bins) -> None:
    path = go_bins["hello-huge-ldflags"]
    out, _ = fx.go_version_m(path)
    assert out == f"{path}: go1.19.8\n"  # go1.19: 64 KiB window and an off-by-one
    small = go_bins["hello-small-ldflags"]
    ref, _ = fx.go_version_m(small)
    expected = ref.replace(str(small), str(path)).replace("main.big=SMALL", f"main.big={fx.HUGE_X}")
    info = read(path)
    assert len(info.modinfo_text()) > 70_000
    assert info.format_like_go_version_m(str(path)) == expected


@pytest.mark.parametrize("name", ["hello-pie", "cgo-pie"])
def test_section_stripped_pie_read_where_go119_misses_it(go_bins: Bins, name: str) -> None:
    stripped = go_bins[f"{name}-noshdr"]
    _, err = fx.go_version_m(stripped)
    assert err.strip().endswith("not a Go executable")  # go1.19 (see research section 2.2)
    ref, _ = fx.go_version_m(go_bins[name])
    expected = ref.replace(str(go_bins[name]), str(stripped))
    assert read(stripped).format_like_go_version_m(str(stripped)) == expected


def test_cgo_pie_blob_lies_past_go119_window(go_bins: Bins) -> None:
    # Why go1.19 misses it: the blob is more than 64 KiB into the only RW segment.
    data = go_bins["cgo-pie-noshdr"].read_bytes()
    first_rw = fx.first_rw_segment_offset(data)
    assert data.index(b"\xff Go buildinf:", first_rw) - first_rw > 64 * 1024


def test_c_shared_library(go_bins: Bins, tmp_path: Path) -> None:
    lib = tmp_path / "libcgo.so"
    shutil.copy(go_bins["libcgo.so"], lib)
    lib.chmod(0o755)  # go version skips files without an exec bit
    out, err = fx.go_version_m(lib)
    assert err == "" and read(lib).format_like_go_version_m(str(lib)) == out
    assert read(lib).setting("CGO_ENABLED") == "1"


@pytest.mark.parametrize("cut", ["4096", "half", "mid-modinfo", "header"])
def test_truncated_real_binary(go_bins: Bins, tmp_path: Path, cut: str) -> None:
    data = go_bins["hello"].read_bytes()
    blob = data.index(b"\xff Go buildinf:\x08\x02")
    size = {"4096": 4096, "half": len(data) // 2, "mid-modinfo": blob + 200, "header": blob + 20}
    path = tmp_path / "cut"
    path.write_bytes(data[: size[cut]])
    with pytest.raises(MalformedInput, match="truncated"):
        read(path)
