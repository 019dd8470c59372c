"""Go string-literal quoting (the semantics of Go's strconv.Quote and strconv.Unquote).

Strings here are Python ``str`` decoded from raw bytes with ``surrogateescape``: a byte that
is not valid UTF-8 is a lone surrogate U+DC80..U+DCFF, so ``s.encode("utf-8",
"surrogateescape")`` gives back the exact bytes Go would see.
"""

from __future__ import annotations

from typing import Tuple

ENCODING = "utf-8"
ERRORS = "surrogateescape"

_HEX = "0123456789abcdefABCDEF"
_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}
_QUOTE_ESCAPES = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v"}
_REPLACEMENT = "\ufffd".encode()


def decode(raw: bytes) -> str:
    return raw.decode(ENCODING, ERRORS)


def encode(text: str) -> bytes:
    return text.encode(ENCODING, ERRORS)


def _is_escaped_byte(ch: str) -> bool:
    return 0xDC80 <= ord(ch) <= 0xDCFF


def needs_quote_key(key: str) -> bool:
    return key == "" or any(c in key for c in '= \t\r\n"`')


def needs_quote_value(value: str) -> bool:
    return any(c in value for c in ' \t\r\n"`')


def quote(text: str) -> str:
    """A double-quoted Go literal, as strconv.Quote writes it."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if _is_escaped_byte(ch):
            out.append(f"\\x{code - 0xDC00:02x}")  # a byte that is not UTF-8
        elif ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif code in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[code])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _scan(text: str) -> Tuple[str, int]:
    """Decode the quoted literal at the start of ``text``; return it and the index after it."""
    if len(text) < 2:
        raise ValueError("quoted string too short")
    if text[0] == "`":
        end = text.find("`", 1)
        if end < 0:
            raise ValueError("unterminated raw string")
        return text[1:end].replace("\r", ""), end + 1  # Go drops CR inside raw strings
    if text[0] != '"':
        raise ValueError("not a quoted string")
    buf = bytearray()
    i = 1
    while True:
        if i >= len(text):
            raise ValueError("unterminated string")
        ch = text[i]
        if ch == '"':
            return decode(bytes(buf)), i + 1
        if ch == "\n":
            raise ValueError("newline in string")
        if ch != "\\":
            # Go turns bytes that are not UTF-8 into U+FFFD when it unquotes
            buf += _REPLACEMENT if _is_escaped_byte(ch) else ch.encode(ENCODING)
            i += 1
            continue
        i = _unescape(text, i + 1, buf)


def _unescape(text: str, i: int, buf: bytearray) -> int:
    """Append the escape sequence whose letter is at ``text[i]``; return the next index."""
    if i >= len(text):
        raise ValueError("backslash at end of string")
    kind = text[i]
    i += 1
    if kind in _SIMPLE_ESCAPES:
        buf.append(_SIMPLE_ESCAPES[kind])
        return i
    if kind in "xuU":
        width = {"x": 2, "u": 4, "U": 8}[kind]
        digits = text[i : i + width]
        if len(digits) != width or any(c not in _HEX for c in digits):
            raise ValueError(f"bad \\{kind} escape")
        value = int(digits, 16)
        if kind == "x":
            buf.append(value)  # a single byte, not necessarily UTF-8
        elif value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
            raise ValueError(f"bad \\{kind} escape: not a Unicode code point")
        else:
            buf += chr(value).encode(ENCODING)
        return i + width
    if kind in "01234567":
        digits = kind + text[i : i + 2]
        if len(digits) != 3 or any(c not in "01234567" for c in digits):
            raise ValueError("bad octal escape")
        value = int(digits, 8)
        if value > 255:
            raise ValueError("octal escape above 255")
        buf.append(value)
        return i + 2
    raise ValueError(f"unknown escape \\{kind}")


def unquote(text: str) -> str:
    """strconv.Unquote for double-quoted and backquoted literals; ValueError if invalid."""
    value, end = _scan(text)
    if end != len(text):
        raise ValueError("text after closing quote")
    return value


def quoted_prefix(text: str) -> str:
    """strconv.QuotedPrefix: the quoted literal (with its quotes) at the start of ``text``."""
    _, end = _scan(text)
    return text[:end]
