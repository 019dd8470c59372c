"""The trusted cache's file: a versioned msgpack document, read bounded, written atomically.

Layout (format 1), a msgpack map::

    {"magic": "execguard-verdict-cache", "version": 1, "binding": str, "written_at_ns": int,
     "entries": [[dev, ino, ctime_ns, size, sha256 (32 raw bytes), verified_at_ns, verdict]]}

``entries`` runs oldest-used first. A verdict is a map ``trusted, reason, detail, evidence,
attempts``; evidence is None or the fields of ``agent.verify.model.Evidence``. Every field is
type-checked on load; one bad field makes the whole file corrupt (it is never half-trusted).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgpack

from agent.decision import FileIdentity
from agent.errors import MalformedInput, Reason
from agent.verify.model import Evidence, SignatureKind, Verdict

MAGIC = "execguard-verdict-cache"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 64 << 20  # never read more than this from the state directory
MAX_TEXT = 4096  # longer details are cut when written
MAX_ATTEMPTS = 16
_U64 = 1 << 64
_I64 = 1 << 63
_EVIDENCE_STR = ("source", "key_fingerprint", "identity", "issuer", "bundle_media_type")
_EVIDENCE_INT = ("log_index", "integrated_time")
EVIDENCE_FIELDS = frozenset(("kind", *_EVIDENCE_STR, *_EVIDENCE_INT, "extensions"))
_OLDER_EVIDENCE = EVIDENCE_FIELDS - {"extensions"}  # files written before extensions existed
MAX_EXTENSIONS = 64

Row = Tuple[FileIdentity, str, Verdict, int]  # identity, sha256 hex, verdict, verified_at_ns


class CorruptCache(MalformedInput):
    """The cache file is unreadable, foreign or malformed; it is set aside, never trusted."""


@dataclass(frozen=True)
class Document:
    binding: str
    entries: List[Row]


def check_identity(ident: FileIdentity) -> None:
    ok = (0 <= ident.dev < _U64 and 0 <= ident.ino < _U64 and 0 <= ident.size < _I64
          and -_I64 <= ident.ctime_ns < _I64)
    if not ok:
        raise ValueError(f"identity out of range: {ident}")


def check_sha256(sha: str) -> None:
    if len(sha) != 64 or sha.strip("0123456789abcdef"):
        raise ValueError(f"not a lowercase hex sha256: {sha!r}")


# -- encoding -----------------------------------------------------------------------------

def _evidence_out(ev: Evidence) -> Dict[str, Any]:
    out: Dict[str, Any] = {"kind": ev.kind.value}
    for name in (*_EVIDENCE_STR, *_EVIDENCE_INT):
        value = getattr(ev, name)
        out[name] = value[:MAX_TEXT] if isinstance(value, str) else value
    # never cut: a shortened value would match a policy differently than the certificate did
    out["extensions"] = [[oid, text] for oid, text in ev.extensions]
    return out


def _verdict_out(v: Verdict, nested: bool = False) -> Dict[str, Any]:
    attempts = [] if nested else [_verdict_out(a, True) for a in v.attempts[:MAX_ATTEMPTS]]
    return {"trusted": v.trusted, "reason": v.reason.value, "detail": v.detail[:MAX_TEXT],
            "evidence": None if v.evidence is None else _evidence_out(v.evidence),
            "attempts": attempts}


def encode(binding: str, rows: Sequence[Row]) -> bytes:
    entries = [[i.dev, i.ino, i.ctime_ns, i.size, bytes.fromhex(sha), at, _verdict_out(v)]
               for i, sha, v, at in rows]
    doc = {"magic": MAGIC, "version": FORMAT_VERSION, "binding": binding,
           "written_at_ns": time.time_ns(), "entries": entries}
    return bytes(msgpack.packb(doc, use_bin_type=True))


# -- decoding: every field checked, any surprise is CorruptCache ---------------------------

class _Bad(Exception):
    pass


def _get(m: Dict[str, Any], key: str, typ: Any, optional: bool = False) -> Any:
    if key not in m:
        raise _Bad(f"missing field {key!r}")
    value = m[key]
    if value is None and optional:
        return None
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise _Bad(f"field {key!r} has type {type(value).__name__}")
    return value


def _map(value: Any, what: str, keys: frozenset) -> Dict[str, Any]:  # type: ignore[type-arg]
    if not isinstance(value, dict):
        raise _Bad(f"{what} is a {type(value).__name__}, not a map")
    if set(value) != keys:
        raise _Bad(f"{what} has fields {sorted(map(str, value))}")
    return value


def _evidence_in(value: Any) -> Evidence:
    keys = EVIDENCE_FIELDS if isinstance(value, dict) and "extensions" in value \
        else _OLDER_EVIDENCE
    m = _map(value, "evidence", keys)
    try:
        kind = SignatureKind(_get(m, "kind", str))
    except ValueError:
        raise _Bad(f"unknown signature kind {m['kind']!r}") from None
    strs = {n: _get(m, n, str, optional=n != "source") for n in _EVIDENCE_STR}
    ints = {n: _get(m, n, int, optional=True) for n in _EVIDENCE_INT}
    return Evidence(kind, **strs, **ints, extensions=_extensions_in(m.get("extensions", [])))


def _extensions_in(value: Any) -> Tuple[Tuple[str, str], ...]:
    if not isinstance(value, list) or len(value) > MAX_EXTENSIONS:
        raise _Bad("evidence extensions is not a list of at most 64 pairs")
    pairs = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(p, str) for p in pair)):
            raise _Bad("an evidence extension is not an [oid, text] pair")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


_VERDICT_FIELDS = frozenset(("trusted", "reason", "detail", "evidence", "attempts"))


def _verdict_in(value: Any, nested: bool = False) -> Verdict:
    m = _map(value, "verdict", _VERDICT_FIELDS)
    try:
        reason = Reason(_get(m, "reason", str))
    except ValueError:
        raise _Bad(f"unknown reason {m['reason']!r}") from None
    ev = m["evidence"]
    attempts = _get(m, "attempts", list)
    if (nested and attempts) or len(attempts) > MAX_ATTEMPTS:
        raise _Bad("too many or nested attempts")
    verdict = Verdict(_get(m, "trusted", bool), reason, _get(m, "detail", str),
                      None if ev is None else _evidence_in(ev),
                      tuple(_verdict_in(a, True) for a in attempts))
    check_verdict(verdict, _Bad)
    return verdict


def check_verdict(v: Verdict, error: Any = ValueError) -> None:
    """A trusted verdict says ``ok`` and carries its evidence, or it is not a verdict."""
    if v.trusted and (v.reason is not Reason.OK or v.evidence is None):
        raise error("a trusted verdict needs reason 'ok' and evidence")


def _row_in(value: Any) -> Row:
    if not isinstance(value, list) or len(value) != 7:
        raise _Bad("an entry is not a 7-item array")
    dev, ino, ctime_ns, size, sha, at_ns, verdict = value
    nums = (dev, ino, ctime_ns, size, at_ns)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in nums):
        raise _Bad("an entry has a non-integer identity or time")
    if not isinstance(sha, bytes) or len(sha) != 32:
        raise _Bad("an entry's sha256 is not 32 bytes")
    ident = FileIdentity(dev, ino, ctime_ns, size)
    try:
        check_identity(ident)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    return ident, sha.hex(), _verdict_in(verdict), at_ns


def decode(data: bytes) -> Document:
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types; all mean "not our file"
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise _Bad(f"not a valid msgpack document ({why})") from None
    if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
        raise _Bad("not an execguard verdict cache (wrong magic)")
    if doc.get("version") != FORMAT_VERSION:
        raise _Bad(f"format version {doc.get('version')!r}, this agent reads {FORMAT_VERSION}")
    m = _map(doc, "document", frozenset(("magic", "version", "binding", "written_at_ns",
                                         "entries")))
    _get(m, "written_at_ns", int)
    rows = [_row_in(e) for e in _get(m, "entries", list)]
    if len({(r[0].dev, r[0].ino) for r in rows}) != len(rows):
        raise _Bad("two entries for one inode")
    return Document(_get(m, "binding", str), rows)


# -- files ----------------------------------------------------------------------------------

def read_file(path: str, max_bytes: int) -> Document:
    """Read and decode ``path``. FileNotFoundError when absent, CorruptCache when bad."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptCache(path, "is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCache(path, "is not a regular file")
        if st.st_uid != os.geteuid():
            raise CorruptCache(path, f"is owned by uid {st.st_uid}, not by this agent")
        if st.st_mode & 0o022:
            raise CorruptCache(path, f"is writable by group or others (mode {st.st_mode:o})")
        if st.st_size > max_bytes:
            raise CorruptCache(path, f"is {st.st_size} bytes, over the {max_bytes}-byte cap")
        chunks: List[bytes] = []
        total = 0
        while total <= max_bytes:  # bounded even if the file grows while we read
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise CorruptCache(path, f"grew over the {max_bytes}-byte cap while read")
    finally:
        os.close(fd)
    try:
        return decode(b"".join(chunks))
    except _Bad as exc:
        raise CorruptCache(path, str(exc)) from None


def write_file(path: str, binding: str, rows: Sequence[Row], max_bytes: int) -> None:
    """tmp file (0600) + fsync + rename + directory fsync: the live file is old or new."""
    data = encode(binding, rows)
    while len(data) > max_bytes and rows:  # keep the most recently used that fit
        rows = rows[len(rows) // 2 + 1:]
        data = encode(binding, rows)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a crash left it; O_EXCL below refuses anything planted there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_stray_tmp(path: str, warnings: List[str]) -> None:
    try:
        os.unlink(path + ".tmp")
        warnings.append(f"{path}.tmp: removed a partial write left by an earlier run")
    except FileNotFoundError:
        pass
    except OSError as exc:
        warnings.append(f"{path}.tmp: cannot remove ({exc.strerror or exc})")


def set_aside(path: str, keep: int, warnings: List[str]) -> Optional[str]:
    """Rename ``path`` to ``<path>.corrupt-<UTC time>``; keep only the newest ``keep``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{path}.corrupt-{stamp}"
    n = 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}.corrupt-{stamp}.{n}"
    try:
        os.rename(path, target)
    except OSError as exc:
        warnings.append(f"{path}: cannot set aside ({exc.strerror or exc})")
        return None
    directory, base = os.path.split(path)
    try:
        old = sorted(f for f in os.listdir(directory or ".")
                     if f.startswith(base + ".corrupt-") and f != os.path.basename(target))
        keep -= 1  # the file just moved counts
        for name in old[:len(old) - keep] if keep > 0 else old:
            os.unlink(os.path.join(directory, name))
    except OSError as exc:
        warnings.append(f"{path}: cannot prune old set-aside files ({exc.strerror or exc})")
    return target
