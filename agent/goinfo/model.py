"""The parsed build info, its JSON form and its ``go version -m`` rendering."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from agent.errors import NotGoBinary
from agent.goinfo import gostr


class NoGoBuildInfo(NotGoBinary):
    """No Go build info in the file. Not proof that it is not Go: ``inspect_go`` then looks
    for the Go runtime's tables, which a Go program cannot run without."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


@dataclass(frozen=True)
class Module:
    path: str
    version: str
    sum: str = ""
    replace: Module | None = None

    def to_json(self) -> Dict[str, Any]:
        return {
            "path": self.path,
            "version": self.version,
            "sum": self.sum,
            "replace": self.replace.to_json() if self.replace is not None else None,
        }


@dataclass(frozen=True)
class BuildInfo:
    """What ``go version -m`` reports: an unauthenticated claim made by the file's builder."""

    go_version: str
    path: str = ""
    main: Module | None = None
    deps: Tuple[Module, ...] = ()
    settings: Tuple[Tuple[str, str], ...] = ()
    pointer_format: bool = False  # True for the Go 1.13-1.17 layout
    # why there is no module list when Go itself reports none ("" when there is one, or
    # the build made an empty one): a GOPATH build's zero runtime.modinfo, or broken framing
    no_module_info: str = ""

    def setting(self, key: str) -> str | None:
        """The value of build setting ``key`` (the last one if repeated), or None."""
        found = None
        for k, v in self.settings:
            if k == key:
                found = v
        return found

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "is_go": True,
            "go_version": self.go_version,
            "path": self.path,
            "main": self.main.to_json() if self.main is not None else None,
            "deps": [d.to_json() for d in self.deps],
            "settings": dict(self.settings),
        }
        if self.no_module_info:  # only then: the shape of every other answer is unchanged
            out["no_module_info"] = self.no_module_info
        return out

    def modinfo_text(self) -> str:
        """Go's BuildInfo.String() without its ``go`` line."""
        parts = []
        if self.path:
            parts.append(f"path\t{self.path}\n")
        if self.main is not None:
            parts.append(_format_module("mod", self.main))
        parts.extend(_format_module("dep", d) for d in self.deps)
        for key, value in self.settings:
            k = gostr.quote(key) if gostr.needs_quote_key(key) else key
            v = gostr.quote(value) if gostr.needs_quote_value(value) else value
            parts.append(f"build\t{k}={v}\n")
        return "".join(parts)

    def format_like_go_version_m(self, filename: str) -> str:
        """Exactly what ``go version -m FILE`` prints (strings may hold escaped raw bytes)."""
        text = self.modinfo_text()
        head = f"{filename}: {self.go_version}\n"
        if not text:
            return head
        return head + "\t" + text[:-1].replace("\n", "\n\t") + "\n"


def _format_module(word: str, mod: Module) -> str:
    # Like Go: a replaced module's line has no sum column, and a blank line follows "=>".
    tail = f"\t{mod.sum}" if mod.replace is None else "\n" + _format_module("=>", mod.replace)
    return f"{word}\t{mod.path}\t{mod.version}{tail}\n"
