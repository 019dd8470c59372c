"""``execguard goinfo FILE [--json]`` end to end: output, JSON shape and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from agent.cli import main
from tests import goinfo_fixtures as fx
from tests import goinfo_synth as synth

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> Tuple[int, bytes, str]:
    """Run the real console entry point in a child process: (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "goinfo", *args], cwd=REPO, capture_output=True, timeout=60
    )
    return proc.returncode, proc.stdout, proc.stderr.decode()


def cli_json(*args: str) -> Tuple[int, Dict[str, Any]]:
    rc, out, err = cli(*args, "--json")
    assert err == ""
    return rc, json.loads(out)


@pytest.mark.slow
def test_go_binary_prints_like_go_version_m(go_bins: Dict[str, Path]) -> None:
    path = go_bins["withdep"]
    rc, out, err = cli(str(path))
    assert (rc, err) == (0, "")
    assert out.decode() == fx.go_version_m(path)[0]


@pytest.mark.slow
def test_go_binary_json(go_bins: Dict[str, Path]) -> None:
    rc, doc = cli_json(str(go_bins["vcs-dirty"]))
    assert rc == 0
    assert list(doc) == ["is_go", "go_version", "path", "main", "deps", "settings"]
    assert doc["is_go"] is True and doc["go_version"] == "go1.19.8"
    assert doc["main"]["path"] == "example.com/hello" and doc["main"]["version"] == "(devel)"
    assert doc["settings"]["vcs.modified"] == "true" and doc["settings"]["GOOS"] == "linux"


def test_not_go_exits_1(tmp_path: Path) -> None:
    text, empty, elf = tmp_path / "script.sh", tmp_path / "empty", tmp_path / "c-prog"
    text.write_text("#!/bin/sh\necho hi\n")
    empty.write_bytes(b"")
    shutil.copy("/bin/true", elf)
    for path in (text, empty, elf):
        rc, doc = cli_json(str(path))
        assert rc == 1
        assert (
            doc["is_go"] is False
            and doc["file"] == str(path)
            and "no Go build info" in (doc["detail"])
        )
        rc, out, err = cli(str(path))
        assert (rc, err) == (1, "") and out.decode().startswith(f"{path}: ")


def test_directory_missing_and_malformed_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(synth.simple_image(synth.inline_blob(b"", b"")))
    missing = tmp_path / "missing"
    cases = [(tmp_path, "is a directory"), (missing, "No such file"), (bad, "empty Go version")]
    for path, problem in cases:
        rc, doc = cli_json(str(path))
        assert rc == 2 and list(doc) == ["error"]
        assert str(path) in doc["error"] and problem in doc["error"]
        rc, out, err = cli(str(path))
        assert rc == 2 and out == b""
        assert str(path) in err and problem in err


def test_raw_bytes_printed_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    mod = synth.frame(b"path\tex.com/\xff\xfe\nbuild\tk=caf\xc3\xa9\n")
    path.write_bytes(synth.simple_image(synth.inline_blob(b"go1.22.3", mod)))
    path.chmod(0o755)
    rc, out, _ = cli(str(path))
    assert rc == 0
    assert (
        out == f"{path}: go1.22.3\n\tpath\tex.com/".encode() + b"\xff\xfe\n\tbuild\tk=caf\xc3\xa9\n"
    )
    assert out == fx.go_version_m(path)[0].encode("utf-8", "surrogateescape")
    rc, doc = cli_json(str(path))
    assert rc == 0 and doc["settings"] == {"k": "café"}


def test_in_process_main(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    path = tmp_path / "p"
    path.write_bytes(synth.simple_image(synth.inline_blob(b"go1.22.3", b"")))
    assert main(["goinfo", str(path)]) == 0
    assert capsysbinary.readouterr().out == f"{path}: go1.22.3\n".encode()
    assert main(["goinfo", "--json", str(tmp_path)]) == 2
    assert json.loads(capsysbinary.readouterr().out)["error"].endswith("is a directory, not a file")


@pytest.mark.slow
def test_go_runtime_without_build_info_exits_4(go_bins: Dict[str, Path], tmp_path: Path) -> None:
    bare = fx.strip_section_headers(go_bins["hello-pie"], tmp_path / "pie-noshdr")
    path = fx.zero_buildinfo_magic(bare, tmp_path / "pie-bare")
    assert "not a Go executable" in fx.go_version_m(path)[1]
    rc, out, err = cli(str(path))
    assert (rc, err) == (4, "")  # agent/cli/exits.py: 3 is "no agent" on every verb
    text = out.decode()
    assert text.startswith(f"{path}: Go binary without Go build info: no Go build info")
    assert "Go runtime pclntab (go1.18-1.19" in text and "found by scan" in text
    rc, doc = cli_json(str(path))
    assert rc == 4 and list(doc) == ["is_go", "file", "evidence", "go_version", "detail",
                                     "runtime"]
    assert (doc["is_go"], doc["evidence"], doc["go_version"]) == (True, "runtime", None)
    rt = doc["runtime"]
    assert (rt["formats"], rt["magic"], rt["ptr_size"], rt["byte_order"], rt["found_by"]) == (
        "go1.18-1.19", "0xfffffff0", 8, "little", "scan")
    assert rt["pclntab"].startswith("0x") and rt["moduledata"].startswith("0x")


def test_hostile_runtime_search_exits_2(tmp_path: Path) -> None:
    from tests import pclntab_synth as ps

    prefix = bytes.fromhex("f0ffffff00000108") + bytes(8)
    hostile = tmp_path / "hostile"
    hostile.write_bytes(ps.image(ps.Tables(prefix * 1100, b"")))
    rc, doc = cli_json(str(hostile))
    assert rc == 2 and "refusing to search further" in doc["error"]
