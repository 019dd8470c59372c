"""Measure what every way does against real agents, and print it with what the agent
logged: the evidence behind ``ways.EXPECTED``. Root only; mounts only below its own
directories.

    python -m tests.attacks.measure [--backend fanotify-exec] [--way NAME]... [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from tests.attacks.arena import Arena, arena
from tests.attacks.harness import Outcome, build_all
from tests.attacks.ways import BY_NAME, HOST_BACKENDS, WAYS, Way


def keypair(base: Path) -> Tuple[Path, Path]:
    priv, pub = base / "attack.pem", base / "attack.pub"
    for argv in (["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                  "ec_paramgen_curve:P-256", "-out", str(priv)],
                 ["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)]):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return priv, pub


def evidence(decisions: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per decision the agent logged: path, verdict, reason, enforcement."""
    return [f"{d['event']['path']} uid={d['event'].get('uid')} {d['decision']} {d['reason']} "
            f"{d['enforcement']} rule={d.get('rule_id')}"
            + (f" ({d['extra']})" if d.get("extra") else "") for d in decisions]


def measure(place: Arena, way: Way) -> List[Dict[str, Any]]:
    rows = []
    place.use_policy(way.policy)
    for user in way.users:
        before = place.decision_count()
        outcome: Outcome = way.attempt(place.stage, user)
        place.settle()
        rows.append({"backend": place.backend, "way": way.name, "user": user.value,
                     "result": outcome.result.value,
                     "killed_after_marker": outcome.killed_after_marker,
                     "detail": outcome.detail, "logged": evidence(
                         place.decisions_since(before)),
                     "outcome": str(outcome)})
    return rows


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", action="append", choices=HOST_BACKENDS)
    ap.add_argument("--way", action="append", choices=sorted(BY_NAME))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    ways = [BY_NAME[n] for n in args.way] if args.way else list(WAYS)
    tools = build_all()
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="eg-attack-measure-") as tmp:
        priv, pub = keypair(Path(tmp))
        for backend in args.backend or HOST_BACKENDS:
            home = Path(tmp) / backend
            home.mkdir()
            with arena(backend, home, tools, priv, pub, ways) as place:
                for way in ways:
                    rows.extend(measure(place, way))
                    if not args.json:
                        for row in rows[-len(way.users):]:
                            late = " +late-kill" if row["killed_after_marker"] else ""
                            print(f"{backend:14} {row['way']:30} {row['user']:7} "
                                  f"{row['result']}{late}: {row['detail'][:90]}")
                            for line in row["logged"]:
                                print(f"{'':24}logged: {line}")
                        sys.stdout.flush()
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
