"""``execguard goinfo FILE [--json]``: the embedded Go build info, like ``go version -m``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

from agent.digest import Artifact
from agent.errors import InputError, NotGoBinary
from agent.goinfo import read_buildinfo
from agent.goinfo.gostr import encode

EXIT_OK, EXIT_NOT_GO, EXIT_ERROR = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "goinfo",
        help="show the Go build info embedded in a binary (like 'go version -m')",
        description="Print the Go version, module, dependencies and build settings embedded "
        "in an ELF binary. The build info is the builder's unauthenticated claim. Exit codes: "
        "0 Go build info found, 1 no Go build info, 2 unreadable or malformed file.",
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
            info = read_buildinfo(artifact)
    except NotGoBinary as exc:
        detail = getattr(exc, "detail", str(exc))
        if args.json:
            _emit_json({"is_go": False, "file": path, "detail": detail})
        else:
            _write(f"{path}: {detail}\n")
        return EXIT_NOT_GO
    except InputError as exc:
        if args.json:
            _emit_json({"error": str(exc)})
        else:
            print(f"execguard goinfo: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        _emit_json(info.to_json())
    else:
        _write(info.format_like_go_version_m(path))
    return EXIT_OK
