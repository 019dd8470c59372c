"""Synthetic images whose modinfo exercises Go's quoting and line rules, each compared with
what the reference ``go version -m`` prints for the same file (or the error it reports).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import MalformedInput
from agent.goinfo import parse_bytes
from tests import goinfo_fixtures as fx
from tests import goinfo_synth as synth

GOOD = {
    "quoting": b'build\t"a b"="x\\ty"\nbuild\t`k\\`=`v\r"w`\nbuild\t"k=1"=\nbuild\t""=v\n',
    "escapes": b'build\tk="\\x41\\101\\u00e9\\U0001F600\\a\\b\\f\\v\\\\\\"\\x00\\x7f"\n',
    "raw-bytes": b'path\tp\xff\nbuild\tk="\\xff\\xc3"\nbuild\tv="\xff x"\nbuild\tw=\xfe\n',
    "unicode": b'build\tk="\xc2\xa0\xe2\x80\xa8\xf3\xa0\x80\x81\xe6\x97\xa5"\n',
    "lines": b"go\tgo1.0\nweird\tx\nnotab\n\npath\tp\nbuild\tA=1\nbuild\tA=2\nbuild\tB=3\n",
    "replace-main": b"mod\tm\tv1\th1:x\n=>\t../m\t(devel)\t\n\ndep\td\tv2\t\n=>\tr\tv3\th1:y\n",
    "late-replace": b"dep\td\tv1\nbuild\tX=1\n=>\tr\tv2\t\n",
    "empty-main": b"mod\t\t\npath\tp\n",
    "tab-in-path": b"path\ta\tb\n",
}
BAD = {
    "columns": b"path\tp\ndep\ta\tb\tc\td\n",
    "replace-alone": b"=>\ta\tb\tc\n",
    "replace-cols": b"dep\ta\tb\n=>\ta\tb\n",
    "no-eq": b"build\tnoequals\n",
    "eq-first": b"build\t=x\n",
    "empty-build": b"build\t\n",
    "key-space": b"build\ta b=1\n",
    "value-space": b"build\tk=a b\n",
    "bad-quote": b'build\tk="\\q"\n',
    "after-key": b'build\t"k"x=1\n',
    "after-key-byte": b'build\t"k"\x01=1\n',
    "key-no-eq": b'build\t"k"\n',
    "open-key": b'build\t"k\n',
}


def write(tmp_path: Path, name: str, text: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(synth.simple_image(synth.inline_blob(b"go1.22.3", synth.frame(text))))
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("name", sorted(GOOD))
def test_parsed_like_go(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, GOOD[name])
    out, err = fx.go_version_m(path)
    assert err == ""
    assert parse_bytes(path.read_bytes()).format_like_go_version_m(str(path)) == out


@pytest.mark.parametrize("name", sorted(BAD))
def test_rejected_like_go(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, BAD[name])
    out, err = fx.go_version_m(path)
    assert out == ""
    go_reason = err.strip().split("could not read Go build info from ")[1].split(": ", 1)[1]
    assert go_reason.startswith("could not parse Go build info: line ")
    with pytest.raises(MalformedInput) as exc:
        parse_bytes(path.read_bytes())
    assert exc.value.problem == go_reason.encode("utf-8", "surrogateescape").decode(
        "utf-8", "replace"
    )


def test_broken_framing_gives_the_version_alone_as_go_does(tmp_path: Path) -> None:
    path = tmp_path / "broken"
    blob = synth.inline_blob(b"go1.22.3", synth.frame(b"path\tp\nbuild\tB=3"))
    path.write_bytes(synth.simple_image(blob))
    path.chmod(0o755)
    assert fx.go_version_m(path) == (f"{path}: go1.22.3\n", "")  # silently version only
    info = parse_bytes(path.read_bytes())
    assert info.format_like_go_version_m(str(path)) == f"{path}: go1.22.3\n"
    assert info.no_module_info == "module info framing is broken"
