"""The ``execguard`` command: one module per verb, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import List, NoReturn, Optional

from agent import __version__
from agent.cli.exits import EXIT_OK, TABLE, with_table

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



class Parser(argparse.ArgumentParser):
    """argparse, but a usage error on a command line that asked for --json is also one JSON
    object on stdout, as every other error of every verb is (README, "Exit codes")."""

    json_asked = False  # set by main() from the raw command line, before parsing

    def error(self, message: str) -> NoReturn:
        if Parser.json_asked:
            print(json.dumps({"error": f"{self.prog}: {message}"}))
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="execguard",
        description="Let a Go binary execute only when a cosign/Sigstore signature the host "
        "trusts covers it.",
        epilog=f"Run 'execguard VERB --help' for each verb. {TABLE}",
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
    _tables(sub)
    return parser


def _tables(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Every verb's --help ends with the one exit-code table (and so do nested verbs')."""
    for p in set(sub.choices.values()):
        p.epilog = with_table(p.epilog)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _tables(action)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    Parser.json_asked = "--json" in (sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
