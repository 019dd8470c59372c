"""The modinfo text format and Go string quoting, without any ELF around them."""

from __future__ import annotations

import pytest

from agent.goinfo import gostr
from agent.goinfo.model import BuildInfo, Module
from agent.goinfo.modinfo import MAX_LINES, ModinfoError, parse_modinfo, unframe
from tests import goinfo_synth as synth

REAL_1_19 = (
    b"path\texample.com/withdep\n"
    b"mod\texample.com/withdep\t(devel)\t\n"
    b"dep\texample.com/lib\tv0.0.0\n"
    b"=>\t../lib\t(devel)\t\n"
    b"\n"
    b"dep\tgolang.org/x/sys\tv0.1.0\th1:abc=\n"
    b'build\t-ldflags="-s -w"\n'
    b"build\tCGO_ENABLED=0\n"
    b"build\tvcs.modified=true\n"
)


def parse(text: bytes) -> BuildInfo:
    return parse_modinfo(text, "go1.19.8")


def test_real_layout_round_trips_with_blank_line_and_trailing_tab() -> None:
    info = parse(REAL_1_19)
    assert info.path == "example.com/withdep"
    assert info.main == Module("example.com/withdep", "(devel)", "")
    assert info.deps[0] == Module("example.com/lib", "v0.0.0", "", Module("../lib", "(devel)", ""))
    assert info.deps[1].sum == "h1:abc="
    assert info.settings == (("-ldflags", "-s -w"), ("CGO_ENABLED", "0"), ("vcs.modified", "true"))
    assert info.setting("vcs.modified") == "true" and info.setting("nope") is None
    assert info.modinfo_text().encode() == REAL_1_19
    rendered = info.format_like_go_version_m("bin")
    assert rendered.startswith("bin: go1.19.8\n\tpath\texample.com/withdep\n")
    assert "\t=>\t../lib\t(devel)\t\n\t\n\tdep\tgolang.org/x/sys" in rendered


def test_json_shape() -> None:
    doc = parse(REAL_1_19).to_json()
    assert list(doc) == ["is_go", "go_version", "path", "main", "deps", "settings"]
    assert doc["is_go"] is True and doc["go_version"] == "go1.19.8"
    assert doc["main"] == {
        "path": "example.com/withdep",
        "version": "(devel)",
        "sum": "",
        "replace": None,
    }
    assert doc["deps"][0]["replace"]["path"] == "../lib"
    assert list(doc["settings"]) == ["-ldflags", "CGO_ENABLED", "vcs.modified"]
    assert doc["settings"]["-ldflags"] == "-s -w"


def test_empty_modinfo_prints_version_only() -> None:
    info = parse(b"")
    assert info.main is None and info.to_json()["main"] is None
    assert info.format_like_go_version_m("f") == "f: go1.19.8\n"


def test_ignored_lines_final_line_without_newline_and_duplicates() -> None:
    info = parse(b"go\tgo1.2\nweird\tline\nnotab\nbuild\tA=1\nbuild\tA=2\nbuild\tB=3")
    assert info.settings == (("A", "1"), ("A", "2"))
    assert info.setting("A") == "2"
    assert info.to_json()["settings"] == {"A": "2"}


def test_replace_applies_to_last_module_even_after_other_lines() -> None:
    info = parse(b"mod\tm\tv1\nbuild\tX=1\n=>\t../m\t(devel)\t\n")
    assert info.main is not None and info.main.replace == Module("../m", "(devel)", "")


def test_all_empty_main_module_is_absent() -> None:
    assert parse(b"mod\t\t\n").main is None


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (b"path\tp\nmod\ta\n", 2, "expected 2 or 3 columns; got 1"),
        (b"dep\ta\tb\tc\td\n", 1, "expected 2 or 3 columns; got 4"),
        (b"=>\ta\tb\n", 1, "expected 3 columns for replacement; got 2"),
        (b"=>\ta\tb\tc\n", 1, "replacement with no module on previous line"),
        (b"dep\ta\tb\n=>\tc\td\te\n=>\tc\td\te\n", 3, "replacement with no module"),
        (b"build\t\n", 1, "build line missing '='"),
        (b"build\t=x\n", 1, "build line with missing key"),
        (b"build\tnoequals\n", 1, "build line missing '=' after key"),
        (b'build\t"k\n', 1, "invalid quoted key in build line"),
        (b'build\t"k"\n', 1, "build line missing '=' after quoted key"),
        (b'build\t"k"x=1\n', 1, "unexpected character after quoted key"),
        (b"build\ta b=1\n", 1, 'unquoted key "a b" must be quoted'),
        (b"build\tk=a b\n", 1, 'unquoted value "a b" must be quoted'),
        (b'build\tk="a\n', 1, "invalid quoted value in build line"),
        (b'build\tk="a"x\n', 1, "invalid quoted value in build line"),
        (b'build\tk="\\q"\n', 1, "invalid quoted value in build line"),
    ],
)
def test_bad_lines_name_the_line(text: bytes, line: int, message: str) -> None:
    with pytest.raises(ModinfoError) as err:
        parse(text)
    assert err.value.line == line
    assert message in str(err.value)


def test_line_cap() -> None:
    with pytest.raises(ModinfoError, match="more than"):
        parse(b"x\n" * (MAX_LINES + 1))


def test_quoted_keys_and_values() -> None:
    text = (
        b'build\t"a b"="x\\ty"\n'
        b"build\t`raw key`=`raw\rvalue`\n"
        b'build\tesc="\\x41\\101\\u00e9\\U0001F600\\a\\\\\\""\n'
        b"build\tempty=\n"
        b'build\t""=v\n'
    )
    info = parse(text)
    assert info.settings == (
        ("a b", "x\ty"),
        ("raw key", "rawvalue"),
        ("esc", 'AAé\U0001f600\a\\"'),
        ("empty", ""),
        ("", "v"),
    )
    rendered = info.modinfo_text()
    assert 'build\t"a b"="x\\ty"\n' in rendered
    assert 'build\t"raw key"=rawvalue\n' in rendered
    assert 'build\tesc="AAé\U0001f600\\a\\\\\\""\n' in rendered
    assert 'build\t""=v\n' in rendered


def test_raw_bytes_survive_and_quote_like_go() -> None:
    info = parse(b'path\tp\xff\nbuild\tk="\\xff\\xfe"\nbuild\tv="\xff"\n')
    assert gostr.encode(info.path) == b"p\xff"
    assert gostr.encode(info.settings[0][1]) == b"\xff\xfe"
    assert info.settings[1][1] == "\ufffd"  # Go replaces invalid UTF-8 when unquoting
    assert gostr.quote(info.settings[0][1] + " ") == '"\\xff\\xfe "'


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("a b", '"a b"'),
        ("tab\there", '"tab\\there"'),
        ('q"b\\', '"q\\"b\\\\"'),
        ("\x00\x7f\x1b", '"\\x00\\x7f\\x1b"'),
        ("\u00a0\u2028", '"\\u00a0\\u2028"'),
        ("\U000e0001", '"\\U000e0001"'),
        ("日本", '"日本"'),
    ],
)
def test_quote(text: str, quoted: str) -> None:
    assert gostr.quote(text) == quoted
    assert gostr.unquote(quoted) == text


@pytest.mark.parametrize(
    "bad", ['"', "x", '"abc', '"a\nb"', '"\\400"', '"\\ud800"', '"\\U00110000"', '"\\x4"', "`ab"]
)
def test_unquote_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        gostr.unquote(bad)


def test_unframe() -> None:
    assert unframe(b"") == b""
    assert unframe(synth.frame(b"path\tx\n")) == b"path\tx\n"
    assert unframe(synth.frame(b"path\tx")) is None  # no newline before the end sentinel
    assert unframe(synth.INFO_START + b"\n" + synth.INFO_END[:-1] + b"\0") is None
    assert unframe(b"\0" * 16 + b"path\tx\n" + synth.INFO_END) is None
    assert unframe(b"short") is None
