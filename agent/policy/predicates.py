"""Go predicates: small checks on a subject whose signature is already trusted.

Each raises ``PolicyViolation`` or returns. A Go subject whose build info could not be read
fails every one of them: no build info means nothing can be proven about it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import FrozenSet, Optional, Sequence, Tuple

from agent.errors import Reason
from agent.goinfo.model import BuildInfo
from agent.policy.model import ModulePin, PolicyViolation, Predicate, Subject

_GO_VERSION = re.compile(r"(?:go)?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:(beta|rc)(\d+))?")
_SEMVER = re.compile(r"v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                     r"(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?")
_PRE_RANK = {"beta": 0, "rc": 1, None: 2}  # go1.21rc2 < go1.21.0


def parse_go_version(text: str) -> Optional[Tuple[int, int, int, int, int]]:
    """``go1.21.3`` / ``1.21`` / ``go1.22rc1`` as a comparable tuple; None if not a release.

    Anything after the version (`` X:boringcrypto``) is ignored; ``devel`` builds are None.
    """
    text = text.strip()
    m = _GO_VERSION.match(text)
    if m is None or (m.end() < len(text) and not text[m.end()].isspace()):
        return None
    major, minor, patch, pre, pre_n = m.groups()
    return (int(major), int(minor or 0), int(patch or 0), _PRE_RANK[pre], int(pre_n or 0))


def parse_semver(text: str) -> Optional[Tuple[int, int, int, Tuple[Tuple[int, str], ...]]]:
    """A Go module version as a comparable tuple (semver 2.0 precedence); None if not one."""
    m = _SEMVER.fullmatch(text)
    if m is None:
        return None
    pre = m.group(4)
    # Release sorts after any prerelease; numeric identifiers sort before alphanumeric ones.
    key: Tuple[Tuple[int, str], ...] = ((2, ""),)
    if pre is not None:
        key = tuple((0, ident.zfill(20)) if ident.isdigit() else (1, ident)
                    for ident in pre.split("."))
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), key


def _require_buildinfo(subject: Subject, needs: str) -> BuildInfo:
    """The build info ``needs`` (a predicate's description) reads; a Go file without it
    fails: the runtime runs without build info, so nothing about the build is provable."""
    if subject.buildinfo is None:
        why = f" ({subject.go_detail})" if subject.go_detail else ""
        raise PolicyViolation(Reason.GO_PREDICATE,
                              f"cannot check {needs}: this Go binary has no readable Go "
                              f"build info{why}")
    return subject.buildinfo


def _require_modules(subject: Subject, needs: str) -> BuildInfo:
    """The build info with its module information: a Go file whose module info is absent
    (built without modules) or unframable holds no module list or settings to check, so a
    predicate that reads them fails (the Go version stays readable: MinGoVersion)."""
    info = _require_buildinfo(subject, needs)
    if info.no_module_info:
        raise PolicyViolation(Reason.GO_PREDICATE,
                              f"cannot check {needs}: this Go binary has no module "
                              f"information ({info.no_module_info})")
    return info


@dataclass(frozen=True)
class MinGoVersion:
    minimum: str

    def check(self, subject: Subject) -> None:
        info = _require_buildinfo(subject, self.describe())
        have, want = parse_go_version(info.go_version), parse_go_version(self.minimum)
        if want is None:
            raise PolicyViolation(Reason.GO_PREDICATE, f"bad minimum Go version {self.minimum!r}")
        if have is None:
            raise PolicyViolation(Reason.GO_PREDICATE,
                                  f"built with {info.go_version!r}, not a Go release "
                                  f"comparable with {self.minimum}")
        if have < want:
            raise PolicyViolation(Reason.GO_PREDICATE,
                                  f"built with {info.go_version}, older than {self.minimum}")

    def describe(self) -> str:
        return f"Go >= {self.minimum}"


@dataclass(frozen=True)
class DenyVcsModified:
    """Reject binaries built from a working tree with uncommitted changes."""

    def check(self, subject: Subject) -> None:
        info = _require_modules(subject, self.describe())
        if info.setting("vcs.modified") == "true":
            revision = info.setting("vcs.revision") or "unknown revision"
            raise PolicyViolation(Reason.GO_PREDICATE,
                                  f"built from a modified working tree (vcs.modified=true, "
                                  f"{revision})")

    def describe(self) -> str:
        return "vcs.modified is not true"


@dataclass(frozen=True)
class RequireTrimpath:
    """The binary was built with ``-trimpath`` (build setting ``-trimpath=true``): no build
    machine paths in it, and a prerequisite for a reproducible build."""

    def check(self, subject: Subject) -> None:
        info = _require_modules(subject, self.describe())
        value = info.setting("-trimpath")
        if value != "true":
            raise PolicyViolation(Reason.GO_PREDICATE,
                                  "not built with -trimpath (build setting -trimpath="
                                  f"{value if value is not None else 'absent'})")

    def describe(self) -> str:
        return "-trimpath=true"


@dataclass(frozen=True)
class ModuleBan:
    """A module denied at exact ``versions`` and/or at every version ``below`` one."""

    path: str
    versions: FrozenSet[str] = frozenset()
    below: Optional[str] = None

    def hits(self, version: str) -> bool:
        if version in self.versions:
            return True
        if self.below is None:
            return False
        have, limit = parse_semver(version), parse_semver(self.below)
        # An unparseable version ("(devel)", a local path) cannot be shown to be new enough.
        return have is None or limit is None or have < limit

    def describe(self) -> str:
        parts = sorted(self.versions) + ([f"< {self.below}"] if self.below else [])
        return f"{self.path} at {' or '.join(parts)}"


@dataclass(frozen=True)
class DenyModules:
    bans: Tuple[ModuleBan, ...]

    def check(self, subject: Subject) -> None:
        info = _require_modules(subject, self.describe())
        mods = ([info.main] if info.main is not None else []) + list(info.deps)
        for mod in mods:
            # A replaced module runs the replacement's code, so both names are checked.
            for cand in (mod, mod.replace):
                if cand is None:
                    continue
                for ban in self.bans:
                    if cand.path == ban.path and ban.hits(cand.version):
                        raise PolicyViolation(Reason.GO_PREDICATE,
                                              f"contains denied module {cand.path}@"
                                              f"{cand.version} ({ban.describe()})")

    def describe(self) -> str:
        return "no " + "; no ".join(b.describe() for b in self.bans)


@dataclass(frozen=True)
class SignerForModule:
    """The first pin whose module glob matches the main module names the allowed signers."""

    pins: Tuple[ModulePin, ...]

    def check(self, subject: Subject) -> None:
        _require_modules(subject, self.describe())
        module = subject.module
        pin = next((p for p in self.pins if module is not None and p.module.matches(module)),
                   None)
        if pin is None or pin.signers.bind(module).accepts(subject.evidence):
            return
        ev = subject.evidence
        keyless = ev is not None and ev.key_fingerprint is None
        signer = ("no signature evidence" if ev is None else
                  f"{ev.identity} from {ev.issuer}" if keyless else str(ev.key_fingerprint))
        raise PolicyViolation(Reason.IDENTITY_MISMATCH if keyless else Reason.UNTRUSTED_KEY,
                              f"module {module} must be signed by {pin.signers.describe()} "
                              f"(pinned for {pin.module.pattern}), signed by {signer}")

    def describe(self) -> str:
        return "; ".join(f"{p.module.pattern} signed by {p.signers.describe()}"
                         for p in self.pins)


class AllOf:
    """Every predicate must pass. An empty AllOf fails: nothing was required, nothing proven."""

    def __init__(self, predicates: Sequence[Predicate]) -> None:
        self.predicates: Tuple[Predicate, ...] = tuple(predicates)

    def check(self, subject: Subject) -> None:
        if not self.predicates:
            raise PolicyViolation(Reason.GO_PREDICATE, "empty AllOf: no requirement to satisfy")
        for predicate in self.predicates:
            predicate.check(subject)

    def describe(self) -> str:
        return " and ".join(p.describe() for p in self.predicates) or "nothing (fails)"


class AnyOf:
    """At least one predicate must pass; an empty AnyOf fails."""

    def __init__(self, predicates: Sequence[Predicate]) -> None:
        self.predicates: Tuple[Predicate, ...] = tuple(predicates)

    def check(self, subject: Subject) -> None:
        failures = []
        for predicate in self.predicates:
            try:
                predicate.check(subject)
                return
            except PolicyViolation as exc:
                failures.append(exc)
        if not failures:
            raise PolicyViolation(Reason.GO_PREDICATE, "empty AnyOf: no alternative given")
        raise PolicyViolation(failures[0].reason, "; ".join(f.detail for f in failures))

    def describe(self) -> str:
        return " or ".join(p.describe() for p in self.predicates) or "nothing (fails)"
