"""``execguard policy whatif CANDIDATE``: which past execs a candidate policy would decide
differently, before anyone switches a fleet to it (docs/review.md, "What-if").

Exit codes: 0 nothing would newly be denied, 1 some exec would newly be denied (or, with
``--fail-on-unknown``, some verdict is unknown), 2 an error (candidate, log, or with
``--strict`` a bad log line).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from agent.cli.exits import EXIT_ERROR, EXIT_OK
from agent.cli.exits import EXIT_NO as EXIT_NEWLY_DENIED
from agent.control import client_socket
from agent.envelope import check_signatures
from agent.errors import ExecguardError
from agent.policy import PolicySnapshot, default_policy, load_policy
from agent.record import LoggedDecision
from agent.review.locate import INSTALLED_POLICY, locate_log_dir
from agent.review.log_problems import LogProblems
from agent.review.output import iso_time, printable
from agent.review.query import FilterError, parse_time
from agent.review.sources import log_paths, read_records
from agent.review.whatif import Gap, Replayer, recorded_policies
from agent.review.whatif_report import Report, format_groups, replay_all

PROG = "execguard policy whatif"
DEFAULT_POLICY_KEYS = "/etc/execguard/keys/policy"


class WhatifError(ExecguardError):
    """A user error: printed as one line (or {"error": ...}), exit 2."""


@dataclass(frozen=True)
class LoadedCandidate:
    snapshot: PolicySnapshot
    kind: str  # "policy" | "bundle"
    signature_checked: Optional[bool]  # None: a policy file has no signature
    signature: str  # for people
    signatures: Optional[Dict[str, int]] = None  # valid / invalid / unknown, when checked


def add_subparser(policy_subparsers: Any) -> None:
    """Register ``whatif`` under ``execguard policy``."""
    p = policy_subparsers.add_parser(
        "whatif", help="replay recorded decisions against a candidate policy",
        description="Replay the decision log against CANDIDATE (a policy file or a signed "
        "policy bundle) and report which past execs would now be denied or allowed, grouped "
        "by binary and reason. Verdicts come from the evidence the log recorded (signer, "
        "sha256, Go build summary); what the log cannot support is 'unknown', never "
        "'allow'. Exit 0 nothing newly denied, 1 some exec newly denied, 2 error. "
        "See docs/review.md.")
    configure(p)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("candidate", metavar="CANDIDATE",
                   help="policy file (TOML/JSON) or signed policy bundle to try")
    p.add_argument("--log", action="append", default=[], metavar="PATH",
                   help="decision log: a directory (its decisions.jsonl and rotated copies) "
                   "or one file; repeatable (default: the configured agent's log directory, "
                   "/var/log/execguard)")
    p.add_argument("--recorded-policy", action="append", default=[], metavar="FILE",
                   help="a policy that made some of the records (matched by digest); also "
                   "tried: /etc/execguard/policy.toml and the embedded default")
    p.add_argument("--policy-keys", default=DEFAULT_POLICY_KEYS, metavar="DIR",
                   help="pinned policy keys to check a bundle's signatures against (reported, "
                   f"not required; default {DEFAULT_POLICY_KEYS})")
    p.add_argument("--reverify", action="store_true",
                   help="re-verify files still on disk with the recorded bytes for real, "
                   "where the log alone does not decide")
    p.add_argument("--since", metavar="TIME", help="only execs at or after TIME "
                   "(ISO 8601, UTC without an offset, or ago: 30m, 2d)")
    p.add_argument("--until", metavar="TIME", help="only execs at or before TIME")
    p.add_argument("--group-by", choices=("path", "sha256"), default="path",
                   help="a binary is its path (default) or its sha256")
    p.add_argument("--all", action="store_true",
                   help="also list the groups whose verdict does not change")
    p.add_argument("--strict", action="store_true",
                   help="a bad log line is an error (exit 2) instead of skipped and counted")
    p.add_argument("--fail-on-unknown", action="store_true",
                   help="exit 1 also when some verdict is unknown")
    p.add_argument("--state-dir", metavar="DIR",
                   help="the agent's state directory, to ask it for its log directory")
    p.add_argument("--socket", metavar="PATH", help="the agent's control socket")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    """A parser for this command alone (tests, and before ``execguard policy`` exists)."""
    p = argparse.ArgumentParser(prog=PROG, description="Replay recorded decisions against a "
                                "candidate policy (docs/review.md).")
    configure(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BrokenPipeError:
        return EXIT_OK


# --- the candidate ---------------------------------------------------------------------------

def load_candidate(path: str, policy_keys: str) -> LoadedCandidate:
    """A policy file, or a signed policy bundle whose signatures are checked against the
    pinned policy keys when there are any, but never required: a what-if changes nothing,
    and a bundle is often tried before anyone signs it."""
    from agent.policy import bundle as pb  # only a bundle needs it

    data = pb.read_bundle_file(path)
    if not pb.looks_like_bundle(data):
        return LoadedCandidate(load_policy(path), "policy", None,
                               "not applicable: a policy file, not a signed bundle")
    env = pb.parse_envelope_bytes(data, path)
    snapshot = pb.bundle_snapshot(pb.parse_payload(env.payload, path), path)
    if not os.path.isdir(policy_keys):
        return LoadedCandidate(snapshot, "bundle", False,
                               f"NOT checked: no pinned policy keys in {policy_keys} (what-if "
                               f"does not need them; 'execguard policy verify' checks them)")
    from agent.policy.bundle_verify import load_pinned

    pinned = load_pinned(policy_keys)
    report = check_signatures(env, pinned)
    return LoadedCandidate(snapshot, "bundle", True,
                           f"checked against {len(pinned)} pinned key(s) in {policy_keys}: "
                           f"{len(report.valid)} valid, {len(report.invalid)} invalid, "
                           f"{len(report.unknown)} by keys not pinned (not required for a "
                           f"what-if; 'execguard policy verify' applies the threshold)",
                           {"valid": len(report.valid), "invalid": len(report.invalid),
                            "unknown": len(report.unknown)})


def _recorded(args: argparse.Namespace, candidate: PolicySnapshot,
              notes: List[str]) -> Dict[str, PolicySnapshot]:
    snaps = [load_policy(f) for f in args.recorded_policy]  # named by the user: must load
    if os.path.exists(INSTALLED_POLICY):
        try:
            snaps.append(load_policy(INSTALLED_POLICY))
        except ExecguardError as exc:
            notes.append(f"the installed policy does not load, not used: {exc}")
    snaps += [default_policy(), candidate]
    return recorded_policies(snaps)


# --- run -------------------------------------------------------------------------------------

def _logs(args: argparse.Namespace) -> List[str]:
    if args.log:
        return log_paths(args.log)
    socket = client_socket(args.socket, args.state_dir)
    where = locate_log_dir(None, socket, INSTALLED_POLICY)
    print(f"{PROG}: reading {where.log_dir} ({where.how})", file=sys.stderr)
    return log_paths([where.log_dir])


def _escape_undecodable() -> None:
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def run(args: argparse.Namespace) -> int:
    _escape_undecodable()
    try:
        return _run(args)
    except (ExecguardError, FilterError) as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc)}, ensure_ascii=False))
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    since = parse_time("--since", args.since) if args.since else None
    until = parse_time("--until", args.until) if args.until else None
    if since is not None and until is not None and since > until:
        raise FilterError("--since is after --until")
    cand = load_candidate(args.candidate, args.policy_keys)
    notes: List[str] = []
    recorded = _recorded(args, cand.snapshot, notes)
    paths = _logs(args)
    problems = LogProblems(PROG, WhatifError if args.strict else None)
    replayer = Replayer(cand.snapshot, recorded, reverify=args.reverify)
    report = Report(by_sha256=args.group_by == "sha256")
    digests: Counter = Counter()  # type: ignore[type-arg]

    def keep(rec: LoggedDecision) -> bool:
        ts = rec.decision.event.timestamp_ns
        if (since is not None and ts < since) or (until is not None and ts > until):
            return False
        digests[rec.decision.policy_digest or "(not recorded)"] += 1
        return True

    replay_all(read_records(paths, problems), replayer, report, keep)
    if problems.unreadable:
        raise WhatifError("; ".join(problems.unreadable))
    problems.finish()
    failing = report.newly_denied or (args.fail_on_unknown and report.unknown)
    code = EXIT_NEWLY_DENIED if failing else EXIT_OK
    known = {d: recorded[d].source for d in digests if d in recorded}
    needs_old = {Gap.NEW_SIGNERS.value, Gap.NEW_STORES.value, Gap.TRUSTED_ROOT.value}
    if len(known) < len(digests) and any(g.reason in needs_old for g in report.groups.values()):
        notes.append("some unknowns need the policy that made the records: give it with "
                     "--recorded-policy FILE (matched by digest), or use --reverify")
    if cand.snapshot.mode.value == "monitor":
        notes.append("the candidate is in monitor mode: it would block nothing; 'denied' is "
                     "what it would record as would-deny")
    if args.json:
        print(json.dumps(_json(args, cand, paths, report, problems, digests, known, notes,
                               code), ensure_ascii=False, indent=2))
    else:
        print(_text(args, cand, paths, report, problems, digests, known, notes, code))
    return code


def _json(args: argparse.Namespace, cand: LoadedCandidate, paths: List[str], report: Report,
          problems: LogProblems, digests: Counter, known: Dict[str, str],  # type: ignore[type-arg]
          notes: List[str], code: int) -> Dict[str, Any]:
    snap = cand.snapshot
    return {
        "candidate": {"file": args.candidate, "kind": cand.kind, "version": snap.version,
                      "digest": snap.digest, "mode": snap.mode.value,
                      "signature_checked": cand.signature_checked,
                      "signature": cand.signature, "signatures": cand.signatures},
        "logs": paths,
        "records": report.records,
        "bad_lines": problems.bad_lines,
        "first_seen": iso_time(report.first_ns) if report.first_ns is not None else None,
        "last_seen": iso_time(report.last_ns) if report.last_ns is not None else None,
        "recorded_policies": [{"digest": d, "records": n, "known_as": known.get(d)}
                              for d, n in digests.most_common()],
        "summary": report.summary(),
        "methods": dict(report.methods.most_common()),
        "groups": [g.to_json() for g in report.sorted_groups(args.all)],
        "notes": notes,
        "reverify": bool(args.reverify),
        "exit": code,
    }


def _text(args: argparse.Namespace, cand: LoadedCandidate, paths: List[str], report: Report,
          problems: LogProblems, digests: Counter, known: Dict[str, str],  # type: ignore[type-arg]
          notes: List[str], code: int) -> str:
    snap = cand.snapshot
    kind = "policy file" if cand.kind == "policy" else "signed policy bundle"
    window = (f", {iso_time(report.first_ns)} .. {iso_time(report.last_ns)}"
              if report.first_ns is not None and report.last_ns is not None else "")
    recognised = sum(n for d, n in digests.items() if d in known)
    lines = [
        f"candidate: {printable(args.candidate)} ({kind}; version {snap.version}; mode "
        f"{snap.mode.value}; digest {snap.digest})",
        f"signature: {printable(cand.signature)}",
        f"logs: {', '.join(printable(p) for p in paths)} ({report.records} records{window})",
        f"recorded policy known for {recognised} of {report.records} records"
        + "".join(f"; {d[:19]}… is {printable(src)}" for d, src in sorted(known.items())),
    ]
    if problems.bad_lines:
        lines.append(f"skipped {problems.bad_lines} bad log lines (listed on stderr; "
                     f"--strict makes them an error)")
    for note in notes:
        lines.append(f"note: {printable(note)}")
    s = report.summary()
    lines += ["", f"summary: {s['same']} same, {s['newly-denied']} newly denied, "
              f"{s['newly-allowed']} newly allowed, {s['unknown']} unknown",
              "methods: " + ", ".join(f"{m} {n}" for m, n in report.methods.most_common())]
    lines += format_groups(report.sorted_groups(args.all))
    lines.append("")
    if report.newly_denied:
        lines.append(f"result: {report.newly_denied} exec(s) would newly be denied (exit 1)")
    elif code == EXIT_NEWLY_DENIED:
        lines.append(f"result: nothing newly denied, but {report.unknown} verdict(s) unknown "
                     f"and --fail-on-unknown (exit 1)")
    else:
        extra = (f"; {report.unknown} unknown (see above; --reverify may settle them)"
                 if report.unknown else "")
        lines.append(f"result: nothing would newly be denied{extra} (exit 0)")
    return "\n".join(lines)
