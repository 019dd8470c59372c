"""The ``execguard`` command: one module per verb, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from agent import __version__

# verb -> module under agent.cli; each module defines add_parser(subparsers) and run(args) -> int
VERBS = {
    "verify": "verify_cmd",
    "goinfo": "goinfo_cmd",
    "keygen": "keys_cmd",
    "sign": "keys_cmd",
    "doctor": "doctor_cmd",
    "status": "status_cmd",
    "run": "run_cmd",
    "denials": "denials_cmd",
    "breakglass": "breakglass_cmd",
    "stop": "stop_cmd",
    "policy": "policy_cmd",
}

EXIT_OK, EXIT_UNTRUSTED, EXIT_ERROR = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="execguard",
        description="Let a Go binary execute only when a cosign/Sigstore signature the host "
        "trusts covers it.",
        epilog="Run 'execguard VERB --help' for each verb. Exit codes: 0 ok/trusted, "
        "1 untrusted or not applicable, 2 usage or I/O error.",
    )
    parser.add_argument("--version", action="version", version=f"execguard {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    seen = set()
    for module_name in VERBS.values():
        if module_name in seen:
            continue
        seen.add(module_name)
        module = importlib.import_module(f"agent.cli.{module_name}")
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
