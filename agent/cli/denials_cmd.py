"""``execguard denials``: review the decision log (filter, summarise, export, follow, explain).

Exit codes: 0 something matched (or the record was found), 1 nothing matched, 2 an error
(unreadable log directory, bad filter, broken installed policy).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
from typing import Any, Callable, List, Optional, TextIO, Tuple

from agent.cli.exits import EXIT_ERROR
from agent.cli.exits import EXIT_NO as EXIT_NONE
from agent.cli.exits import EXIT_OK as EXIT_MATCH
from agent.control import client_socket
from agent.errors import ExecguardError, MalformedInput
from agent.policy import PolicySnapshot, default_policy, load_policy
from agent.record import LoggedDecision
from agent.record.decision_log import log_files
from agent.review import (
    FilterError,
    Follower,
    Query,
    build_query,
    explain_json,
    explain_text,
    find_record,
    load_candidates,
    locate_log_dir,
    reproduce,
)
from agent.review.locate import INSTALLED_POLICY, agent_policy_path, ask_agent
from agent.review.log_problems import LogProblems
from agent.review.output import (
    CsvWriter,
    format_summary,
    format_table,
    json_line,
    summarize,
    table_header_stream,
    table_line_stream,
    table_row,
)
from agent.review.sources import STDIN, Progress, log_paths, read_records

POLL_S = 0.25


def _common(p: argparse.ArgumentParser, sub: bool) -> None:
    # on the explain sub-parser, SUPPRESS keeps a value given before "explain"
    d: Any = argparse.SUPPRESS if sub else None
    p.add_argument("--log-dir", metavar="PATH", action="append", default=d,
                   help="where to read (repeatable): a log directory, read recursively, so a "
                   "collector's tree of many hosts' logs is one --log-dir; a log file, plain "
                   "or .gz; - for standard input. Default: the configured agent's directory")
    p.add_argument("--state-dir", metavar="DIR", default=d,
                   help="the agent's state directory, to ask it for its log directory")
    p.add_argument("--socket", metavar="PATH", default=d,
                   help="the agent's control socket (overrides --state-dir)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if sub else False,
                   help="JSON: one record per line (explain: one object)")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "denials", help="review denied (and optionally allowed) execs from the decision log",
        description="List decisions from the decision log, oldest first. Default: denials "
        "only (enforced 'deny' and monitor/audit-only 'would-deny'). Times are UTC. "
        "Exit 0 matches, 1 no matches, 2 error. See docs/review.md.")
    _common(p, False)
    p.add_argument("--since", metavar="TIME",
                   help="ISO 8601 (2026-11-26T15:00Z; no offset means UTC) or ago (30m, 2d)")
    p.add_argument("--until", metavar="TIME", help="same forms as --since")
    p.add_argument("--reason", action="append", default=[], metavar="CODE",
                   help="reason code (no-signature, bad-signature, ...); repeatable")
    p.add_argument("--path", action="append", default=[], metavar="GLOB",
                   help="path glob as in policy scopes (* ? [..] **; a directory matches "
                   "everything below it); repeatable")
    p.add_argument("--uid", action="append", default=[], metavar="UID",
                   help="uid or user name; repeatable")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="records written by this host: its hostname or machine-id "
                   "(repeatable; records from before hosts were recorded match none)")
    p.add_argument("--module", action="append", default=[], metavar="GLOB",
                   help="Go main module glob (example.com/acme/*); repeatable")
    p.add_argument("--all", action="store_true", help="include allowed execs")
    p.add_argument("--csv", action="store_true", help="CSV with a header row")
    p.add_argument("--summary", action="store_true",
                   help="counts by decision, reason, signer and binary")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep reading new records (across rotation) until interrupted")
    p.set_defaults(run=run, action=None)
    verbs = p.add_subparsers(dest="action", metavar="[explain ID]")
    e = verbs.add_parser("explain", help="show one record in full and how to re-check it",
                         description="Show every field of record ID (or a unique prefix of "
                         "8+ characters), the execguard verify command that reproduces it "
                         "and the ausearch command that finds its audit record.")
    e.add_argument("id", metavar="ID")
    _common(e, True)
    e.add_argument("--policy", metavar="FILE",
                   help="the policy that decided (found by digest otherwise)")


def _err(message: str, as_json: bool = False) -> int:
    """An error: the line on stderr, and with --json one object on stdout, like every verb."""
    print(f"execguard denials: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message}))
    return EXIT_ERROR


def _locate(args: argparse.Namespace, asked: bool = False,
            reply: Optional[Any] = None) -> Tuple[str, List[str]]:
    """The place to read (for messages and --follow) and the files, in reading order."""
    given: List[str] = args.log_dir or []
    if len(given) > 1 or given[:1] == [STDIN]:
        print(f"execguard denials: reading {', '.join(given)} (from --log-dir)",
              file=sys.stderr)
        return given[0], log_paths(given)
    socket = client_socket(args.socket, args.state_dir)
    where = locate_log_dir(given[0] if given else None, socket, INSTALLED_POLICY, asked, reply)
    log_dir = where.log_dir
    print(f"execguard denials: reading {log_dir} ({where.how})", file=sys.stderr)
    if not (os.path.isdir(log_dir) or (given and os.path.isfile(log_dir))):
        raise ExecguardError(f"{log_dir}: no such log directory")
    try:  # a --log-dir may be a tree or one file; the configured agent's is its directory
        paths = log_paths(given) if given else log_files(log_dir)
    except MalformedInput:  # a directory with no log in it or below it
        paths = []
    if not paths:
        print(f"execguard denials: {log_dir} holds no decision log yet", file=sys.stderr)
    return log_dir, paths


def _escape_undecodable() -> None:
    """A path that is not UTF-8 is read back with lone surrogates; write them as \\udcXX
    (in JSON, the very escape the log holds) instead of failing on them."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def run(args: argparse.Namespace) -> int:
    _escape_undecodable()
    try:
        if args.action == "explain":
            return _explain(args)
        if args.json and args.csv:
            raise FilterError("--json and --csv exclude each other")
        if args.follow and args.summary:
            raise FilterError("--summary counts a finished log; it cannot --follow")
        query = build_query(args.since, args.until, args.reason, args.path, args.uid,
                            args.module, args.all, hosts=args.host)
        log_dir, paths = _locate(args)
        if args.follow:
            if len(args.log_dir or []) > 1 or not os.path.isdir(log_dir):
                raise FilterError("--follow follows one log directory")
            return _follow(args, log_dir, query)
        return _list(args, paths, query)
    except (FilterError, ExecguardError) as exc:
        return _err(str(exc), bool(getattr(args, "json", False)))


def _list(args: argparse.Namespace, paths: List[str], query: Query) -> int:
    """Streams in log order (the order the agent decided, oldest first, file after file): a
    log of millions of records is never held as objects, only the table's text rows."""
    problems = LogProblems("execguard denials")
    progress = Progress("execguard denials")
    matches = (r for r in read_records(paths, problems, progress, query.needles())
               if query.matches(r))
    out = sys.stdout
    count = 0
    if args.summary:
        summary = summarize(matches)
        count = summary["total"]
        if args.json:
            out.write(json.dumps(summary, ensure_ascii=False) + "\n")
        elif args.csv:
            _summary_csv(summary, out)
        else:
            out.write(format_summary(summary) + "\n")
    elif args.json:
        for rec in matches:
            out.write(json_line(rec) + "\n")
            count += 1
    elif args.csv:
        writer = CsvWriter(out)
        for rec in matches:
            writer.write(rec)
            count += 1
    else:
        rows = [table_row(rec) for rec in matches]
        count = len(rows)
        if rows:
            out.write(format_table(rows) + "\n")
    out.flush()
    problems.finish()
    if problems.unreadable:
        return EXIT_ERROR
    return EXIT_MATCH if count else EXIT_NONE


def _summary_csv(summary: Any, out: TextIO) -> None:
    import csv

    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(["dimension", "value", "count"])
    w.writerow(["total", "", summary["total"]])
    for dim in ("decision", "reason", "signer", "binary"):
        for name, n in summary[dim].items():
            w.writerow([dim, ("'" + name) if name[:1] in "=+-@" else name, n])


def _follow(args: argparse.Namespace, log_dir: str, query: Query) -> int:
    stop = threading.Event()
    old = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    problems = LogProblems("execguard denials")
    out = sys.stdout
    emit: Callable[[LoggedDecision], None]
    if args.json:
        def emit(rec: LoggedDecision) -> None:
            out.write(json_line(rec) + "\n")
    elif args.csv:
        emit = CsvWriter(out).write
    else:
        out.write(table_header_stream() + "\n")

        def emit(rec: LoggedDecision) -> None:
            out.write(table_line_stream(rec) + "\n")
    out.flush()
    matched = 0
    follower = Follower(log_dir, problems, from_start=args.since is not None)
    try:  # announce inside the try: an interrupt right after the announcement is a stop
        print(f"execguard denials: following {log_dir} (interrupt to stop)", file=sys.stderr,
              flush=True)
        while not stop.is_set():
            for rec in follower.poll():
                if query.matches(rec):
                    matched += 1  # before emit: an interrupt right after a printed row
                    emit(rec)
            out.flush()
            stop.wait(POLL_S)
    except KeyboardInterrupt:
        pass
    finally:
        follower.close()
        signal.signal(signal.SIGTERM, old)
        problems.finish()
    return EXIT_MATCH if matched else EXIT_NONE


def _explain(args: argparse.Namespace) -> int:
    socket = client_socket(args.socket, args.state_dir)
    # the agent knows its log directory and its policy file; ask only if one is missing
    reply = ask_agent(socket) if not (args.log_dir and args.policy) else None
    log_dir, paths = _locate(args, asked=True, reply=reply)
    problems = LogProblems("execguard denials")
    rec = find_record(read_records(paths, problems, Progress("execguard denials")), args.id)
    problems.finish()
    if rec is None:
        missing = (f"no record {args.id!r} (an id or a unique prefix of 8+ characters) in "
                   f"{log_dir}")
        print(f"execguard denials: {missing}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": missing}))
        return EXIT_ERROR if problems.unreadable else EXIT_NONE
    loaders: List[Any] = []
    if args.policy:
        loaders.append((args.policy, lambda: load_policy(args.policy)))
    agent_policy = agent_policy_path(reply)
    if agent_policy:
        loaders.append((agent_policy, lambda: load_policy(agent_policy)))

    def installed() -> Optional[PolicySnapshot]:
        return load_policy(INSTALLED_POLICY) if os.path.exists(INSTALLED_POLICY) else None

    loaders += [(INSTALLED_POLICY, installed), ("the embedded default policy", default_policy)]
    repro = reproduce(rec.decision, load_candidates(loaders))
    if args.json:
        print(json.dumps(explain_json(rec, repro), ensure_ascii=False, indent=2))
    else:
        print(explain_text(rec, repro))
    return EXIT_MATCH
