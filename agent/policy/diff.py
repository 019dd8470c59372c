"""What changes between two policies (files or signed bundles): fields, and rules by id.

Both sides are compared in their normalized form (every default filled in), so a TOML file
and the bundle built from it differ in nothing but what the bundle adds (version, validity,
embedded keys). Bundles are read without checking their signatures: ``policy verify`` does
that; a diff only shows content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from agent.errors import MalformedInput
from agent.policy import schema
from agent.policy.bundle import (
    PolicyBundle,
    format_time,
    looks_like_bundle,
    parse_envelope_bytes,
    parse_payload,
    read_bundle_file,
)
from agent.policy.load import _format, _parse


@dataclass(frozen=True)
class Side:
    label: str
    policy: Dict[str, Any]
    bundle: Optional[PolicyBundle] = None


def load_side(path: str) -> Side:
    """A policy file (TOML/JSON, schema-checked, key files not read) or a bundle's payload."""
    data = read_bundle_file(path)
    if looks_like_bundle(data):
        bundle = parse_payload(parse_envelope_bytes(data, path).payload, path)
        return Side(path, bundle.policy, bundle)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedInput(path, f"not UTF-8 text ({exc})") from None
    try:
        policy = schema.normalize(_parse(text, _format(path, text), path))
    except schema.SchemaError as exc:
        raise MalformedInput(path, str(exc)) from None
    return Side(path, policy)


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[Dict[str, Any]]:
    fa, fb = _flatten(a), _flatten(b)
    return [{"field": k, "a": fa.get(k), "b": fb.get(k)}
            for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def diff(a: Side, b: Side) -> Dict[str, Any]:
    """The JSON-ready difference; ``changed`` is False when the policies are the same."""
    top_a = {k: v for k, v in a.policy.items() if k not in ("rules", "version")}
    top_b = {k: v for k, v in b.policy.items() if k not in ("rules", "version")}
    rules_a = {r["id"]: r for r in a.policy["rules"]}
    rules_b = {r["id"]: r for r in b.policy["rules"]}
    order_a = [r["id"] for r in a.policy["rules"]]
    order_b = [r["id"] for r in b.policy["rules"]]
    common = [i for i in order_a if i in rules_b]
    moved = common != [i for i in order_b if i in rules_a]
    rules = {
        "added": [rules_b[i] for i in order_b if i not in rules_a],
        "removed": [rules_a[i] for i in order_a if i not in rules_b],
        "changed": [{"id": i, "changes": _changes(rules_a[i], rules_b[i])}
                    for i in common if rules_a[i] != rules_b[i]],
        "order": {"a": order_a, "b": order_b} if moved else None,
    }
    out: Dict[str, Any] = {
        "a": a.label, "b": b.label,
        "version": {"a": a.policy["version"], "b": b.policy["version"]},
        "fields": _changes(top_a, top_b), "rules": rules,
        "bundle": _bundle_changes(a.bundle, b.bundle),
    }
    bd = out["bundle"]
    bundle_changed = bd is not None and bool(bd["keys_added"] or bd["keys_removed"]
                                             or bd["roots_changed"]
                                             or bd["expires"]["a"] != bd["expires"]["b"])
    out["changed"] = bool(a.policy["version"] != b.policy["version"] or out["fields"]
                          or rules["added"] or rules["removed"] or rules["changed"] or moved
                          or bundle_changed)
    return out


def _bundle_changes(a: Optional[PolicyBundle], b: Optional[PolicyBundle]
                    ) -> Optional[Dict[str, Any]]:
    if a is None and b is None:
        return None
    keys_a = set(a.fingerprints()) if a is not None else set()
    keys_b = set(b.fingerprints()) if b is not None else set()

    def when(x: Optional[PolicyBundle], attr: str) -> Optional[str]:
        return format_time(getattr(x, attr)) if x is not None else None

    return {"issued_at": {"a": when(a, "issued_at"), "b": when(b, "issued_at")},
            "expires": {"a": when(a, "expires"), "b": when(b, "expires")},
            "digest": {"a": a.digest if a else None, "b": b.digest if b else None},
            "keys_added": sorted(keys_b - keys_a), "keys_removed": sorted(keys_a - keys_b),
            "roots_changed": (a.roots if a else {}) != (b.roots if b else {})}


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def render(d: Mapping[str, Any]) -> str:
    """The human view: one line per change, + added, - removed, ~ changed."""
    lines = [f"--- {d['a']}", f"+++ {d['b']}"]
    v = d["version"]
    if v["a"] != v["b"]:
        lines.append(f"version: {v['a']} -> {v['b']}")
    bundle = d["bundle"]
    if bundle is not None:
        for name in ("expires", "issued_at"):
            if bundle[name]["a"] != bundle[name]["b"]:
                lines.append(f"{name}: {bundle[name]['a']} -> {bundle[name]['b']}")
        lines += [f"+ embedded key {k}" for k in bundle["keys_added"]]
        lines += [f"- embedded key {k}" for k in bundle["keys_removed"]]
        if bundle["roots_changed"]:
            lines.append("~ embedded trusted root changed")
    for c in d["fields"]:
        lines.append(f"~ {c['field']}: {_show(c['a'])} -> {_show(c['b'])}")
    rules = d["rules"]
    for r in rules["added"]:
        lines.append(f"+ rule {r['id']} ({r['action']}): {_show(r['match'])}")
    for r in rules["removed"]:
        lines.append(f"- rule {r['id']} ({r['action']})")
    for r in rules["changed"]:
        for c in r["changes"]:
            lines.append(f"~ rule {r['id']} {c['field']}: {_show(c['a'])} -> {_show(c['b'])}")
    if rules["order"] is not None:
        lines.append(f"~ rule order: {', '.join(rules['order']['a'])} -> "
                     f"{', '.join(rules['order']['b'])}")
    if not d["changed"]:
        lines.append("no differences")
    return "\n".join(lines)
