"""Per-verification cost of each signature format, with the file already hashed.

Uses the test material the npm sigstore client makes offline (tests/bundle_fixtures.py) and
times `verify_bundle` / `verify_sig` in process, median of N after one warm-up (the warm-up
pays sigstore-python's import and the trusted-root parse, once per agent process).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.digest import Artifact
from agent.verify.bundle import verify_bundle
from agent.verify.cosign_sig import verify_sig
from agent.verify.keys import key_fingerprint
from agent.verify.model import TrustConfig, TrustedKey, Verdict
from tests.bundle_fixtures import dumps, generated, to_legacy


def median_ms(fn: Callable[[], Verdict], rounds: int) -> float:
    assert fn().trusted
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    gen = generated()
    trust = gen.trust()
    priv = ec.generate_private_key(ec.SECP256R1())
    sig_trust = TrustConfig(keys=(TrustedKey(priv.public_key(),
                                             key_fingerprint(priv.public_key()), "bench"),))
    out: Dict[str, float] = {}
    with Artifact.open(str(gen.hello)) as art:
        sig = base64.b64encode(priv.sign(art.read_all(), ec.ECDSA(hashes.SHA256())))
        _ = art.sha256
        out["cosign-sig P-256"] = median_ms(lambda: verify_sig(art, sig, "s", sig_trust),
                                            args.rounds)
        for name in ("keyless-v0.3.json", "keyless-v0.2.json", "keyless-v0.1-set-only.json",
                     "key-v0.2.json", "key-notlog-v0.2.json"):
            data = gen.read(name)
            out[name] = median_ms(lambda d=data, n=name: verify_bundle(art, d, n, trust),
                                  args.rounds)
        legacy = dumps(to_legacy(gen.doc("keyless-v0.2.json")))
        out["cosign legacy bundle (keyless)"] = median_ms(
            lambda: verify_bundle(art, legacy, "legacy", trust), args.rounds)
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cpus kernel "
                      f"{platform.release()}", "rounds": args.rounds, "median_ms": out},
                     indent=2))


if __name__ == "__main__":
    main()
