"""Review at fleet size: how fast `execguard denials` reads a collector's tree of many hosts'
decision logs, and at what memory (docs/performance.md, "Review at fleet size").

Writes RECORDS synthetic schema-v1 records (each a real record of the agent's format, with
its own id, host, time, pid and path) spread over HOSTS host directories, then runs, as an
operator would, with /usr/bin/time for wall time and peak RSS:

  * ``denials --log-dir TREE --summary``   every record parsed and counted
  * ``denials --log-dir TREE --host H --json``   one host's records out of all of them
  * the same summary in DuckDB over the same files, when ``duckdb`` imports (a query engine
    the issue asked to compare; not a dependency of execguard)

    python bench/review_scale.py [--records 10000000] [--hosts 1000] [--dir /var/tmp/eg-fleet]
                                 [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.record.decision_log import to_json  # noqa: E402
from tests.record_fixtures import make_decision  # noqa: E402

EXECGUARD = [sys.executable, "-m", "agent"]


def template() -> str:
    """One real record with placeholders where records differ."""
    obj = to_json("@ID@", make_decision(1, path="/opt/app/@PATH@"),
                  host={"hostname": "@HOST@", "machine_id": "@MID@", "boot_id": "b0"})
    obj["time_ns"] = 1_700_000_000_000_000_000
    obj["event"]["pid"] = 4242
    text = json.dumps(obj, separators=(",", ":"))
    return (text.replace('"time_ns":1700000000000000000', '"time_ns":%(t)d')
            .replace('"pid":4242', '"pid":%(pid)d').replace("@ID@", "%(id)s")
            .replace("@PATH@", "%(path)s").replace("@HOST@", "%(host)s")
            .replace("@MID@", "%(mid)s"))


def generate(top: Path, records: int, hosts: int) -> float:
    start = time.monotonic()
    line = template() + "\n"
    per_host = records // hosts
    for h in range(hosts):
        directory = top / f"dc{h % 4}" / f"host-{h:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        name, mid = f"host-{h:04d}", f"{h:032x}"
        with open(directory / "decisions.jsonl", "w") as fh:
            fh.writelines(line % {"id": f"{h:06x}{i:013x}", "t": 1_700_000_000_000_000_000 + i,
                                  "pid": 1000 + i % 30000, "path": f"bin{i % 50}",
                                  "host": name, "mid": mid}
                          for i in range(per_host))
    return time.monotonic() - start


def timed(argv: List[str]) -> Dict[str, float]:
    out = subprocess.run(["/usr/bin/time", "-f", "@@ %e %M", *argv], capture_output=True,
                         text=True, cwd=REPO)
    tail = [line for line in out.stderr.splitlines() if line.startswith("@@ ")][-1].split()
    return {"seconds": float(tail[1]), "peak_rss_mb": int(tail[2]) / 1024,
            "rc": out.returncode, "stdout_lines": out.stdout.count("\n")}


DUCKDB = """
import duckdb, sys
con = duckdb.connect()
rows = con.execute("SELECT reason, count(*) FROM read_json_auto(?, format='newline_delimited')"
                   " WHERE decision = 'deny' GROUP BY reason", [sys.argv[1]]).fetchall()
print(rows)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--dir", default="/var/tmp/eg-fleet")
    ap.add_argument("--keep", action="store_true", help="keep the generated tree")
    args = ap.parse_args()
    top = Path(args.dir)
    shutil.rmtree(top, ignore_errors=True)
    made = generate(top, args.records, args.hosts)
    size = sum(f.stat().st_size for f in top.rglob("decisions.jsonl"))
    n = args.records // args.hosts * args.hosts
    print(f"generated {n} records, {args.hosts} hosts, {size / 2**30:.2f} GiB in {made:.0f} s")
    results: Dict[str, Dict[str, float]] = {}
    try:
        results["denials --summary"] = timed([*EXECGUARD, "denials", "--log-dir", str(top),
                                              "--summary"])
        results["denials --host --json"] = timed([*EXECGUARD, "denials", "--log-dir",
                                                  str(top), "--host", "host-0007", "--json"])
        try:
            import duckdb  # noqa: F401

            results["duckdb summary"] = timed([sys.executable, "-c", DUCKDB,
                                               str(top / "*" / "*" / "decisions.jsonl")])
        except ImportError:
            print("duckdb does not import here: its row left out")
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    for name, r in results.items():
        print(f"{name:24} {r['seconds']:8.1f} s {n / r['seconds']:12,.0f} records/s "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB rc {int(r['rc'])}")
    print(json.dumps({"records": n, "hosts": args.hosts, "bytes": size, "cpus": os.cpu_count(),
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
