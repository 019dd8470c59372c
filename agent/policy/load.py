"""Read a policy (TOML or JSON, one schema), the embedded default, and CLI overrides.

Every path ends in ``build_snapshot``: a complete ``PolicySnapshot`` or an exception, never
a partly applied policy. Errors are ``InputError`` (cannot read) or ``MalformedInput``
(read, but wrong), both naming the file and, for content, the key.
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence, Tuple

from agent.errors import MalformedInput
from agent.fileio import read_small_file
from agent.policy import schema
from agent.policy.build import build_snapshot
from agent.policy.model import PolicySnapshot

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the 3.9/3.10 targets
    import tomli as tomllib

MAX_POLICY_BYTES = 1 << 20
DEFAULT_SOURCE = "<embedded default policy>"


def _read(path: str) -> bytes:
    return read_small_file(path, MAX_POLICY_BYTES, "a policy")


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json keeps the last silently; an ambiguous policy is an error
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse(text: str, fmt: str, source: str) -> Any:
    try:
        if fmt == "json":
            return json.loads(text, object_pairs_hook=_no_duplicates,
                              parse_constant=_no_constant)
        return tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise MalformedInput(source, f"not valid {fmt.upper()}: {exc}") from None
    except RecursionError:
        raise MalformedInput(source, f"not valid {fmt.upper()}: nested too deeply") from None


def _format(source: str, text: str) -> str:
    if source.endswith(".json"):
        return "json"
    if source.endswith(".toml"):
        return "toml"
    return "json" if text.lstrip().startswith("{") else "toml"


def rule_lines(text: str, ids: Sequence[str]) -> List[Optional[int]]:
    """Line of each rule's ``id`` assignment, searched in order; None where not found."""
    lines: List[Optional[int]] = []
    pos = 0
    for rid in ids:
        pattern = (r"(?<![\w.-])[\"']?id[\"']?\s*[:=]\s*[\"']" + re.escape(rid) + r"[\"']")
        m = re.compile(pattern).search(text, pos)
        if m is None:
            lines.append(None)
            continue
        lines.append(text.count("\n", 0, m.start()) + 1)
        pos = m.end()
    return lines


_RULE_AT = re.compile(r"rules\[(\d+)\]")
_RULE_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*rules[ \t]*\]\]", re.M)


def _error_line(text: str, doc: Any, where: str) -> Optional[int]:
    """The line of the rule a schema error is in: its ``id`` (as ``Rule.source_line``), else
    its ``[[rules]]`` header in TOML; None outside the rules or when it cannot be located."""
    m = _RULE_AT.match(where)
    raw = doc.get("rules") if isinstance(doc, dict) else None
    if m is None or not isinstance(raw, list):
        return None
    index = int(m.group(1))
    ids = [r.get("id") if isinstance(r, dict) else None for r in raw[:index + 1]]
    named = [i for i in ids if isinstance(i, str)]
    line = rule_lines(text, named)[index] if len(named) == len(ids) else None
    headers = list(_RULE_HEADER.finditer(text))
    if line is None and len(headers) == len(raw):
        line = text.count("\n", 0, headers[index].start()) + 1
    return line


def parse_policy(data: bytes, source: str, fmt: Optional[str] = None) -> PolicySnapshot:
    """A snapshot from policy bytes; ``fmt`` is "toml" or "json" (guessed when None)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedInput(source, f"not UTF-8 text ({exc})") from None
    doc = _parse(text, fmt or _format(source, text), source)
    try:
        normalized = schema.normalize(doc)
    except schema.SchemaError as exc:
        line = _error_line(text, doc, exc.where)
        raise MalformedInput(source, (f"line {line}: " if line else "") + str(exc)) from None
    lines = rule_lines(text, [r["id"] for r in normalized["rules"]])
    return build_snapshot(normalized, source, lines)


def load_policy(path: str) -> PolicySnapshot:
    """Read and validate the policy file at ``path``."""
    return parse_policy(_read(path), path)


def default_policy_bytes() -> bytes:
    return resources.files("agent.policy").joinpath("default.toml").read_bytes()


def default_policy() -> PolicySnapshot:
    """The embedded default: monitor mode, Go binaries need signatures, nothing is blocked."""
    return parse_policy(default_policy_bytes(), DEFAULT_SOURCE, "toml")


def _absolute(value: str) -> str:
    path = os.path.normpath(os.path.join(os.getcwd(), value))
    # Keep a trailing "/": it marks a key directory that may not exist yet.
    return path + "/" if value.endswith("/") and path != "/" else path


def apply_overrides(snapshot: PolicySnapshot, mode: Optional[str] = None,
                    scopes: Sequence[str] = (), keys: Sequence[str] = (),
                    state_dir: Optional[str] = None,
                    log_dir: Optional[str] = None,
                    on_agent_exit: Optional[str] = None) -> PolicySnapshot:
    """A new snapshot with ``execguard run`` flags applied; the digest changes with them.

    ``scopes`` and ``keys``, when given, replace the policy's lists (the operator gets
    exactly what the flags say). Relative paths are taken from the working directory.
    """
    doc: Dict[str, Any] = json.loads(snapshot.canonical)
    applied: List[str] = []
    flags: List[Tuple[str, str, Any]] = []
    if mode is not None:
        flags.append(("--mode", "mode", mode))
    if scopes:
        flags.append(("--scope", "scopes", [_absolute(s) for s in scopes]))
    if keys:
        flags.append(("--key", "trust", dict(doc["trust"], keys=[_absolute(k) for k in keys])))
    if state_dir is not None:
        flags.append(("--state-dir", "state_dir", _absolute(state_dir)))
    if log_dir is not None:
        flags.append(("--log-dir", "log_dir", _absolute(log_dir)))
    if on_agent_exit is not None:
        flags.append(("--on-agent-exit", "on_agent_exit", on_agent_exit))
    for flag, key, value in flags:
        try:
            schema.POLICY(dict(doc, **{key: value}), "")
        except schema.SchemaError as exc:
            raise MalformedInput(flag, exc.problem) from None
        doc[key] = value
        shown = value["keys"] if key == "trust" else value
        applied.append(f"{flag} {' '.join(shown) if isinstance(shown, list) else shown}")
    if not applied:
        return snapshot
    lines = [r.source_line for r in snapshot.rules]
    try:
        return build_snapshot(schema.normalize(doc), snapshot.source, lines,
                              snapshot.overrides + tuple(applied))
    except MalformedInput as exc:  # e.g. a --key file that does not parse
        raise MalformedInput(f"{snapshot.source} with {', '.join(applied)}",
                             exc.problem) from None
