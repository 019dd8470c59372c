"""``execguard doctor``: what this kernel allows, and the enforcement backend that follows.

Exit status: 0 when an enforcing backend is available, 1 when only audit-only is possible
(or a requested backend is not), 2 on an internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from typing import Any, Dict, List, Mapping, Optional

from agent import hardening
from agent.cli.exits import EXIT_ERROR, EXIT_OK
from agent.cli.exits import EXIT_NO as EXIT_UNTRUSTED
from agent.sensors import bcc_probe, probe
from agent.sensors.probe import Choice, ProbeResult

WIDTH = 100
NAME_W = 16


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="probe kernel features and show which enforcement backend applies",
        description="Probe what this kernel allows (by trying it: load the BPF programs, add a "
        "fanotify mark on a private file) and show which enforcement backend execguard "
        "would use, and why the others were skipped. Exit 0 when a backend that blocks is "
        "available, 1 when only audit-only is possible, 2 on an internal error.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the BCC compile and load probes (the slow part); "
        "bpf-lsm, fmod-ret and kill are then not evaluated",
    )
    p.add_argument(
        "--probe-timeout",
        type=probe_seconds,
        default=None,
        metavar="S",
        help=f"seconds for all BCC probes together (default: ${bcc_probe.TIMEOUT_ENV}, "
        f"else {bcc_probe.CHILD_TIMEOUT:.0f}); raise it on slow or emulated machines, where "
        "one BCC compile can take 30 s",
    )
    p.add_argument(
        "--backend",
        choices=("auto", *probe.BACKEND_NAMES),
        default="auto",
        help="check that this backend is usable instead of picking the best (default: auto)",
    )
    p.set_defaults(run=run)


def probe_seconds(text: str) -> float:
    """argparse type for --probe-timeout (shared with ``execguard run``)."""
    try:
        return bcc_probe.parse_timeout(text, "--probe-timeout")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def report(
    probes: Mapping[str, ProbeResult],
    choice: Choice,
    *,
    compiled: bool,
    elapsed: float,
    probe_timeout: float | None = None,
) -> Dict[str, Any]:
    lsms = probe.active_lsms()
    return {
        "kernel": os.uname().release,
        "lockdown": probe.lockdown_mode(),
        "lsm": None if lsms is None else list(lsms),
        "root": probe.is_root(),
        "compile_probes": compiled,
        "probes": {n: {"ok": r.ok, "detail": r.detail, "hint": r.hint} for n, r in probes.items()},
        "backend": {
            "chosen": choice.backend,
            "requested": choice.requested,
            "enforcing": choice.enforcing,
            "reasons": [r._asdict() for r in choice.reasons],
        },
        "probe_timeout_s": probe_timeout,
        "host_settings": [h.to_json() for h in hardening.read_settings()],
        "tamper": tamper_resistance(choice.backend),
        "elapsed_s": round(elapsed, 3),
    }


def tamper_resistance(backend: Optional[str]) -> Dict[str, Any]:
    """What the chosen backend can do when root tries to switch it off (issue 10)."""
    from agent.sensors.bpf.pins import orphans
    from agent.sensors.bpf.sensor import VERDICT_STAT_NAMES

    able = backend == "bpf-lsm"
    if able:
        detail = ("policy on_agent_exit = \"keep-enforcing\" pins the programs (enforcement "
                  "outlives the agent) and the LSM refuses signals, ptrace, bpf() and file "
                  "changes aimed at the agent to everyone else; execguard stop --token ends it")
    elif backend == "fmod-ret":
        detail = ("keep-enforcing pins the programs (enforcement outlives a crash), but its "
                  "tracing programs cannot refuse root's kill or rm of the pins, which end "
                  "it; execguard stop --token is the authenticated way")
    else:
        detail = (f"{backend or 'no backend'} cannot protect the agent: SIGTERM or SIGKILL "
                  "stops it and enforcement ends with it (fail-open); execguard stop --token "
                  "is the authenticated way, a signal the unauthenticated one")
    return {"self_protection": able, "detail": detail,
            "orphans": [o.__dict__ for o in orphans(VERDICT_STAT_NAMES)]}


def _wrap(text: str, indent: int) -> List[str]:
    return textwrap.wrap(text, WIDTH - indent, break_on_hyphens=False) or [""]


def render(rep: Dict[str, Any], choice: Choice) -> str:
    lsm = ",".join(rep["lsm"]) if rep["lsm"] is not None else "unknown"
    lines = [
        f"execguard doctor: kernel {rep['kernel']}, lockdown {rep['lockdown'] or 'unknown'}, "
        f"lsm {lsm}",
        "",
        f"{'CAPABILITY':<{NAME_W}} OK  DETAIL",
    ]
    pad = " " * (NAME_W + 5)
    for name, r in rep["probes"].items():
        detail = _wrap(r["detail"], len(pad))
        lines.append(f"{name:<{NAME_W}} {'OK' if r['ok'] else 'NO':<3} {detail[0]}")
        lines.extend(pad + d for d in detail[1:])
        if r["hint"] and not r["ok"]:
            lines.extend(pad + h for h in _wrap("hint: " + r["hint"], len(pad)))
    lines.append("")
    for reason in choice.reasons:
        if reason.status == "chosen":
            lines.append(f"backend: {reason.backend} ({reason.why})")
    if choice.backend is None:
        lines.append(f"backend: none: the requested backend {choice.requested} is unavailable")
    for reason in choice.reasons:
        if reason.status != "chosen":
            wrapped = _wrap(f"  skipped {reason.backend}: {reason.why}", 4)
            lines.append(wrapped[0])
            lines.extend("    " + t for t in wrapped[1:])
    if not rep["compile_probes"]:
        lines.append(
            "note: --no-compile skipped the BCC probes: bpf-lsm, fmod-ret and kill not evaluated"
        )
    if not rep["root"]:
        lines.append("note: not root: privileged probes report 'needs root'")
    if choice.backend == probe.AUDIT_ONLY:
        lines.append("only audit-only is possible: execguard would record, never block")
    lines += ["", "HOST SETTING (what the backends cannot see themselves; docs/threat-model.md)"]
    for h in rep["host_settings"]:
        text = _wrap(f"{h['name']}: {'ok' if h['ok'] else 'OPEN'} ({h['matters_for']}): "
                     f"{h['detail']}", 2)
        lines.append(text[0])
        lines.extend("  " + t for t in text[1:])
    t = rep["tamper"]
    lines += ["", "TAMPER RESISTANCE (docs/threat-model.md, \"Tamper resistance\")"]
    lines += ["  " + x for x in _wrap(f"self-protection: {'yes' if t['self_protection'] else 'no'}"
                                      f": {t['detail']}", 2)]
    for o in t["orphans"]:
        lines.append(f"  ORPHAN: {o['directory']}: pinned programs of a dead agent (pid "
                     f"{o['pid']}) still enforce; they go at reboot")
    lines.append(f"({rep['elapsed_s']:.1f} s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        timeout = bcc_probe.resolve_timeout(getattr(args, "probe_timeout", None))
    except ValueError as exc:  # a malformed $EXECGUARD_PROBE_TIMEOUT
        print(f"execguard doctor: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        compiled = not args.no_compile
        probes = probe.run_probes(compile=compiled, timeout=timeout)
        choice = probe.choose_backend(probes, args.backend)
        rep = report(probes, choice, compiled=compiled, elapsed=time.monotonic() - started,
                     probe_timeout=timeout)
    except Exception as exc:  # doctor reports its own failure rather than a traceback
        print(f"execguard doctor: internal error: {exc!r}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(render(rep, choice))
    return EXIT_OK if choice.enforcing else EXIT_UNTRUSTED
