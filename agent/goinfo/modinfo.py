"""Parse the modinfo text (the format of Go's runtime/debug.ParseBuildInfo)."""

from __future__ import annotations

from dataclasses import replace
from typing import List, Tuple

from agent.goinfo import gostr
from agent.goinfo.model import BuildInfo, Module

INFO_START = bytes.fromhex("3077af0c9274080241e1c107e6d618e6")
INFO_END = bytes.fromhex("f932433186182072008242104116d8f2")
MAX_LINES = 100_000


class ModinfoError(ValueError):
    """A line Go would reject; ``line`` is 1-based like Go's error message."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


def unframe(raw: bytes) -> bytes | None:
    """The text between the sentinels: b"" when absent, None when framing is broken."""
    if not raw:
        return b""
    # Go only checks the length and the newline; we also check both sentinels.
    if len(raw) < 33 or raw[-17:-16] != b"\n" or raw[:16] != INFO_START or raw[-16:] != INFO_END:
        return None
    return raw[16:-16]


def _module(cols: List[str], line: int) -> Module:
    if len(cols) not in (2, 3):
        raise ModinfoError(line, f"expected 2 or 3 columns; got {len(cols)}")
    return Module(cols[0], cols[1], cols[2] if len(cols) == 3 else "")


def _char_literal(ch: str) -> str:
    """Go's %q of one byte: a character literal for the rune with that byte's value."""
    code = gostr.encode(ch)[0]
    body = "\\'" if ch == "'" else gostr.quote(chr(code))[1:-1].replace('\\"', '"')
    return f"'{body}'"


def _setting(kv: str, line: int) -> Tuple[str, str]:
    if not kv:
        raise ModinfoError(line, "build line missing '='")
    if kv[0] == "=":
        raise ModinfoError(line, "build line with missing key")
    if kv[0] in '`"':
        try:
            raw_key = gostr.quoted_prefix(kv)
        except ValueError:
            raise ModinfoError(line, "invalid quoted key in build line") from None
        if len(raw_key) == len(kv):
            raise ModinfoError(line, "build line missing '=' after quoted key")
        if kv[len(raw_key)] != "=":
            char = _char_literal(kv[len(raw_key)])
            raise ModinfoError(line, f"unexpected character after quoted key: {char}")
        key = gostr.unquote(raw_key)
        raw_value = kv[len(raw_key) + 1 :]
    else:
        key, eq, raw_value = kv.partition("=")
        if not eq:
            raise ModinfoError(line, "build line missing '=' after key")
        if gostr.needs_quote_key(key):
            raise ModinfoError(line, f"unquoted key {gostr.quote(key)} must be quoted")
    if raw_value[:1] in ("`", '"'):
        try:
            return key, gostr.unquote(raw_value)
        except ValueError:
            raise ModinfoError(line, "invalid quoted value in build line") from None
    if gostr.needs_quote_value(raw_value):
        raise ModinfoError(line, f"unquoted value {gostr.quote(raw_value)} must be quoted")
    return key, raw_value


def parse_modinfo(text: bytes, go_version: str, pointer_format: bool = False) -> BuildInfo:
    """Parse unframed modinfo; raise ModinfoError on a line Go's parser would reject."""
    if text.count(b"\n") > MAX_LINES:
        raise ModinfoError(MAX_LINES + 1, f"more than {MAX_LINES} lines")
    path = ""
    main: Module | None = None
    deps: List[Module] = []
    settings: List[Tuple[str, str]] = []
    last: int | None = None  # -1: main module, else index into deps
    # Go ignores a final line without "\n", and unknown line kinds (including "go").
    for number, line in enumerate(gostr.decode(text).split("\n")[:-1], start=1):
        kind, tab, rest = line.partition("\t")
        if not tab:
            continue
        if kind == "path":
            path = rest
        elif kind == "mod":
            main, last = _module(rest.split("\t"), number), -1
        elif kind == "dep":
            deps.append(_module(rest.split("\t"), number))
            last = len(deps) - 1
        elif kind == "=>":
            cols = rest.split("\t")
            if len(cols) != 3:
                raise ModinfoError(number, f"expected 3 columns for replacement; got {len(cols)}")
            if last is None:
                raise ModinfoError(number, "replacement with no module on previous line")
            new = Module(cols[0], cols[1], cols[2])
            if last < 0 and main is not None:
                main = replace(main, replace=new)
            else:
                deps[last] = replace(deps[last], replace=new)
            last = None
        elif kind == "build":
            settings.append(_setting(rest, number))
    if main == Module("", ""):
        main = None  # Go prints no mod line for an all-empty main module
    return BuildInfo(go_version, path, main, tuple(deps), tuple(settings), pointer_format)
