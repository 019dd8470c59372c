"""``execguard stop``: stop the running agent with a signed break-glass token (grant stop)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional

from agent.breakglass.token import DEFAULT_KEYS_DIR, MAX_REASON, reason_ok
from agent.cli.breakglass_cmd import _read_token, _socket_args
from agent.cli.exits import EXIT_ERROR, EXIT_NO_AGENT, EXIT_OK
from agent.cli.exits import EXIT_NO as EXIT_REJECTED
from agent.control import ControlError, client_socket, request
from agent.errors import ExecguardError

EPILOG = ("0 here: the agent accepted the token and is stopping; 1: rejected (the code is in "
          "the message and in --json's \"rejected\"). See docs/breakglass.md, \"Stopping "
          "the agent\".")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stop", help="stop the running agent, authorized by a signed stop token",
        description="Send a break-glass token with grant 'stop' (execguard breakglass issue "
        "--grant stop) to the running agent over its root-only control socket. The agent "
        f"checks it as it checks break-glass tokens (the keys pinned in {DEFAULT_KEYS_DIR}/, "
        "this host's hostname and machine-id, the validity window, single use), records "
        "the stop, answers, then stops and releases its enforcement: a BPF backend removes "
        "its pinned programs and its self-protection. A refused token is recorded and the "
        "agent keeps running. On bpf-lsm hosts with keep-enforcing the kernel refuses "
        "signals to the agent, so this is the only way to end enforcement short of a "
        "reboot; on the fanotify and kill backends SIGTERM still stops it, and this is the "
        "authenticated way everywhere.",
        epilog=EPILOG)
    p.add_argument("--token", required=True, metavar="FILE",
                   help="the stop token (a file, or - for standard input)")
    p.add_argument("--why", metavar="TEXT",
                   help="why you stop it (recorded with the stop, next to the token's reason)")
    _socket_args(p)
    p.set_defaults(run=run)


def _fail(args: argparse.Namespace, message: str, code: int,
          extra: Optional[Dict[str, Any]] = None) -> int:
    if args.json:
        print(json.dumps({"error": message, **(extra or {})}))
    else:
        print(f"execguard stop: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    if args.why is not None and not reason_ok(args.why):
        return _fail(args, f"--why must be 1 to {MAX_REASON} printable characters on one line",
                     EXIT_ERROR)
    fields = {"why": args.why.strip()} if args.why else {}
    path = client_socket(args.socket, args.state_dir)
    try:
        token = _read_token(args.token)
        reply = request(path, "stop", timeout=args.timeout, token=token, **fields)
    except ExecguardError as exc:
        return _fail(args, str(exc), EXIT_ERROR)
    except ControlError as exc:
        return _fail(args, str(exc), EXIT_NO_AGENT)
    if "error" in reply:
        if "rejected" in reply:
            return _fail(args, f"rejected: {reply['error']}", EXIT_REJECTED,
                         {"rejected": reply["rejected"]})
        return _fail(args, str(reply["error"]), EXIT_ERROR)
    if not reply.get("stopping"):  # an agent without the verb answers with an error above
        return _fail(args, f"unexpected answer: {json.dumps(reply)}", EXIT_ERROR)
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    else:
        released = " and releases its enforcement" if reply.get("release") else ""
        print(f"execguard agent (pid {reply.get('pid')}, backend {reply.get('backend')}) is "
              f"stopping{released}: authorized by token {str(reply.get('token'))[:12]} "
              f"(issuer {reply.get('issuer')}): {reply.get('reason')}")
    return EXIT_OK
