"""``execguard status``: ask the running agent over its root-only control socket."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

from agent.cli.exits import EXIT_NO_AGENT, EXIT_OK
from agent.control import ControlError, client_socket, request


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "status", help="report the running agent's state, backend and counters",
        description="Ask the running agent over its control socket. Exit 0 when an agent "
        "answers, 3 when none does (not running, or stalled past --timeout).")
    p.add_argument("--state-dir", metavar="DIR",
                   help="the agent's state directory (its socket is DIR/control.sock); "
                   "default /run/execguard/control.sock")
    p.add_argument("--socket", metavar="PATH", help="control socket path (overrides --state-dir)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S")
    p.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    p.set_defaults(run=run)


def _flatten(prefix: str, value: Any, out: List[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out.append(f"{prefix:<28} {value}")


def tamper_line(status: Dict[str, Any]) -> str:
    """What stopping this agent would do (docs/threat-model.md, "Tamper resistance")."""
    sensor = status.get("sensor")
    t = sensor.get("tamper") if isinstance(sensor, dict) else None
    if not isinstance(t, dict) or not t.get("keep_enforcing"):
        return ("on agent exit: fail-open (stopping the agent ends enforcement; "
                "execguard stop --token is the authenticated way)")
    how = ("self-protected: the kernel refuses signals, ptrace and bpf() aimed at it"
           if t.get("protected") else "not self-protected: root's kill or rm of the pins "
           "ends it")
    return (f"on agent exit: keep-enforcing (programs pinned in {t.get('pin_directory')}; "
            f"{how}; execguard stop --token ends it)")


def render(status: Dict[str, Any]) -> str:
    head = (f"execguard {status.get('state', '?')}: backend {status.get('backend', '?')}, "
            f"enforcement {status.get('enforcement', '?')}, mode {status.get('mode', '?')}")
    lines: List[str] = [head]
    breakglass = status.get("breakglass")
    if isinstance(breakglass, dict) and breakglass.get("active"):
        from agent.cli.breakglass_cmd import describe

        lines.append(describe(breakglass))
    lines.append(tamper_line(status))
    for warning in status.get("warnings", []) or []:
        lines.append(f"WARNING: {warning}")
    rest = {k: v for k, v in status.items()
            if k not in ("state", "backend", "enforcement", "mode", "warnings")}
    _flatten("", rest, lines)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    path = client_socket(args.socket, args.state_dir)
    try:
        status = request(path, "status", timeout=args.timeout)
    except ControlError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "state": "absent"}))
        else:
            print(f"execguard status: {exc}", file=sys.stderr)
        return EXIT_NO_AGENT
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else render(status))
    return EXIT_OK
