"""Exec overhead: the same exec loop with the agent off, per backend and mode, and fapolicyd.

Method (research/perf-baselines.md): a static Go binary (``func main(){}``, signed) is copied
to M, a tmpfs the agent scopes, and to R, a ramfs nobody watches. Each *visit* starts one
condition, warms it (the first exec of M fills the cache), then runs blocks that alternate M
and R (order M,R then R,M). Every condition visit is paired with an agent-off visit just
before it, and the order of conditions rotates every round. Figures per condition:

- ``coarse``: mean µs per exec of M in the visit vs the agent-off visit before it;
- ``fine``: M - R inside the visit (cancels drift; valid where R is unseen: fanotify and
  fapolicyd, not the BCC sensor, which sees every exec on the host);
- ``cpu_us_per_exec``: utime+stime of the daemon's process group over the timed loop,
  divided by all execs of the loop (M and R), and its RSS.

``--scope-fs ext4`` puts M on a loop-mounted ext4 instead of a tmpfs (fanotify-exec keeps
ignore marks only on filesystems it write-guards, tmpfs among them: docs/fanotify.md), and
``--baseline-tree DIR`` runs every agent condition also from another checkout
(``BACKEND/MODE@baseline``), in the same rounds: a before/after comparison.

Safety: nothing enforces outside M; every exec and every open probe has a stall guard that
SIGKILLs the daemon (then the exec's child) if one waits past ``--stall-s``. fapolicyd runs
in the foreground, permissive, watching tmpfs only, under a deadline, and is stopped in
``finally``; its configuration is restored afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from exec_harness import (
    REPO,
    ControlError,
    Daemon,
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

BACKENDS = ("fanotify-exec", "kill", "audit-only")
BASELINE = "baseline"  # BACKEND/MODE@baseline: the agent of --baseline-tree


FAPD_CONF = """permissive = 1
nice_val = 0
q_size = 640
uid = root
gid = root
do_stat_report = 0
detailed_report = 0
db_max_size = 50
subj_cache_size = 1549
obj_cache_size = 8191
watch_fs = tmpfs
trust = file
integrity = none
syslog_format = rule,dec,perm,auid,pid,exe,:,path,ftype,trust
rpm_sha256_only = 0
allow_filesystem_mark = 0
"""
# a trust lookup for every exec (empty trust DB), then allow: --debug-deny prints nothing
FAPD_RULES = "allow perm=execute all : trust=1\nallow perm=any all : all\n"


def ensure_fapolicyd() -> str:
    """Install Debian's fapolicyd if missing, never letting the package start it: its stock
    configuration (permissive = 0, an empty trust DB, the root filesystem watched) would deny
    every exec on the host. A policy-rc.d that refuses every start covers the install."""
    if not os.path.exists("/usr/sbin/fapolicyd"):
        guard = "/usr/sbin/policy-rc.d"
        ours = not os.path.exists(guard)
        try:
            if ours:
                with open(guard, "w") as fh:
                    fh.write("#!/bin/sh\n# execguard bench: no service starts during install\n"
                             "exit 101\n")
                os.chmod(guard, 0o755)
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", RUNLEVEL="1")
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                            "fapolicyd"], env=env, check=True, timeout=600, capture_output=True)
        finally:
            if ours:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(guard)
        if subprocess.run(["pgrep", "-x", "fapolicyd"], capture_output=True).returncode == 0:
            raise RuntimeError("the fapolicyd package started its daemon: stop it now "
                               "(systemctl stop fapolicyd)")
    ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "fapolicyd"],
                         capture_output=True, text=True, timeout=10).stdout
    return ver


@contextlib.contextmanager
def fapolicyd_running(work: str, probe: str, deadline_s: float) -> Iterator[Daemon]:
    """fapolicyd in the foreground, permissive, ``watch_fs = tmpfs``; config restored after."""
    if subprocess.run(["pgrep", "-x", "fapolicyd"], capture_output=True).returncode == 0:
        raise RuntimeError("a fapolicyd is already running on this host: not touching it")
    etc = "/etc/fapolicyd"
    saved: Dict[str, Optional[bytes]] = {}
    for name in ("fapolicyd.conf", "compiled.rules", "fapolicyd.rules"):
        path = os.path.join(etc, name)
        saved[path] = Path(path).read_bytes() if os.path.exists(path) else None
    log = Path(work) / "fapolicyd.out"
    daemon = Daemon(None, "fapolicyd")
    killer: Optional[threading.Timer] = None
    try:
        with open(os.path.join(etc, "fapolicyd.conf"), "w") as fh:
            fh.write(FAPD_CONF)
        with open(os.path.join(etc, "compiled.rules"), "w") as fh:
            fh.write(FAPD_RULES)
        os.makedirs("/run/fapolicyd", exist_ok=True)
        with open(log, "wb") as fh:
            daemon.proc = subprocess.Popen(["/usr/sbin/fapolicyd", "--debug-deny",
                                            "--permissive"], stdout=fh,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        pgid = daemon.proc.pid
        killer = threading.Timer(deadline_s, lambda: os.killpg(pgid, signal.SIGKILL))
        killer.daemon = True
        killer.start()
        ready = time.monotonic() + 30
        while time.monotonic() < ready:  # ready = it marked the mounts and answers
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"fapolicyd exited {daemon.proc.returncode}: "
                                   f"{log.read_text(errors='replace')[-1500:]}")
            if b"Starting to listen" in log.read_bytes():
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("fapolicyd did not start listening within 30 s")
        yield daemon
    finally:
        if killer is not None:
            killer.cancel()
        daemon.stop()
        for path, data in saved.items():
            if data is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            else:
                with open(path, "wb") as fh:
                    fh.write(data)


def loop(m: str, r: str, blocks: int, block: int, warm: int, guard: StallGuard
         ) -> Dict[str, List[float]]:
    """Per-block mean µs of M and R; blocks alternate M,R then R,M."""
    exec_block(m, warm, guard)
    exec_block(r, warm, guard)
    out: Dict[str, List[float]] = {"M": [], "R": []}
    for i in range(blocks):
        for name in (("M", "R") if i % 2 == 0 else ("R", "M")):
            ns = exec_block(m if name == "M" else r, block, guard)
            out[name].append(statistics.fmean(ns) / 1000)
    return out


def visit(cond: str, ctx: Dict[str, Any], guard: StallGuard) -> Dict[str, Any]:
    m, r, args = ctx["M"], ctx["R"], ctx["args"]
    execs = 2 * args.blocks * args.block

    def measure(daemon: Optional[Daemon]) -> Dict[str, Any]:
        if daemon is not None:
            guard.victims = [daemon.pgid]
        cpu0 = group_cpu_s(daemon.pgid) if daemon else 0.0
        res: Dict[str, Any] = loop(m, r, args.blocks, args.block, args.warm, guard)
        if daemon is not None:
            res["cpu_us_per_exec"] = (group_cpu_s(daemon.pgid) - cpu0) * 1e6 / execs
            res["rss_mb"] = rss_mb(daemon.pgid)
        guard.victims = []
        return res

    if cond == "off":
        return measure(None)
    if cond == "fapolicyd":
        with fapolicyd_running(ctx["work"], m, args.fapd_deadline) as daemon:
            return measure(daemon)
    name, _, tree = cond.partition("@")
    backend, mode = name.split("/")
    repo = ctx["args"].baseline_tree if tree == BASELINE else REPO
    with agent_running(ctx["work"], backend, mode, os.path.dirname(m), ctx["key"],
                       repo=repo) as daemon:
        guard.victims = [daemon.pgid]
        exec_block(m, 1, guard)  # the first exec verifies and fills the cache
        wait_decisions(daemon.info["log"], m, 1)
        res = measure(daemon)
        res["status"] = request(daemon.info["socket"], timeout=5)
        return res


def summarise(rounds: List[Dict[str, Dict[str, Any]]], conds: Sequence[str]
              ) -> Dict[str, Any]:
    def med(xs: List[float]) -> Optional[float]:
        return round(statistics.median(xs), 2) if xs else None

    out: Dict[str, Any] = {}
    offs = [statistics.fmean(rd["off"]["M"]) for rd in rounds if "off" in rd]
    out["off"] = {"us_per_exec_M": med(offs),
                  "us_per_exec_R": med([statistics.fmean(rd["off"]["R"]) for rd in rounds]),
                  "fine_M_minus_R_us": med([a - b for rd in rounds for a, b in
                                            zip(rd["off"]["M"], rd["off"]["R"])])}
    for cond in conds:
        got = [rd[cond] for rd in rounds if cond in rd and "M" in rd[cond]]
        if not got:
            out[cond] = {"error": [rd[cond].get("error") for rd in rounds if cond in rd]}
            continue
        pairs = [(statistics.fmean(rd[cond]["M"]), statistics.fmean(rd[f"off-{cond}"]["M"]))
                 for rd in rounds if "M" in rd.get(cond, {}) and f"off-{cond}" in rd]
        fine = [a - b for g in got for a, b in zip(g["M"], g["R"])]
        fine_ratio = [a / b for g in got for a, b in zip(g["M"], g["R"])]
        last = got[-1].get("status", {})
        out[cond] = {
            "us_per_exec_M": med([statistics.fmean(g["M"]) for g in got]),
            "us_per_exec_R": med([statistics.fmean(g["R"]) for g in got]),
            "coarse_added_us": med([a - b for a, b in pairs]),
            "coarse_added_range_us": [round(min(a - b for a, b in pairs), 1),
                                      round(max(a - b for a, b in pairs), 1)] if pairs else None,
            "ratio_to_off": round(statistics.median([a / b for a, b in pairs]), 3)
            if pairs else None,
            "fine_M_minus_R_us": med(fine),
            "fine_ratio_M_over_R": round(statistics.median(fine_ratio), 3),
            "cpu_us_per_exec": med([g["cpu_us_per_exec"] for g in got]),
            "rss_mb": max((g["rss_mb"] or 0) for g in got),
            "enforcement": last.get("enforcement"),
            "decisions": last.get("decisions", {}).get("decisions"),
            "sensor": {k: v for k, v in last.get("sensor", {}).items()
                       if k in ("events", "allowed", "ignore_marks", "records", "kernel_hits",
                                "decided", "sensor", "cached", "opened", "marked_filesystems",
                                "marked_inodes")},
            "errors": [rd[cond]["error"] for rd in rounds if "error" in rd.get(cond, {})],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=10, help="M,R block pairs per visit")
    ap.add_argument("--block", type=int, default=200, help="execs per block")
    ap.add_argument("--warm", type=int, default=50, help="untimed execs per target per visit")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--no-fapolicyd", action="store_true")
    ap.add_argument("--stall-s", type=float, default=5.0)
    ap.add_argument("--fapd-deadline", type=float, default=120.0)
    ap.add_argument("--scope-fs", choices=("tmpfs", "ext4"), default="tmpfs",
                    help="the filesystem of M (ext4: a loop-mounted image)")
    ap.add_argument("--baseline-tree", metavar="DIR",
                    help="another checkout: each agent condition also runs from it "
                    "(BACKEND/MODE@baseline), in the same rounds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("exec_overhead: run as root (mounts, fanotify, BPF)")
    conds = [f"{b}/{m}" for b in args.backends.split(",") for m in ("monitor", "enforce")]
    if args.baseline_tree:
        conds += [f"{c}@{BASELINE}" for c in conds]
    fapd_version = None
    if not args.no_fapolicyd:
        fapd_version = ensure_fapolicyd()
        conds.append("fapolicyd")
    import gc

    gc.disable()  # no collector pauses inside timed blocks
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="eg-execbench-") as work, \
            mounted(args.scope_fs, "eg-bench-M-") as mdir, \
            mounted("ramfs", "eg-bench-R-") as rdir:
        binary, key = build_target(work)
        ctx = {"M": place(binary, mdir), "R": place(binary, rdir), "key": key, "work": work,
               "args": args}
        rounds: List[Dict[str, Dict[str, Any]]] = []
        with StallGuard(args.stall_s, probe=ctx["M"]) as guard:
            for rnd in range(args.rounds):
                order = conds[rnd % len(conds):] + conds[:rnd % len(conds)]
                rd: Dict[str, Dict[str, Any]] = {}
                for cond in order:
                    rd[f"off-{cond}"] = visit("off", ctx, guard)
                    try:
                        rd[cond] = visit(cond, ctx, guard)
                    except (RuntimeError, OSError, ControlError,
                            subprocess.SubprocessError) as exc:
                        rd[cond] = {"error": str(exc)[-600:]}
                    print(f"round {rnd} {cond}: done", file=sys.stderr)
                rd["off"] = {k: [x for c in conds for x in rd[f"off-{c}"][k]]
                             for k in ("M", "R")}
                rounds.append(rd)
        size = os.path.getsize(binary)
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cpus kernel {platform.release()}",
        "python": platform.python_version(), "fapolicyd": fapd_version,
        "target": f"static Go binary, func main(){{}}, {size} bytes, signed (.sig, P-256)",
        "scope_fs": args.scope_fs, "baseline_tree": args.baseline_tree,
        "rounds": args.rounds, "blocks": args.blocks, "block": args.block,
        "execs_per_visit": 2 * args.blocks * args.block,
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "stall_incidents": guard.incidents, "wall_s": round(time.time() - started, 1),
        "results": summarise(rounds, conds)}, indent=2))


if __name__ == "__main__":
    main()
