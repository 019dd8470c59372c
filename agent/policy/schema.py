"""The policy document's schema: checks every key and type, and fills in every default.

``normalize(doc)`` returns the canonical document (plain JSON data). It raises
``SchemaError(where, problem)`` naming the key, e.g. ``rules[2] (id web).match.go``.
Semantic checks that need no I/O (globs, regexes, versions) happen here too, so a policy
that passes ``normalize`` fails later only on files it names (keys, trusted root).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from agent.policy.globs import Glob, GlobError
from agent.policy.predicates import parse_go_version, parse_semver
from agent.verify.fulcio_ext import ARC, NAMES, oid_for

Validator = Callable[[Any, str], Any]
_REQUIRED = object()
_TABLE = object()  # default: the table with all of its own defaults


class Omitted:
    """Default of a key added after the first release: at its default value the key is left
    out of the canonical document, so the digest of a policy that does not use it is
    unchanged (and spelling the default out still does not change the digest)."""

    def __init__(self, value: Any) -> None:
        self.value = value

_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")

DEFAULT_KEY_DIR = "/etc/execguard/keys/"


class SchemaError(ValueError):
    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def _expect(ok: bool, value: Any, what: str, where: str) -> None:
    if not ok:
        raise SchemaError(where, f"expected {what}, got {_kind(value)} {value!r}"[:300])


def integer(lo: int, hi: int) -> Validator:
    def check(value: Any, where: str) -> int:
        _expect(type(value) is int, value, "an integer", where)  # bool is not an integer
        if not lo <= value <= hi:
            raise SchemaError(where, f"{value} is out of range [{lo}, {hi}]")
        return int(value)
    return check


def boolean(value: Any, where: str) -> bool:
    _expect(type(value) is bool, value, "true or false", where)
    return bool(value)


def string(value: Any, where: str) -> str:
    _expect(isinstance(value, str), value, "a string", where)
    if "\x00" in value:
        raise SchemaError(where, "NUL byte in string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a JSON "\udcff" escape: a lone surrogate, not text
        raise SchemaError(where, "string is not valid Unicode (lone surrogate)") from None
    return str(value)


def nonempty(value: Any, where: str) -> str:
    text = string(value, where)
    if not text.strip():
        raise SchemaError(where, "must not be empty")
    return text


def choice(*allowed: str) -> Validator:
    def check(value: Any, where: str) -> str:
        names = [repr(a) for a in allowed]
        what = " or ".join(names) if len(names) < 3 else "one of " + ", ".join(names)
        _expect(isinstance(value, str) and value in allowed, value, what, where)
        return str(value)
    return check


def abs_path(value: Any, where: str) -> str:
    text = string(value, where)
    if not text.startswith("/"):
        raise SchemaError(where, f"{text!r} is not an absolute path")
    return text


def _glob(absolute: bool) -> Validator:
    def check(value: Any, where: str) -> str:
        text = string(value, where)
        try:
            Glob.compile(text, absolute)
        except GlobError as exc:
            kind = "path" if absolute else "module"
            raise SchemaError(where, f"bad {kind} glob: {exc}") from None
        return text
    return check


path_glob, module_glob = _glob(True), _glob(False)


def regex(value: Any, where: str) -> str:
    text = nonempty(value, where)
    try:
        re.compile(text)
    except re.error as exc:
        raise SchemaError(where, f"bad regular expression {text!r}: {exc}") from None
    return text


def key_ref(value: Any, where: str) -> str:
    text = string(value, where)
    if text.startswith("sha256:"):
        if not _FINGERPRINT.fullmatch(text):
            raise SchemaError(where, f"{text!r} is not sha256: followed by 64 lowercase hex digits")
        return text
    return abs_path(text, where)


def go_version(value: Any, where: str) -> str:
    text = nonempty(value, where)
    if parse_go_version(text) is None:
        raise SchemaError(where, f"{text!r} is not a Go version such as \"1.21\" or \"go1.22.3\"")
    return text


def semver(value: Any, where: str) -> str:
    text = nonempty(value, where)
    if parse_semver(text) is None:
        raise SchemaError(where, f"{text!r} is not a module version such as \"v1.2.3\"")
    return text


def go_match(value: Any, where: str) -> Any:
    _expect(type(value) is bool or value == "any", value, 'true, false or "any"', where)
    return value


def optional(inner: Validator) -> Validator:
    def check(value: Any, where: str) -> Any:
        return None if value is None else inner(value, where)
    return check


def array(item: Validator, nonempty_list: bool = False) -> Validator:
    def check(value: Any, where: str) -> List[Any]:
        _expect(isinstance(value, list), value, "an array", where)
        if nonempty_list and not value:
            raise SchemaError(where, "must not be empty (omit the key for the default)")
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return check


Fields = Dict[str, Tuple[Validator, Any]]


def table(fields: Fields, check: Optional[Callable[[Dict[str, Any], str], None]] = None,
          ) -> Validator:
    def validate(value: Any, where: str) -> Dict[str, Any]:
        _expect(isinstance(value, dict), value, "a table", where)
        prefix = f"{where}." if where else ""
        for key in value:
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise SchemaError(f"{prefix}{key}", f"unknown key (known keys: {known})")
        out: Dict[str, Any] = {}
        for key, (validator, default) in fields.items():
            if isinstance(default, Omitted):
                if key in value:
                    checked = validator(value[key], prefix + key)
                    if checked != default.value:
                        out[key] = checked
            elif key in value:
                out[key] = validator(value[key], prefix + key)
            elif default is _REQUIRED:
                raise SchemaError(prefix + key, "required key is missing")
            elif default is _TABLE:
                out[key] = validator({}, prefix + key)
            else:
                out[key] = default
        if check is not None:
            check(out, where)
        return out
    return validate


def _one_san(ident: Dict[str, Any], where: str) -> None:
    if (ident["san"] is None) == (ident["san_regex"] is None):
        raise SchemaError(where, "give exactly one of san or san_regex with the issuer")


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _templated(inner: Validator, allowed: bool) -> Validator:
    """``{module_repo}`` is a placeholder where ``allowed`` (go.module_signers), an error
    elsewhere; any other ``{name}`` is an error (a typo must not become a literal)."""
    def check(value: Any, where: str) -> Any:
        text = string(value, where)
        for m in _PLACEHOLDER.finditer(text):
            if m.group(1) != "module_repo":
                raise SchemaError(where, f"unknown placeholder {m.group(0)} (the only one is "
                                  "{module_repo})")
            if not allowed:
                raise SchemaError(where, "{module_repo} is only filled in within "
                                  "go.module_signers, where the binary's module is known")
        # checked with a sample repository: the regex must compile once filled in
        inner(_PLACEHOLDER.sub("github.com/o/r", text), where)
        return text
    return check


def _extension_map(value_check: Validator) -> Validator:
    def check(value: Any, where: str) -> Dict[str, str]:
        _expect(isinstance(value, dict), value, "a table of extension name = value", where)
        out: Dict[str, str] = {}
        for key, item in value.items():
            here = f"{where}.{key}"
            if oid_for(key) is None:
                known = ", ".join(sorted(NAMES))
                raise SchemaError(here, f"not a Fulcio extension (known names: {known}; or a "
                                  f"dotted OID under {ARC[:-1]})")
            out[key] = value_check(item, here)
        oids = [oid_for(k) for k in out]
        if len(set(oids)) != len(oids):
            raise SchemaError(where, "names the same extension twice (by name and by OID)")
        return out
    return check


def _identity(templates: bool) -> Validator:
    return table({"issuer": (nonempty, _REQUIRED),
                  "san": (optional(_templated(nonempty, templates)), None),
                  "san_regex": (optional(_templated(regex, templates)), None),
                  "extensions": (_extension_map(_templated(nonempty, templates)), Omitted({})),
                  "extensions_regex": (_extension_map(_templated(regex, templates)),
                                       Omitted({}))},
                 _one_san)


IDENTITY = _identity(templates=False)
PIN_IDENTITY = _identity(templates=True)


def _some_signer(signers: Dict[str, Any], where: str) -> None:
    if not signers["keys"] and not signers["identities"]:
        raise SchemaError(where, "names no key and no identity, so nothing could satisfy it")


SIGNER_FIELDS: Fields = {"keys": (array(key_ref), []), "identities": (array(IDENTITY), [])}
SIGNERS = table(SIGNER_FIELDS, _some_signer)
PIN = table({"module": (module_glob, _REQUIRED), "keys": (array(key_ref), []),
             "identities": (array(PIN_IDENTITY), [])}, _some_signer)


def _ban_has_versions(ban: Dict[str, Any], where: str) -> None:
    if not ban["versions"] and ban["below"] is None:
        raise SchemaError(where, "give versions and/or below: which versions are denied?")


BAN = table({"path": (nonempty, _REQUIRED), "versions": (array(nonempty), []),
             "below": (optional(semver), None)}, _ban_has_versions)


def _some_predicate(go: Dict[str, Any], where: str) -> None:
    if (go["min_version"] is None and not go["deny_vcs_modified"] and not go["deny_modules"]
            and not go["module_signers"] and not go.get("require_trimpath", False)):
        raise SchemaError(where, "sets no Go predicate (remove the table, or set one)")


GO = table({"min_version": (optional(go_version), None),
            "deny_vcs_modified": (boolean, False),
            "deny_modules": (array(BAN), []),
            "module_signers": (array(PIN), []),
            "require_trimpath": (boolean, Omitted(False))}, _some_predicate)
_IDS = optional(array(integer(0, 2**32 - 1), nonempty_list=True))
MATCH = table({"paths": (array(path_glob, nonempty_list=True), ["/**"]),
               "go": (go_match, "any"),
               "uids": (_IDS, None),
               "module": (optional(module_glob), None),
               "gids": (_IDS, Omitted(None)),
               "owner_uids": (_IDS, Omitted(None)),
               "owner_gids": (_IDS, Omitted(None))})


def _rule_consistent(rule: Dict[str, Any], where: str) -> None:
    if rule["action"] != "require-signature":
        for key in ("signers", "go"):
            if rule[key] is not None:
                raise SchemaError(f"{where}.{key}",
                                  f"only a require-signature rule takes {key}, "
                                  f"this rule's action is {rule['action']}")
    if rule["go"] is not None and rule["match"]["go"] is not True:
        raise SchemaError(f"{where}.go", "Go predicates need match.go = true")
    if rule["match"]["module"] is not None and rule["match"]["go"] is False:
        raise SchemaError(f"{where}.match.module", "a module glob never matches a non-Go file")


def _rule_id(value: Any, where: str) -> str:
    text = string(value, where)
    if not _RULE_ID.fullmatch(text):
        raise SchemaError(where, f"{text!r}: use 1-64 letters, digits, '.', '_', ':' or '-'")
    return text


RULE = table({"id": (_rule_id, _REQUIRED), "description": (string, ""),
              "action": (choice("allow", "deny", "require-signature"), _REQUIRED),
              "match": (MATCH, _TABLE), "signers": (optional(SIGNERS), None),
              "go": (optional(GO), None),
              "mode": (choice("monitor", "enforce"), Omitted(None))}, _rule_consistent)


def rules(value: Any, where: str) -> List[Dict[str, Any]]:
    _expect(isinstance(value, list), value, "an array of rule tables", where)
    out: List[Dict[str, Any]] = []
    seen: Dict[str, int] = {}
    for i, raw in enumerate(value):
        rid = raw.get("id") if isinstance(raw, dict) else None
        here = f"{where}[{i}]" + (f" (id {rid})" if isinstance(rid, str) else "")
        rule = RULE(raw, here)
        if rule["id"] in seen:
            first = f"{where}[{seen[rule['id']]}]"
            raise SchemaError(f"{here}.id", f"duplicate id, first used by {first}")
        seen[rule["id"]] = i
        out.append(rule)
    return out


# How the exec boundary is held beyond execve (docs/policy.md, "boundary"); each key's
# default is the strict one, and a policy that says nothing keeps its digest.
BOUNDARY = table({
    "loader": (choice("deny", "allow"), Omitted("deny")),
    "mappings": (choice("judge", "ignore"), Omitted("judge")),
    "ptrace": (choice("deny", "allow"), Omitted("deny")),
    "mounts": (choice("deny", "allow"), Omitted("deny")),
    "unseen_filesystems": (choice("in-scope", "out-of-scope"), Omitted("in-scope")),
})
LIMITS = table({"decision_deadline_ms": (integer(1, 60_000), 500),
                "max_file_bytes": (integer(1, 1 << 40), 256 << 20)})
TRUST = table({"keys": (array(abs_path), [DEFAULT_KEY_DIR]),
               "identities": (array(IDENTITY), []),
               "trusted_root": (optional(abs_path), None),
               "signature_stores": (array(abs_path), [])})
POLICY = table({
    "version": (integer(0, 2**63 - 1), _REQUIRED),
    "description": (string, ""),
    "mode": (choice("monitor", "enforce"), "monitor"),
    "scopes": (array(path_glob, nonempty_list=True), ["/**"]),
    # deny: a decision an attacker can slow down (a huge file, a stalling FUSE mount) must
    # not turn into an allow; monitor mode answers allow anyway
    "on_timeout": (choice("allow", "deny"), "deny"),
    # what the kernel does when the agent is gone (bpf-lsm): its pinned programs go on
    # enforcing, self-protected, until an authorized stop or a reboot; or they go with it
    "on_agent_exit": (choice("fail-open", "keep-enforcing"), Omitted("fail-open")),
    "fallthrough": (choice("allow", "deny"), "deny"),
    "state_dir": (abs_path, "/var/lib/execguard"),
    "log_dir": (abs_path, "/var/log/execguard"),
    "limits": (LIMITS, _TABLE),
    "boundary": (BOUNDARY, Omitted({})),
    "trust": (TRUST, _TABLE),
    "rules": (rules, []),
})


def normalize(doc: Any) -> Dict[str, Any]:
    """The canonical policy document, or ``SchemaError`` naming the first bad key."""
    result: Dict[str, Any] = POLICY(doc, "")
    return result
