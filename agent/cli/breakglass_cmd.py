"""``execguard breakglass``: issue, apply, inspect and end a break-glass token."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Dict, Optional

from agent.breakglass.token import (
    DEFAULT_KEYS_DIR,
    DEFAULT_MAX_SECONDS,
    GRANT_MONITOR,
    GRANT_STOP,
    GRANTS,
    MAX_TOKEN_BYTES,
    HostId,
    iso,
    issue,
    local_host_id,
)
from agent.cli.exits import EXIT_ERROR, EXIT_NO_AGENT, EXIT_OK
from agent.cli.exits import EXIT_NO as EXIT_REJECTED
from agent.control import ControlError, client_socket, request
from agent.errors import ExecguardError, InputError
from agent.fileio import read_small_file

EPILOG = ("1 here: rejected (the agent refused the token, or nothing was active to end). "
          "See docs/breakglass.md.")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "breakglass", help="put this host in monitor mode for a bounded time with a signed "
        "token",
        description="Break-glass: an offline-signed token puts ONE host (hostname and "
        "machine-id) in monitor mode until the token's not_after, once. Issue it anywhere "
        "with the break-glass private key, apply it on the host, where the agent checks it "
        f"against the keys pinned in {DEFAULT_KEYS_DIR}/ (execguard run --breakglass-keys).",
        epilog=EPILOG)
    verbs = p.add_subparsers(dest="breakglass_verb", metavar="ACTION")
    verbs.required = True

    h = verbs.add_parser("host-id", help="print this host's id, for 'issue --host'",
                         description="Print HOSTNAME:MACHINE-ID (from the kernel's hostname "
                         "and /etc/machine-id): give it to whoever issues the token.",
                         epilog=EPILOG)
    h.add_argument("--json", action="store_true")
    h.set_defaults(run=run_host_id)

    i = verbs.add_parser("issue", help="sign a token for one host (offline)",
                         description="Sign a break-glass token for HOST with the private key "
                         "KEY (a cosign key, password from COSIGN_PASSWORD or a prompt, or a "
                         "plain PEM). The token is printed, or written to -o FILE. --grant "
                         "monitor (the default) is for 'breakglass apply'; --grant stop is "
                         "for 'execguard stop', which ends the agent and its enforcement. "
                         "Each is refused by the other verb (wrong-grant).",
                         epilog=EPILOG)
    i.add_argument("--host", required=True, metavar="HOST",
                   help="what 'execguard breakglass host-id' prints on the target host")
    length = i.add_mutually_exclusive_group(required=True)
    length.add_argument("--minutes", type=_finite, metavar="N",
                        help="how long it lasts (fractions allowed, e.g. 0.5)")
    length.add_argument("--seconds", type=int, metavar="N", help="how long it lasts")
    i.add_argument("--reason", required=True, metavar="TEXT",
                   help="why (goes into the token, the audit log and the ledger)")
    i.add_argument("--key", required=True, action="append", metavar="KEY",
                   help="private key to sign with; repeat it for a token signed by several "
                        "keys (the first is the issuer): a stop token may be signed by M "
                        "policy root keys instead of a break-glass key, and execguard stop "
                        "accepts it when M meets the agent's --policy-threshold")
    i.add_argument("--grant", choices=GRANTS, default=GRANT_MONITOR,
                   help="what the token allows: monitor (breakglass apply: monitor mode "
                   "until it ends; the default) or stop (execguard stop: the agent stops "
                   "and releases enforcement)")
    i.add_argument("-o", "--output", metavar="FILE", help="write the token here (mode 0600)")
    i.add_argument("--not-before", metavar="TIME",
                   help="valid from TIME (UNIX seconds or ISO 8601 UTC); default now")
    i.add_argument("--max-minutes", type=_finite, default=DEFAULT_MAX_SECONDS / 60,
                   metavar="N", help="refuse to issue longer tokens (default %(default)g; "
                   "agents enforce their own cap)")
    i.add_argument("--json", action="store_true",
                   help="print {token, payload} as one JSON object")
    i.set_defaults(run=run_issue)

    a = verbs.add_parser("apply", help="send a token to the running agent",
                         description="Send TOKEN (a file, or - for standard input) to the "
                         "agent over its root-only control socket. The agent checks the "
                         "signature, the host, the time and that the token was never used, "
                         "then switches to monitor mode until not_after.", epilog=EPILOG)
    a.add_argument("token", metavar="TOKEN")
    _socket_args(a)
    a.set_defaults(run=run_apply)

    s = verbs.add_parser("status", help="is break-glass active, and for how long",
                         description="Ask the running agent.", epilog=EPILOG)
    _socket_args(s)
    s.set_defaults(run=run_status)

    for name, helptext in (("end", "end break-glass now (enforcement returns)"),
                           ("revoke", "same as end")):
        e = verbs.add_parser(name, help=helptext,
                             description="End the active break-glass early; the agent "
                             "returns to its policy's mode at once. The token stays spent.",
                             epilog=EPILOG)
        e.add_argument("--reason", metavar="TEXT", help="recorded with the end")
        _socket_args(e)
        e.set_defaults(run=run_end)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """``execguard run``'s break-glass flags."""
    p.add_argument("--breakglass-keys", metavar="DIR",
                   help="public keys that may sign break-glass tokens (*.pub, *.pem; read at "
                   f"each apply); default {DEFAULT_KEYS_DIR}")
    p.add_argument("--breakglass-max-minutes", type=_positive_minutes, metavar="N",
                   help="refuse tokens valid for longer than N minutes (default "
                   f"{DEFAULT_MAX_SECONDS // 60})")


def run_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The RunOptions fields of ``add_run_arguments``."""
    minutes = args.breakglass_max_minutes
    return {"breakglass_keys": args.breakglass_keys,
            "breakglass_max_seconds": None if minutes is None else max(1, round(minutes * 60))}


def _positive_minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 10 ** 7:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of minutes")
    return value


def _finite(text: str) -> float:
    """A number of minutes; NaN and infinity are usage errors, not tracebacks."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > 10 ** 9:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number of minutes")
    return value


def _socket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR",
                   help="the agent's state directory (socket DIR/control.sock); default "
                   "/run/execguard/control.sock")
    p.add_argument("--socket", metavar="PATH", help="control socket path (overrides "
                   "--state-dir)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--json", action="store_true", help="print the agent's answer as JSON")


def _fail(args: argparse.Namespace, action: str, message: str, code: int = EXIT_ERROR,
          extra: Optional[Dict[str, Any]] = None) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": message, **(extra or {})}))
    else:
        print(f"execguard breakglass {action}: {message}", file=sys.stderr)
    return code


def run_host_id(args: argparse.Namespace) -> int:
    try:
        host = local_host_id()
    except ExecguardError as exc:
        return _fail(args, "host-id", str(exc))
    print(json.dumps(dict(host.to_json(), host_id=host.text())) if args.json else host.text())
    return EXIT_OK


def parse_time(text: str) -> int:
    """UNIX seconds, or ISO 8601 (a trailing Z or no zone means UTC)."""
    from datetime import datetime, timezone

    if text.strip().isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ExecguardError(f"--not-before {text!r}: not UNIX seconds or ISO 8601") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return math.ceil(when.timestamp())


def run_issue(args: argparse.Namespace) -> int:
    from agent import signing
    from agent.cli.keys_cmd import _password, _read_key

    seconds = args.seconds if args.seconds is not None else round(args.minutes * 60)
    try:
        host = HostId.parse(args.host)
        keys = [signing.load_private_key(_read_key(path), path, _password)
                for path in args.key]
        not_before = parse_time(args.not_before) if args.not_before else None
        token, env = issue(keys, host, seconds, args.reason, not_before=not_before,
                           max_seconds=round(args.max_minutes * 60), grant=args.grant)
        data = env.to_bytes()
        if args.output:
            signing.write_file(args.output, data, 0o600, force=True)
    except ExecguardError as exc:
        return _fail(args, "issue", str(exc))
    except OSError as exc:
        return _fail(args, "issue", f"{exc.filename or args.output}: {exc.strerror or exc}")
    if args.json:
        print(json.dumps({"token": env.to_json(), "payload": token.to_json(),
                          "output": args.output}))
    elif not args.output:
        sys.stdout.write(data.decode())
    what = ("monitor mode from" if token.grant != GRANT_STOP else
            "grant stop (execguard stop --token FILE), usable from")
    print(f"break-glass token {token.token_id} for {host.text()}: {what} "
          f"{iso(token.not_before)} until {iso(token.not_after)} ({token.duration} s)"
          + (f"; written to {args.output}" if args.output else ""), file=sys.stderr)
    return EXIT_OK


def _read_token(path: str) -> str:
    if path == "-":
        data = sys.stdin.buffer.read(MAX_TOKEN_BYTES + 1)
    else:
        data = read_small_file(path, MAX_TOKEN_BYTES, "a break-glass token")
    if len(data) > MAX_TOKEN_BYTES:
        raise InputError(path, f"larger than {MAX_TOKEN_BYTES} bytes: not a break-glass token")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text: not a break-glass token") from None
    try:  # compact: it must fit one control-socket request (the signature is not over this)
        return json.dumps(json.loads(text), separators=(",", ":"))
    except (ValueError, RecursionError):
        return text  # the agent says what is wrong with it, and records the refusal


def _ask(args: argparse.Namespace, cmd: str, **fields: Any) -> Dict[str, Any]:
    return request(client_socket(args.socket, args.state_dir), cmd, timeout=args.timeout,
                   **fields)


def describe(bg: Dict[str, Any]) -> str:
    if not bg.get("active"):
        return "break-glass: not active"
    return (f"break-glass ACTIVE: monitor mode until {bg.get('not_after')} "
            f"({_left(bg.get('remaining_s'))} left); token {str(bg.get('token'))[:12]}, "
            f"issuer {bg.get('issuer')}, reason: {bg.get('reason')}")


def _left(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


def _answer(args: argparse.Namespace, action: str, reply: Dict[str, Any]) -> int:
    if "error" in reply:
        rejected = "rejected" in reply
        return _fail(args, action, ("rejected: " if rejected else "") + str(reply["error"]),
                     EXIT_REJECTED if rejected else EXIT_ERROR,
                     {"rejected": reply["rejected"]} if rejected else None)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        if reply.get("detail"):
            print(reply["detail"])
        print(describe(reply.get("breakglass", {})))
    return EXIT_OK if reply.get("ok") else EXIT_REJECTED


def run_apply(args: argparse.Namespace) -> int:
    try:
        token = _read_token(args.token)
        reply = _ask(args, "breakglass-apply", token=token)
    except ExecguardError as exc:
        return _fail(args, "apply", str(exc))
    except ControlError as exc:
        return _fail(args, "apply", str(exc), EXIT_NO_AGENT)
    return _answer(args, "apply", reply)


def run_status(args: argparse.Namespace) -> int:
    try:
        reply = _ask(args, "breakglass-status")
    except ControlError as exc:
        return _fail(args, "status", str(exc), EXIT_NO_AGENT)
    if "error" in reply:
        return _fail(args, "status", str(reply["error"]))
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print(describe(reply))
    return EXIT_OK


def run_end(args: argparse.Namespace) -> int:
    fields = {"why": args.reason} if args.reason else {}
    try:
        reply = _ask(args, "breakglass-end", **fields)
    except ControlError as exc:
        return _fail(args, args.breakglass_verb, str(exc), EXIT_NO_AGENT)
    return _answer(args, args.breakglass_verb, reply)

