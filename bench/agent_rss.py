"""Resident memory of a started agent per backend (issue 10, point 4: under 80 MB).

    .venv/bin/python bench/agent_rss.py [--backends fanotify-exec,kill,audit-only]
        [--settle 5] [--baseline-tree DIR]

Each backend's agent is started in monitor mode on a tmpfs scope of its own (exec_harness),
left to settle after its start-up scan, and its VmRSS, RssAnon and RssFile are read from
/proc. With ``--baseline-tree DIR`` (another checkout: the tree before a change) the same
is done for DIR's agent right after, for a before/after comparison. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from exec_harness import REPO, agent_running, mounted

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def memory_mb(pid: int) -> Dict[str, Optional[float]]:
    out: Dict[str, Optional[float]] = dict.fromkeys(FIELDS)
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            name = line.split(":", 1)[0]
            if name in FIELDS:
                out[name] = round(int(line.split()[1]) / 1024, 1)
    return out


def public_key(work: str) -> str:
    priv, pub = os.path.join(work, "k.pem"), os.path.join(work, "k.pub")
    for argv in (["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                  "ec_paramgen_curve:P-256", "-out", priv],
                 ["openssl", "pkey", "-in", priv, "-pubout", "-out", pub]):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return pub


def one(work: str, backend: str, key: str, settle: float, repo: str) -> Dict[str, object]:
    with mounted("tmpfs", "rss-scope-") as scope, \
            agent_running(work, backend, "monitor", scope, key, repo=repo) as daemon:
        time.sleep(settle)
        return {"backend": backend, "tree": repo, **memory_mb(daemon.pgid)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="fanotify-exec,kill,audit-only")
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--baseline-tree", metavar="DIR")
    args = ap.parse_args()
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="eg-rss-") as work:
        key = public_key(work)
        for backend in args.backends.split(","):
            for repo in [REPO] + ([args.baseline_tree] if args.baseline_tree else []):
                rows.append(one(work, backend, key, args.settle, repo))
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"machine": os.uname().nodename, "kernel": os.uname().release,
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
