"""bpf-lsm exec overhead, inside the lockdown test VM: agent off vs monitor vs enforce vs
protected (enforce with on_agent_exit = keep-enforcing: pinned and self-protected).

BPF LSM programs cannot load on the build host, so this runs in the VM (`make bench-lsm`
boots it; scripts/vm-bench-lsm.sh). Under qemu TCG an exec costs 100-200x what it costs on
the host and the host is shared, so only ratios taken close together mean anything:

- rounds visit the three conditions in a rotated order; each visit starts its agent once,
  warms the cache (the first exec of the target fills the kernel verdict map), then runs
  interleaved blocks: M (the signed target on a tmpfs the agent scopes) and R (a copy on a
  tmpfs nobody scopes: the hook returns after its scope lookup);
- ``ratio_to_off``: M in the visit over M in the same round's agent-off visit (median);
  ``fine_ratio``: M over R inside the visit (the off visit gives the A/A bias);
- ``bpf_ns_per_exec``: with ``kernel.bpf_stats_enabled=1``, the agent's BPF programs'
  ``run_time_ns`` (from the fdinfo of its program fds) over the M blocks, per M exec, and
  ``bpf_ratio`` = 1 + that / (M ns per exec with the agent off): the exact in-kernel cost,
  under the same emulation as the exec;
- ``agent_cpu_us_per_exec``: CPU of the agent's process group over the visit, per exec.

Usage (root, inside the VM; the target is prebuilt on the host, Go crawls under TCG):
    python bench/lsm_overhead.py prebuild DIR          # host: signed static Go target + key
    python bench/lsm_overhead.py run DIR [--rounds 2] [--blocks 3] [--block 30] [--out F]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from exec_harness import (  # type: ignore[import-not-found]
    REPO,
    Daemon,
    StallGuard,
    agent_running,
    build_target,
    exec_block,
    group_cpu_s,
    mounted,
    place,
)

# protected: enforce with on_agent_exit = keep-enforcing (pinned, self-protected: the guard
# hooks on every path lookup, open and signal are what it adds); stopped with a token
CONDITIONS = ("off", "monitor", "enforce", "protected")
BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def prog_stats(pid: int) -> Dict[str, Tuple[int, int]]:
    """prog id -> (run_time_ns, run_cnt) of every BPF program the process holds open."""
    out: Dict[str, Tuple[int, int]] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                kv = dict(line.split(":", 1) for line in fh.read().splitlines() if ":" in line)
            out[kv["prog_id"].strip()] = (int(kv.get("run_time_ns", "0")),
                                          int(kv.get("run_cnt", "0")))
        except (OSError, KeyError, ValueError):
            continue
    return out


_SYS_BPF = 321  # x86_64, the VM's architecture
_BPF_PROG_GET_FD_BY_ID, _BPF_OBJ_GET_INFO_BY_FD = 13, 15
_names: Dict[str, str] = {}


def prog_name(prog_id: str) -> str:
    """The program's name (bpf_prog_info.name, 16 bytes: the C function's name, cut), by
    id: which hook a program is. Its id when the kernel will not say."""
    if prog_id in _names:
        return _names[prog_id]
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(struct.pack("III", int(prog_id), 0, 0), 128)
    fd = libc.syscall(_SYS_BPF, _BPF_PROG_GET_FD_BY_ID, attr, 128)
    name = prog_id
    if fd >= 0:
        info = ctypes.create_string_buffer(256)
        attr = ctypes.create_string_buffer(
            struct.pack("IIQ", fd, 256, ctypes.addressof(info)), 128)
        if libc.syscall(_SYS_BPF, _BPF_OBJ_GET_INFO_BY_FD, attr, 128) == 0:
            name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace") or prog_id
        os.close(fd)
    _names[prog_id] = name
    return name


def per_prog(after: Dict[str, Tuple[int, int]], before: Dict[str, Tuple[int, int]],
             into: Dict[str, List[int]]) -> None:
    """Add each program's run time and run count over a block to ``into`` (by name)."""
    for k, (ns, cnt) in after.items():
        b_ns, b_cnt = before.get(k, (0, 0))
        acc = into.setdefault(prog_name(k), [0, 0])
        acc[0] += ns - b_ns
        acc[1] += cnt - b_cnt


def delta(after: Dict[str, Tuple[int, int]], before: Dict[str, Tuple[int, int]]
          ) -> Tuple[int, int]:
    ns = sum(v[0] - before.get(k, (0, 0))[0] for k, v in after.items())
    runs = sum(v[1] - before.get(k, (0, 0))[1] for k, v in after.items())
    return ns, runs


def visit(cond: str, m: str, r: str, key: str, work: str, args: argparse.Namespace,
          guard: StallGuard) -> Dict[str, Any]:
    """One condition: start it, warm it, run the interleaved blocks, account for them."""
    res: Dict[str, Any] = {"condition": cond, "M_ns": [], "R_ns": []}
    bpf = {"M": [0, 0, 0], "R": [0, 0, 0]}  # ns, runs, execs
    progs: Dict[str, List[int]] = {}  # M blocks: program name -> [ns, runs]

    def blocks(daemon: Optional[Daemon]) -> None:
        pid = daemon.proc.pid if daemon is not None and daemon.proc is not None else 0
        exec_block(m, 3, guard)  # enforce: the first exec fills the map (fanotify, at open)
        exec_block(r, 3, guard)
        cpu0, t0 = (group_cpu_s(pid) if pid else 0.0), time.monotonic()
        for i in range(args.blocks):
            for which, path in ((("M", m), ("R", r)) if i % 2 == 0 else (("R", r), ("M", m))):
                p0 = prog_stats(pid) if pid else {}
                ns = exec_block(path, args.block, guard)
                if pid:
                    p1 = prog_stats(pid)
                    if which == "M":
                        per_prog(p1, p0, progs)
                    d_ns, d_runs = delta(p1, p0)
                    bpf[which][0] += d_ns
                    bpf[which][1] += d_runs
                    bpf[which][2] += len(ns)
                res[f"{which}_ns"].append(statistics.mean(ns))
        res["seconds"] = round(time.monotonic() - t0, 1)
        if pid:
            execs = 2 * args.blocks * args.block
            res["agent_cpu_us_per_exec"] = round((group_cpu_s(pid) - cpu0) / execs * 1e6, 1)
            assert daemon is not None
            from agent.control import request

            status = request(daemon.info["socket"], timeout=10)
            res["sensor"] = status.get("sensor")
            res["backend"], res["enforcement"] = status.get("backend"), status.get("enforcement")

    if cond == "off":
        blocks(None)
    else:
        protected = cond == "protected"
        extra = ["--on-agent-exit", "keep-enforcing", "--breakglass-keys",
                 os.path.join(work, "bg-keys")] if protected else []
        with agent_running(work, "bpf-lsm", "enforce" if protected else cond,
                           os.path.dirname(m), key, extra=extra,
                           ready_s=args.ready_s) as daemon:
            guard.victims = [daemon.pgid]
            try:
                blocks(daemon)
            finally:
                guard.victims = []
                if protected:  # the kernel refuses its SIGTERM: the authorized stop
                    authorized_stop(daemon, work)
    m_execs = bpf["M"][2]
    if m_execs:  # per hook: ns per call, calls per exec (the per-hook targets)
        res["bpf_per_prog_M"] = {
            name: {"ns_per_call": round(ns / runs) if runs else None,
                   "calls_per_exec": round(runs / m_execs, 2)}
            for name, (ns, runs) in sorted(progs.items()) if runs}
    for which in ("M", "R"):
        ns, runs, execs = bpf[which]
        if execs:
            res[f"bpf_ns_per_exec_{which}"] = round(ns / execs)
            res[f"bpf_runs_per_exec_{which}"] = round(runs / execs, 2)
    res["M_us"] = round(statistics.median(res["M_ns"]) / 1000, 1)
    res["R_us"] = round(statistics.median(res["R_ns"]) / 1000, 1)
    res["fine_ratio"] = round(statistics.median(
        [mm / rr for mm, rr in zip(res["M_ns"], res["R_ns"])]), 4)
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_ns")}), flush=True)
    return res


def stop_keys(work: str) -> None:
    """Break-glass keys in WORK/bg-keys for the protected visits' authorized stops."""
    keys = os.path.join(work, "bg-keys")
    os.makedirs(keys)
    subprocess.run([sys.executable, "-m", "agent", "keygen", "--output-prefix",
                    os.path.join(keys, "bench"), "--no-password"], check=True, cwd=REPO,
                   capture_output=True, timeout=120)


def authorized_stop(daemon: Daemon, work: str) -> None:
    """A fresh stop token (each is single-use), then ``execguard stop --token``."""
    def agent(*argv: str) -> str:
        return subprocess.run([sys.executable, "-m", "agent", *argv], check=True, cwd=REPO,
                              capture_output=True, text=True, timeout=120).stdout
    token = os.path.join(work, f"stop-{time.monotonic_ns()}.token")
    host = agent("breakglass", "host-id").strip()
    agent("breakglass", "issue", "--host", host, "--seconds", "600", "--reason", "bench stop",
          "--key", os.path.join(work, "bg-keys", "bench.key"), "--grant", "stop", "-o", token)
    agent("stop", "--token", token, "--socket", daemon.info["socket"])
    assert daemon.proc is not None
    daemon.proc.wait(timeout=120)


def summarize(visits: List[Dict[str, Any]], rounds: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    offs = [v for v in visits if v["condition"] == "off"]
    off_m_ns = statistics.median([statistics.median(v["M_ns"]) for v in offs])
    out["off_M_us_per_exec"] = round(off_m_ns / 1000, 1)
    out["off_fine_ratio_AA"] = [v["fine_ratio"] for v in offs]
    for cond in CONDITIONS[1:]:
        mine = [v for v in visits if v["condition"] == cond]
        ratios = []
        for rnd in range(rounds):
            here = [v for v in mine if v["round"] == rnd]
            off = [v for v in offs if v["round"] == rnd]
            if here and off:
                ratios.append(statistics.median(here[0]["M_ns"]) /
                              statistics.median(off[0]["M_ns"]))
        bpf_ns = [v.get("bpf_ns_per_exec_M", 0) for v in mine]
        out[cond] = {
            "ratio_to_off": round(statistics.median(ratios), 3) if ratios else None,
            "ratio_to_off_per_round": [round(x, 3) for x in ratios],
            "fine_ratio_M_over_R": [v["fine_ratio"] for v in mine],
            "bpf_ns_per_exec_M": bpf_ns,
            "bpf_runs_per_exec_M": [v.get("bpf_runs_per_exec_M") for v in mine],
            "bpf_ns_per_exec_R": [v.get("bpf_ns_per_exec_R") for v in mine],
            "bpf_ratio": round(1 + statistics.median(bpf_ns) / off_m_ns, 5),
            "agent_cpu_us_per_exec": [v.get("agent_cpu_us_per_exec") for v in mine],
            "bpf_per_prog_M": [v.get("bpf_per_prog_M") for v in mine],
        }
    return out


def run(args: argparse.Namespace) -> int:
    target, key = os.path.join(args.dir, "target"), os.path.join(args.dir, "bench.pub")
    for need in (target, target + ".sig", key):
        if not os.path.exists(need):
            sys.exit(f"lsm_overhead: {need} missing: run 'lsm_overhead.py prebuild {args.dir}' "
                     "on the host first")
    with open(BPF_STATS) as fh:
        stats_before = fh.read().strip()
    with open("/sys/kernel/security/lockdown") as fh:
        lockdown = fh.read().strip()
    work = os.path.join("/tmp", f"eg-lsm-bench-{os.getpid()}")
    os.makedirs(work)
    stop_keys(work)
    result: Dict[str, Any] = {
        "kernel": os.uname().release, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lockdown": lockdown,
        "cpus": os.cpu_count(), "rounds": args.rounds, "blocks": args.blocks,
        "block": args.block, "target": "static Go binary, signed (go build -trimpath -s -w)",
    }
    visits: List[Dict[str, Any]] = []
    try:
        with open(BPF_STATS, "w") as fh:
            fh.write("1")
        with mounted("tmpfs", "eg-lsm-m-") as mdir, mounted("tmpfs", "eg-lsm-r-") as rdir:
            m, r = place(target, mdir), place(target, rdir)
            with StallGuard(args.stall_s) as guard:
                for rnd in range(args.rounds):
                    k = rnd % len(CONDITIONS)
                    order = CONDITIONS[k:] + CONDITIONS[:k]
                    for cond in order:
                        v = visit(cond, m, r, key, work, args, guard)
                        v["round"] = rnd
                        visits.append(v)
                result["stall_incidents"] = guard.incidents
    finally:
        with open(BPF_STATS, "w") as fh:
            fh.write(stats_before)
        subprocess.run(["rm", "-rf", work], check=False)
    result["summary"] = summarize(visits, args.rounds)
    result["visits"] = [{k: v for k, v in x.items() if not k.endswith("_ns")} for x in visits]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("prebuild", help="host: build and sign the static Go target in DIR")
    pre.add_argument("dir")
    r = sub.add_parser("run", help="in the VM: the measurement")
    r.add_argument("dir", help="the prebuild directory")
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument("--blocks", type=int, default=4, help="blocks per target and visit")
    r.add_argument("--block", type=int, default=30, help="execs per block")
    r.add_argument("--stall-s", type=float, default=30.0)
    r.add_argument("--ready-s", type=float, default=600.0, help="agent start-up deadline")
    r.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.cmd == "prebuild":
        os.makedirs(args.dir, exist_ok=True)
        work = os.path.join(args.dir, "build")
        os.makedirs(work, exist_ok=True)
        out, pub = build_target(work)
        for src, dst in ((out, "target"), (out + ".sig", "target.sig"), (pub, "bench.pub")):
            os.replace(src, os.path.join(args.dir, dst))
        print(os.path.join(args.dir, "target"))
        return 0
    assert REPO
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
