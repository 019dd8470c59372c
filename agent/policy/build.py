"""Turn a normalized policy document into a ``PolicySnapshot``, loading the files it names.

This is the only step with I/O after the policy file itself is read: key files and key
directories, the trusted root, signature stores. Every failure is a ``MalformedInput``
naming the policy and the key that led to the bad file; nothing is half-built.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from agent.errors import ExecguardError, MalformedInput
from agent.policy.globs import Glob
from agent.policy.lint import unsigned_paths
from agent.policy.model import (
    Action,
    Boundary,
    Limits,
    Match,
    Mode,
    ModulePin,
    PolicySnapshot,
    Predicate,
    Rule,
    SignerSpec,
    trust_digest,
)
from agent.policy.predicates import (
    AllOf,
    DenyModules,
    DenyVcsModified,
    MinGoVersion,
    ModuleBan,
    RequireTrimpath,
    SignerForModule,
)
from agent.verify.fulcio_ext import oid_for
from agent.verify.keys import load_public_key
from agent.verify.model import IdentityRule, TrustConfig, TrustedKey
from agent.verify.trust import build_trust

KEY_SUFFIXES = (".pub", ".pem")


class TrustFiles(Protocol):
    """Trust material already in hand (a signed policy bundle's), read instead of the files
    the policy names; each raises ``ExecguardError`` for a path it does not hold."""

    def keys_at(self, path: str) -> List[TrustedKey]: ...

    def root_at(self, path: str) -> bytes: ...


class _Builder:
    def __init__(self, source: str, files: Optional[TrustFiles] = None) -> None:
        self.source = source
        self.files = files
        self.warnings: List[str] = []

    def fail(self, where: str, problem: str) -> MalformedInput:
        return MalformedInput(self.source, f"{where}: {problem}")

    def key_file(self, path: str, where: str) -> TrustedKey:
        try:
            if self.files is not None:
                found = self.files.keys_at(path)
                if len(found) != 1:
                    raise ExecguardError(f"{path}: holds {len(found)} keys, expected one")
                return found[0]
            return load_public_key(path)
        except ExecguardError as exc:
            raise self.fail(where, exc.diagnostics()) from None

    def key_dir(self, path: str, where: str) -> List[TrustedKey]:
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise self.fail(where, f"{path}: {exc.strerror or exc}") from None
        keys = []
        for name in names:
            full = os.path.join(path, name)
            if name.startswith(".") or not name.endswith(KEY_SUFFIXES):
                continue
            try:
                regular = stat.S_ISREG(os.stat(full).st_mode)
            except OSError:
                regular = False
            if regular:
                keys.append(self.key_file(full, where))
        if not keys:
            self.warnings.append(f"{where}: no *.pub or *.pem key in {path}")
        return keys

    def trusted_keys(self, paths: Sequence[str]) -> Tuple[TrustedKey, ...]:
        keys: Dict[str, TrustedKey] = {}
        for i, path in enumerate(paths):
            where = f"trust.keys[{i}]"
            if self.files is not None:
                try:
                    found = self.files.keys_at(path)
                except ExecguardError as exc:
                    raise self.fail(where, exc.diagnostics()) from None
                if not found:
                    self.warnings.append(f"{where}: no key under {path}")
            elif os.path.isdir(path):
                found = self.key_dir(path, where)
            elif path.endswith("/") and not os.path.exists(path):
                # A missing key directory (the default one on a fresh host) trusts nobody.
                self.warnings.append(f"{where}: key directory {path} does not exist")
                found = []
            else:
                found = [self.key_file(path, where)]
            for key in found:
                keys.setdefault(key.fingerprint, key)
        return tuple(keys.values())

    def trust(self, doc: Mapping[str, Any]) -> TrustConfig:
        keys = self.trusted_keys(doc["keys"])
        root: Optional[bytes] = None
        if doc["trusted_root"] is not None:
            try:
                root = (self.files.root_at(doc["trusted_root"]) if self.files is not None
                        else build_trust(trusted_root=doc["trusted_root"]).trusted_root)
            except ExecguardError as exc:
                raise self.fail("trust.trusted_root", exc.diagnostics()) from None
        for i, store in enumerate(doc["signature_stores"]):
            try:
                build_trust(store_dirs=[store])
            except ExecguardError as exc:
                raise self.fail(f"trust.signature_stores[{i}]", exc.diagnostics()) from None
        identities = tuple(_identity(d) for d in doc["identities"])
        if identities and root is None:
            self.warnings.append("trust.identities: no trust.trusted_root, so keyless "
                                 "signatures cannot verify")
        return TrustConfig(keys=keys, identities=identities, trusted_root=root,
                           trusted_root_source=doc["trusted_root"],
                           store_dirs=tuple(doc["signature_stores"]))

    def signers(self, doc: Mapping[str, Any], within: Tuple[TrustedKey, ...], where: str,
                files_ok: bool) -> SignerSpec:
        """Fingerprints must name a key in ``within``; files add keys only if ``files_ok``."""
        keys: Dict[str, TrustedKey] = {}
        for i, ref in enumerate(doc["keys"]):
            here = f"{where}.keys[{i}]"
            found: Optional[TrustedKey] = None
            if ref.startswith("sha256:"):
                fp = ref
            else:
                found = self.key_file(ref, here)
                fp = found.fingerprint
            if found is None or not files_ok:
                found = next((k for k in within if k.fingerprint == fp), None)
            if found is None:
                raise self.fail(here, f"key {fp} is not trusted here; trust it in "
                                      "trust.keys (or this rule's signers) first")
            keys.setdefault(found.fingerprint, found)
        return SignerSpec(tuple(keys.values()), tuple(_identity(d) for d in doc["identities"]))

    def rule(self, doc: Mapping[str, Any], where: str, line: Optional[int],
             trust: TrustConfig) -> Rule:
        m = doc["match"]
        match = Match(paths=tuple(Glob.compile(p) for p in m["paths"]),
                      go=m["go"] if isinstance(m["go"], bool) else None,
                      uids=tuple(m["uids"]) if m["uids"] is not None else None,
                      module=Glob.compile(m["module"], False) if m["module"] else None,
                      gids=_ids(m.get("gids")), owner_uids=_ids(m.get("owner_uids")),
                      owner_gids=_ids(m.get("owner_gids")))
        action = Action(doc["action"])
        rule_trust: Optional[TrustConfig] = None
        predicate: Optional[Predicate] = None
        pins: Tuple[ModulePin, ...] = ()
        if action is Action.REQUIRE_SIGNATURE:
            rule_trust = trust
            if doc["signers"] is not None:
                spec = self.signers(doc["signers"], trust.keys, f"{where}.signers", True)
                rule_trust = TrustConfig(spec.keys, spec.identities, trust.trusted_root,
                                         trust.trusted_root_source, trust.store_dirs)
            if doc["go"] is not None:
                pins, predicate = self.go(doc["go"], f"{where}.go", rule_trust.keys)
        mode = Mode(doc["mode"]) if doc.get("mode") is not None else None
        return Rule(doc["id"], action, match, line, doc["description"], rule_trust, predicate,
                    pins, mode)

    def go(self, doc: Mapping[str, Any], where: str, keys: Tuple[TrustedKey, ...],
           ) -> Tuple[Tuple[ModulePin, ...], Predicate]:
        checks: List[Predicate] = []
        if doc["min_version"] is not None:
            checks.append(MinGoVersion(doc["min_version"]))
        if doc["deny_vcs_modified"]:
            checks.append(DenyVcsModified())
        if doc.get("require_trimpath", False):
            checks.append(RequireTrimpath())
        if doc["deny_modules"]:
            checks.append(DenyModules(tuple(
                ModuleBan(b["path"], frozenset(b["versions"]), b["below"])
                for b in doc["deny_modules"])))
        pins = tuple(
            ModulePin(Glob.compile(p["module"], False),
                      self.signers(p, keys, f"{where}.module_signers[{i}]", False))
            for i, p in enumerate(doc["module_signers"]))
        if pins:
            checks.append(SignerForModule(pins))
        return pins, AllOf(checks)


def _identity(doc: Mapping[str, Any]) -> IdentityRule:
    def pairs(table: Mapping[str, str]) -> Tuple[Tuple[str, str], ...]:
        return tuple(sorted((str(oid_for(k)), v) for k, v in table.items()))

    return IdentityRule(issuer=doc["issuer"], san=doc["san"], san_regex=doc["san_regex"],
                        extensions=pairs(doc.get("extensions", {})),
                        extensions_regex=pairs(doc.get("extensions_regex", {})))


def _ids(value: Optional[Sequence[int]]) -> Optional[Tuple[int, ...]]:
    return tuple(value) if value is not None else None


def canonical_text(doc: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: equal documents give equal text."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def build_snapshot(doc: Mapping[str, Any], source: str,
                   lines: Sequence[Optional[int]] = (),
                   overrides: Sequence[str] = (),
                   files: Optional[TrustFiles] = None) -> PolicySnapshot:
    """``doc`` must come from ``schema.normalize``; ``lines[i]`` is rule i's source line.
    ``files``, when given, supplies every key and trusted root instead of the file system."""
    builder = _Builder(source, files)
    trust = builder.trust(doc["trust"])
    rules = []
    for i, raw in enumerate(doc["rules"]):
        line = lines[i] if i < len(lines) else None
        at = f"line {line}: " if line is not None else ""
        rules.append(builder.rule(raw, f"{at}rules[{i}] (id {raw['id']})", line, trust))
        if raw.get("mode") == "enforce" and doc["mode"] == "monitor":
            builder.warnings.append(f"{at}rules[{i}] (id {raw['id']}).mode: enforce has no "
                                    "effect while the policy's mode is monitor")
    builder.warnings += unsigned_paths(Mode(doc["mode"]), rules, Action(doc["fallthrough"]),
                                       lines)
    canonical = canonical_text(doc)
    limits = doc["limits"]
    return PolicySnapshot(
        version=doc["version"],
        digest="sha256:" + hashlib.sha256(canonical.encode()).hexdigest(),
        trust_digest=trust_digest(trust),
        source=source,
        canonical=canonical,
        mode=Mode(doc["mode"]),
        scopes=tuple(Glob.compile(s) for s in doc["scopes"]),
        rules=tuple(rules),
        fallthrough=Action(doc["fallthrough"]),
        on_timeout=Action(doc["on_timeout"]),
        state_dir=doc["state_dir"],
        log_dir=doc["log_dir"],
        limits=Limits(limits["decision_deadline_ms"], limits["max_file_bytes"]),
        trust=trust,
        warnings=tuple(builder.warnings),
        overrides=tuple(overrides),
        boundary=_boundary(doc.get("boundary", {})),
        on_agent_exit=doc.get("on_agent_exit", "fail-open"),
    )


def _boundary(doc: Mapping[str, Any]) -> Boundary:
    return Boundary(loader_exec=doc.get("loader", "deny") == "allow",
                    judge_mappings=doc.get("mappings", "judge") == "judge",
                    ptrace=doc.get("ptrace", "deny") == "allow",
                    mounts=doc.get("mounts", "deny") == "allow",
                    unseen_in_scope=doc.get("unseen_filesystems", "in-scope") == "in-scope")
