"""Cost of one cache-free verification of a signed Go binary (1, 20 and 100 MB).

"Cache-free" means no execguard verdict cache: each round opens the file, hashes it from the
fd, discovers `<file>.sig`, checks the P-256 signature and parses the Go build info, exactly
as `execguard verify` and the agent's miss path do. Rounds are reported with the file in page
cache ("warm") and, as root, after dropping the page cache ("cold"). The Go binaries are real:
`go build` of a program that embeds N MB of random data.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.digest import Artifact
from agent.goinfo import read_buildinfo
from agent.verify import verify_artifact
from agent.verify.keys import key_fingerprint
from agent.verify.model import TrustConfig, TrustedKey

GO_MAIN = """package main

import (
\t_ "embed"
\t"fmt"
)

//go:embed payload.bin
var payload []byte

func main() { fmt.Println(len(payload)) }
"""


def build_go_binary(workdir: str, payload_mb: float) -> str:
    src = os.path.join(workdir, f"src{payload_mb}")
    os.makedirs(src)
    with open(os.path.join(src, "go.mod"), "w") as fh:
        fh.write("module example.com/bench\n\ngo 1.19\n")
    with open(os.path.join(src, "main.go"), "w") as fh:
        fh.write(GO_MAIN)
    with open(os.path.join(src, "payload.bin"), "wb") as fh:
        fh.write(os.urandom(int(payload_mb * 1_000_000)))
    out = os.path.join(workdir, f"go-{payload_mb}mb")
    env = dict(os.environ, GOCACHE=os.path.join(workdir, "gocache"), GOFLAGS="-mod=mod",
               GOTOOLCHAIN="local", CGO_ENABLED="0")
    subprocess.run(["go", "build", "-o", out, "."], cwd=src, env=env, check=True)
    return out


def one_verify(path: str, trust: TrustConfig, cpu: Optional[List[float]] = None) -> float:
    """Wall seconds of one verification; appends its CPU seconds (less noisy) to ``cpu``."""
    t, c = time.perf_counter(), time.process_time()
    with Artifact.open(path) as art:
        verdict = verify_artifact(art, trust)
        read_buildinfo(art)
    elapsed = time.perf_counter() - t
    if cpu is not None:
        cpu.append(time.process_time() - c)
    assert verdict.trusted, verdict.detail
    return elapsed


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1,20,100", help="target binary sizes in MB")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--cold-rounds", type=int, default=5)
    args = ap.parse_args()
    priv = ec.generate_private_key(ec.SECP256R1())
    pub = priv.public_key()
    trust = TrustConfig(keys=(TrustedKey(pub, key_fingerprint(pub), "bench"),))
    results: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (float(s) for s in args.sizes.split(",")):
            path = build_go_binary(tmp, max(size - 1.3, 0.0))  # hello world is ~1.3 MB
            with open(path, "rb") as fh:
                sig = priv.sign(fh.read(), ec.ECDSA(hashes.SHA256()))
            with open(path + ".sig", "wb") as fh:
                fh.write(base64.b64encode(sig))
            one_verify(path, trust)
            cpu: List[float] = []
            warm = [one_verify(path, trust, cpu) for _ in range(args.rounds)]
            cold: List[float] = []
            for _ in range(args.cold_rounds):
                if not drop_caches():
                    break
                cold.append(one_verify(path, trust))
            mb = os.path.getsize(path) / 1e6
            results.append({
                "binary_mb": round(mb, 1),
                "warm_ms_median": round(statistics.median(warm) * 1e3, 2),
                "warm_ms_min": round(min(warm) * 1e3, 2),
                "warm_mb_s": round(mb / statistics.median(warm), 1),
                "warm_cpu_ms_median": round(statistics.median(cpu) * 1e3, 2),
                "cold_ms_median": round(statistics.median(cold) * 1e3, 2) if cold else None,
            })
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cpus kernel {platform.release()}",
        "rounds": args.rounds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
