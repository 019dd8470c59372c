"""Exec storm: many processes looping exec under the agent; decisions vs execs vs drops, RSS, CPU.

For each backend (default ``fanotify-exec`` and ``kill``), in enforce mode with a warm cache
(every target verified before the clock starts), on a tmpfs the agent scopes:

1. *storm*: ``--procs`` workers exec their own signed copy of a static Go binary as fast as
   they can for ``--seconds``. Reported: execs made, decision records for the scope (decision
   log, all rotated files), records the agent dropped, sensor ring-buffer drops, and the
   agent's RSS sampled every second (steady state = median of the second half).
2. *paced*: workers share a fixed total rate (``--rate``, default 1,000 execs/s) for
   ``--paced-seconds``; reported: the achieved rate and the agent's CPU as % of one core.

With ``fanotify-exec`` an allowed file on this tmpfs gets an ignore mark (removed at every
open for write), so after the first exec of each copy the kernel stops asking about the
exec (each still costs one open event of the write guard): decision records are one per
file, not one per exec. With
``kill`` the BPF sensor sees every exec, and each one in scope is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from exec_harness import (
    REPO,
    ControlError,
    StallGuard,
    agent_running,
    build_target,
    exec_block,
    group_cpu_s,
    mounted,
    place,
    request,
    rss_mb,
    wait_decisions,
)

# one worker: exec PATH until the deadline (at RATE per second when RATE > 0); print counts
WORKER = """
import json, os, sys, time
path, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
n = bad = 0
start = time.monotonic()
end = start + seconds
while True:
    now = time.monotonic()
    if now >= end:
        break
    if rate > 0:
        due = start + n / rate
        if due > now:
            time.sleep(due - now)
    try:
        pid = os.posix_spawn(path, [path], {})
        _, status = os.waitpid(pid, 0)
        bad += status != 0
    except OSError:
        bad += 1
    n += 1
print(json.dumps({"execs": n, "failed": bad}))
"""


def count_records(log_dir: str, prefix: str) -> int:
    """Decision records whose event path lies under ``prefix``, across rotated files."""
    needle = f'"path":"{prefix}/'.encode()  # the log's compact separators
    total = 0
    for name in os.listdir(log_dir):
        if name.startswith("decisions.jsonl"):
            with open(os.path.join(log_dir, name), "rb") as fh:
                total += sum(1 for line in fh if needle in line)
    return total


def _drops(status: Dict[str, Any]) -> Any:
    """Ring-buffer drops of the BCC sensor (``kill``, ``audit-only``); None for fanotify."""
    return (status.get("sensor", {}).get("sensor") or {}).get("drops")


def workers(paths: List[str], seconds: float, rate_each: float) -> List[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, "-c", WORKER, p, str(seconds), str(rate_each)],
                             stdout=subprocess.PIPE, text=True) for p in paths]


def collect(procs: List[subprocess.Popen[str]], timeout: float) -> Dict[str, int]:
    out = {"execs": 0, "failed": 0}
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate(timeout=10)
            out["failed"] += 1
        got = json.loads(stdout or '{"execs": 0, "failed": 1}')
        out["execs"] += got["execs"]
        out["failed"] += got["failed"]
    return out


def one_backend(backend: str, args: argparse.Namespace, work: str, scope: str, binary: str,
                key: str, guard: StallGuard, probe: str) -> Dict[str, Any]:
    paths = []
    for i in range(args.procs):
        os.makedirs(os.path.join(scope, f"w{i}"))
        paths.append(place(binary, os.path.join(scope, f"w{i}")))
    extra: List[str] = []
    if args.deadline_ms:  # the default policy with another decision deadline
        policy = os.path.join(work, "policy.toml")
        with open(os.path.join(REPO, "agent", "policy", "default.toml")) as fh:
            text = fh.read().replace("decision_deadline_ms = 500",
                                     f"decision_deadline_ms = {args.deadline_ms}")
        with open(policy, "w") as fh:
            fh.write(text)
        extra = ["--policy", policy]
    with agent_running(work, backend, "enforce", scope, key, extra) as agent:
        guard.victims = [agent.pgid]
        log_dir = os.path.dirname(agent.info["log"])
        for p in [*paths, probe]:  # warm: every copy verified and cached before the clock
            exec_block(p, 1, guard)
        for p in paths:
            wait_decisions(agent.info["log"], p, 1)
        before = request(agent.info["socket"], timeout=5)
        recorded0 = count_records(log_dir, scope)
        cpu0, t0 = group_cpu_s(agent.pgid), time.monotonic()
        procs = workers(paths, args.seconds, 0)
        rss: List[float] = []
        while any(p.poll() is None for p in procs) and time.monotonic() - t0 < args.seconds + 30:
            rss.append(rss_mb(agent.pgid) or 0.0)
            time.sleep(1)
        made = collect(procs, 30)
        storm_s = time.monotonic() - t0
        storm_cpu = group_cpu_s(agent.pgid) - cpu0
        time.sleep(1.5)  # let the sensor drain and the writer flush
        after = request(agent.info["socket"], timeout=5)
        recorded = count_records(log_dir, scope) - recorded0

        cpu1, t1 = group_cpu_s(agent.pgid), time.monotonic()
        paced = collect(workers(paths[:args.paced_procs], args.paced_seconds,
                                args.rate / args.paced_procs), args.paced_seconds + 30)
        paced_s = time.monotonic() - t1
        paced_cpu = group_cpu_s(agent.pgid) - cpu1
        paced_rss = rss_mb(agent.pgid)
        time.sleep(1.5)
        final = request(agent.info["socket"], timeout=5)
        guard.victims = []
        with open(agent.info["out"], errors="replace") as fh:
            output = fh.read()[-1500:]
    sensor = after.get("sensor", {})
    half = rss[len(rss) // 2:] or [0.0]
    return {
        "storm": {
            "procs": args.procs, "seconds": round(storm_s, 1), "execs": made["execs"],
            "failed_execs": made["failed"], "execs_per_s": round(made["execs"] / storm_s),
            "decision_records_in_scope": recorded,
            "records_dropped": after.get("records_dropped", 0)
            - before.get("records_dropped", 0),
            "sensor_drops": _drops(after) - (_drops(before) or 0)
            if _drops(after) is not None else None,
            "sensor": {k: v for k, v in sensor.items() if isinstance(v, (int, str))},
            "agent_cpu_pct_of_core": round(100 * storm_cpu / storm_s, 1),
            "agent_cpu_us_per_exec": round(storm_cpu * 1e6 / max(made["execs"], 1), 1),
            "rss_mb_steady_median": round(statistics.median(half), 1),
            "rss_mb_max": max(rss or [0.0]),
        },
        "paced": {
            "procs": args.paced_procs, "target_execs_per_s": args.rate,
            "execs_per_s": round(paced["execs"] / paced_s), "failed_execs": paced["failed"],
            "agent_cpu_pct_of_core": round(100 * paced_cpu / paced_s, 1),
            "agent_cpu_us_per_exec": round(paced_cpu * 1e6 / max(paced["execs"], 1), 1),
            "sensor_drops": _drops(final) - _drops(after) if _drops(after) is not None else None,
            "rss_mb": paced_rss,
        },
        "state_after": final.get("state"), "enforcement": final.get("enforcement"),
        "decisions": final.get("decisions", {}).get("decisions"),
        "agent_output_tail": output,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="fanotify-exec,kill")
    ap.add_argument("--procs", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=1000.0, help="paced phase, execs/s in all")
    ap.add_argument("--paced-procs", type=int, default=4)
    ap.add_argument("--paced-seconds", type=float, default=15.0)
    ap.add_argument("--stall-s", type=float, default=5.0)
    ap.add_argument("--deadline-ms", type=int, default=0,
                    help="run with the default policy's decision_deadline_ms set to this")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("exec_storm: run as root (mounts, fanotify, BPF)")
    started = time.time()
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="eg-storm-") as work:
        binary, key = build_target(work)
        for backend in args.backends.split(","):
            with mounted("tmpfs", "eg-storm-scope-") as scope:
                os.makedirs(os.path.join(scope, "probe"))
                probe = place(binary, os.path.join(scope, "probe"))
                guard = StallGuard(args.stall_s, probe=probe, probe_exec=True)
                try:
                    with guard:
                        results[backend] = one_backend(backend, args, work, scope, binary,
                                                       key, guard, probe)
                except (RuntimeError, OSError, subprocess.SubprocessError, ControlError) as exc:
                    results[backend] = {"error": str(exc)[-800:]}
                results[backend]["stall_incidents"] = guard.incidents
            print(f"{backend}: done", file=sys.stderr)
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cpus kernel {platform.release()}",
        "python": platform.python_version(), "repo": REPO,
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1), "deadline_ms": args.deadline_ms or None,
        "results": results}, indent=2))


if __name__ == "__main__":
    main()
