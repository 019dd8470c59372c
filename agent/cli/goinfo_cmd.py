"""``execguard goinfo FILE [--json]``: the embedded Go build info, like ``go version -m``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

from agent.cli.exits import EXIT_ERROR, EXIT_OK
from agent.cli.exits import EXIT_NO as EXIT_NOT_GO
from agent.cli.exits import EXIT_PARTIAL as EXIT_RUNTIME_ONLY
from agent.digest import Artifact
from agent.errors import InputError, NotGoBinary
from agent.goinfo import MALFORMED, RUNTIME, GoEvidence, inspect_go, read_buildinfo
from agent.goinfo.gostr import encode


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "goinfo",
        help="show the Go build info embedded in a binary (like 'go version -m')",
        description="Print the Go version, module, dependencies and build settings embedded "
        "in an ELF binary. The build info is the builder's unauthenticated claim. Without "
        "build info, say whether the Go runtime's tables (pclntab, moduledata) are there: "
        "such a file is Go all the same (docs/goinfo.md). Exit codes: 0 Go build info found, "
        "1 not Go (neither build info nor Go runtime), 2 unreadable or malformed file, "
        "3 Go runtime found but no Go build info.",
    )
    parser.add_argument("file", help="the binary to read")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def _write(text: str) -> None:
    # Build info may hold bytes that are not UTF-8: print them back unchanged, as Go does.
    sys.stdout.flush()
    sys.stdout.buffer.write(encode(text))
    sys.stdout.flush()


def _emit_json(obj: Dict[str, Any]) -> None:
    _write(json.dumps(obj, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    path: str = args.file
    try:
        with Artifact.open(path) as artifact:
            try:
                info = read_buildinfo(artifact)
            except NotGoBinary:
                # no build info is not "not Go": look for the runtime's own tables
                return _without_buildinfo(args, path, inspect_go(artifact))
    except InputError as exc:
        return _error(args, str(exc))
    if args.json:
        _emit_json(info.to_json())
    else:
        _write(info.format_like_go_version_m(path))
    return EXIT_OK


def _error(args: argparse.Namespace, message: str) -> int:
    if args.json:
        _emit_json({"error": message})
    else:
        print(f"execguard goinfo: {message}", file=sys.stderr)
    return EXIT_ERROR


def _without_buildinfo(args: argparse.Namespace, path: str, found: GoEvidence) -> int:
    if found.established_by == MALFORMED:  # a file built to defeat the runtime search
        return _error(args, f"{path}: {found.detail}")
    if found.established_by == RUNTIME and found.runtime is not None:
        if args.json:
            _emit_json({"is_go": True, "file": path, "evidence": RUNTIME, "go_version": None,
                        "detail": found.detail, "runtime": found.runtime.to_json()})
        else:
            _write(f"{path}: Go binary without Go build info: {found.detail}\n")
        return EXIT_RUNTIME_ONLY
    if args.json:
        _emit_json({"is_go": False, "file": path, "detail": found.detail})
    else:
        _write(f"{path}: {found.detail}\n")
    return EXIT_NOT_GO
