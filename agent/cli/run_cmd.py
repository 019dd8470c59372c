"""``execguard run``: the agent, in the foreground."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from agent.backends import PREFERENCE
from agent.cli import breakglass_cmd, policy_cmd
from agent.cli.doctor_cmd import probe_seconds
from agent.cli.exits import EXIT_ERROR
from agent.control import DEFAULT_SOCKET
from agent.errors import ExecguardError
from agent.metrics import config as metrics_config


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run the agent in the foreground",
        description="Watch every exec, decide, enforce and record. Without --policy the "
        "embedded default policy applies: monitor mode, Go binaries need a signature by a key "
        "in /etc/execguard/keys/, nothing is ever blocked. The flags override the policy's "
        "fields, so enforcement can be tried on one directory with the shipped template, in "
        "which every executable in scope needs a signature: execguard run --policy "
        "packaging/policy-enforce.toml --scope /opt/app --key release.pub ('--mode enforce' "
        "on the default policy blocks unsigned Go binaries only, and warns at start).",
        epilog="SIGHUP reloads the policy (a bad one is refused and the current one stays; "
        "it first applies the newest valid signed bundle in --policy-drop-dir, and while a "
        "bundle is in force only bundles replace it); "
        "SIGTERM/SIGINT stop the agent. When the agent exits, the kernel allows every exec "
        "again (fail-open). 'execguard status' asks a running agent.")
    p.add_argument("--policy", metavar="FILE",
                   help="policy file (TOML or JSON), or a signed policy bundle (verified "
                   "with --policy-keys like any bundle; docs/bundles.md)")
    p.add_argument("--mode", choices=("monitor", "enforce"))
    p.add_argument("--on-agent-exit", choices=("fail-open", "keep-enforcing"),
                   help="the policy's on_agent_exit: keep-enforcing pins the BPF programs so "
                   "enforcement outlives the agent, and on bpf-lsm the kernel refuses "
                   "signals, ptrace and bpf() aimed at it; only 'execguard stop --token' or a "
                   "reboot ends it (docs/threat-model.md, \"Tamper resistance\")")
    p.add_argument("--scope", action="append", default=[], metavar="DIR",
                   help="watch/enforce only under DIR (repeatable; replaces the policy's scopes)")
    p.add_argument("--key", action="append", default=[], metavar="PEM",
                   help="trusted public key (repeatable; replaces the policy's keys)")
    p.add_argument("--backend", choices=("auto", *PREFERENCE), default="auto",
                   help="run this backend or none: when it cannot start (probe, self-test) "
                   "the agent exits 2 with the reason, it never downgrades; default auto: the "
                   "best this host passes, walking down the order when a self-test fails")
    p.add_argument("--state-dir", metavar="DIR",
                   help="cache and state directory (default: the policy's state_dir, "
                   "/var/lib/execguard); the control socket goes in it as DIR/control.sock")
    p.add_argument("--socket", metavar="PATH",
                   help="the control socket (default: DIR/control.sock with --state-dir DIR, "
                   f"else {DEFAULT_SOCKET}); every other verb takes the same --state-dir and "
                   "--socket to find this agent")
    p.add_argument("--log-dir", metavar="DIR", help="decision log directory")
    p.add_argument("--log-max-size", type=size_bytes, default=16 << 20, metavar="SIZE",
                   help="rotate the decision log when it would pass SIZE (bytes, or with K, "
                   "M, G: powers of 1024; default 16M)")
    p.add_argument("--log-keep", type=keep_count, default=5, metavar="N",
                   help="rotated decision-log files kept, oldest deleted (0..1000, default 5; "
                   "0 keeps only the current file)")
    p.add_argument("--status-interval", type=float, default=5.0, metavar="S",
                   help="print a status line every S seconds (0: never)")
    p.add_argument("--quiet", action="store_true", help="do not print each decision")
    p.add_argument("--no-prewarm", action="store_true",
                   help="do not verify the scopes' binaries ahead of their first exec")
    p.add_argument("--audit", choices=("auto", "libaudit", "netlink", "off"), default="auto",
                   help="how denials reach auditd")
    p.add_argument("--probe-timeout", type=probe_seconds, default=None, metavar="S",
                   help="seconds for the BCC probes that pick the backend with --backend auto "
                   "(default: $EXECGUARD_PROBE_TIMEOUT, else 30); raise it on slow machines")
    metrics_config.add_arguments(p)
    policy_cmd.add_run_arguments(p)
    breakglass_cmd.add_run_arguments(p)
    p.set_defaults(run=run)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size_bytes(text: str) -> int:
    """argparse type for --log-max-size: ``65536``, ``512K``, ``16M``, ``1G``."""
    number, unit = text.strip(), ""
    if number[-1:].upper() in ("K", "M", "G"):
        number, unit = number[:-1], number[-1].upper()
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a size in bytes, or with K, M or G")
    value = int(number) * _UNITS[unit]
    if not 4096 <= value <= 1 << 40:
        raise argparse.ArgumentTypeError(f"{text!r}: between 4K and 1024G")
    return value


def keep_count(text: str) -> int:
    """argparse type for --log-keep."""
    if not text.strip().isdigit() or int(text) > 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number from 0 to 1000")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from agent.daemon import Agent, RunOptions

    if os.geteuid() != 0:
        print("execguard run: needs root (BPF, fanotify and auditd); prefix it with sudo",
              file=sys.stderr)
        return EXIT_ERROR
    opts = RunOptions(policy=args.policy, mode=args.mode, on_agent_exit=args.on_agent_exit,
                      scopes=tuple(args.scope), keys=tuple(args.key), backend=args.backend,
                      state_dir=args.state_dir, socket=args.socket, log_dir=args.log_dir,
                      log_max_bytes=args.log_max_size, log_keep=args.log_keep,
                      status_interval=args.status_interval, quiet=args.quiet,
                      prewarm=not args.no_prewarm, audit=args.audit,
                      probe_timeout=args.probe_timeout,
                      metrics=metrics_config.from_arguments(args),
                      **policy_cmd.run_options(args),
                      **breakglass_cmd.run_options(args))
    try:
        agent = Agent(opts)
    except ExecguardError as exc:
        print(f"execguard run: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return agent.run()
