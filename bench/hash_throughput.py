"""SHA-256 throughput of agent.digest.hash_fd against `openssl dgst -sha256`, same file.

Method (see ../shared/research/perf-baselines.md): the file sits in page cache; rounds of
openssl and of hash_fd are interleaved so that drift on a shared 2-core VM hits both alike.
openssl's process start-up is measured on an empty file and subtracted, so both figures are
hashing + reading only. Prints one JSON object; docs/performance.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

from agent.digest import hash_fd


def openssl_seconds(path: str) -> float:
    t = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", path], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def ours_seconds(path: str) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        hash_fd(fd)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, empty = os.path.join(tmp, "blob"), os.path.join(tmp, "empty")
        with open(path, "wb") as fh:
            fh.write(os.urandom(args.mb * 1_000_000))
        open(empty, "wb").close()
        ours_seconds(path)  # warm page cache
        o_full, o_empty, mine = [], [], []
        for _ in range(args.rounds):
            o_empty.append(openssl_seconds(empty))
            o_full.append(openssl_seconds(path))
            mine.append(ours_seconds(path))
    startup = statistics.median(o_empty)
    openssl_net = statistics.median(o_full) - startup
    ours = statistics.median(mine)
    mb = args.mb
    print(json.dumps({
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus "
                   f"kernel {platform.release()}",
        "file_mb": mb, "rounds": args.rounds,
        "openssl_startup_ms": round(startup * 1e3, 2),
        "openssl_mb_s": round(mb / openssl_net, 1),
        "hash_fd_mb_s": round(mb / ours, 1),
        "hash_fd_vs_openssl": round(openssl_net / ours, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
