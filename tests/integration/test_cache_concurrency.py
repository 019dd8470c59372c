"""The cache under threads and crashes: a hit never covers other bytes, a kill never corrupts."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List

from agent.cache import TrustedCache, identity_from_stat
from tests.cache_fixtures import BINDING, OTHER_BINDING, fake_identity, trusted

DEADLINE_S = 60  # "never hangs": every thread and child must be done by then


def run_threads(targets: List[Callable[[], None]]) -> List[BaseException]:
    errors: List[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    end = time.monotonic() + DEADLINE_S
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a cache operation hung"
    return errors


def test_hit_never_covers_bytes_other_than_the_verified_ones(tmp_path: Path) -> None:
    """Readers exec-check real files while a writer modifies them and a verifier re-verifies."""
    files = [tmp_path / f"bin{i}" for i in range(16)]
    for f in files:
        f.write_bytes(os.urandom(4096))
    cache = TrustedCache(str(tmp_path / "state" / "cache"), BINDING, max_entries=12)
    done = threading.Event()
    checked = [0]

    def verifier() -> None:  # the pre-warm worker: identity first, then hash the same fd
        rnd = random.Random(1)
        while not done.is_set():
            fd = os.open(rnd.choice(files), os.O_RDONLY)
            try:
                ident = identity_from_stat(os.fstat(fd))
                sha = hashlib.sha256(os.pread(fd, 1 << 20, 0)).hexdigest()
            finally:
                os.close(fd)
            cache.store(ident, sha, trusted(), BINDING)

    def modifier() -> None:
        rnd = random.Random(2)
        for _ in range(400):
            with open(rnd.choice(files), "r+b") as fh:
                fh.seek(rnd.randrange(4096))
                fh.write(os.urandom(1))
            time.sleep(0.001)

    def reader(seed: int) -> Callable[[], None]:
        def run() -> None:
            rnd = random.Random(seed)
            while not done.is_set():
                fd = os.open(rnd.choice(files), os.O_RDONLY)
                try:
                    ident = identity_from_stat(os.fstat(fd))
                    hit = cache.lookup(ident)
                    if hit is None:
                        continue
                    data = os.pread(fd, 1 << 20, 0)
                    if identity_from_stat(os.fstat(fd)) != ident:
                        continue  # changed while we read: the next exec misses anyway
                    assert hit.sha256 == hashlib.sha256(data).hexdigest(), ident
                    checked[0] += 1
                finally:
                    os.close(fd)
        return run

    def flusher() -> None:
        while not done.is_set():
            cache.flush()

    def stop_after(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            finally:
                done.set()
        return run

    errors = run_threads([stop_after(modifier), verifier, verifier, flusher,
                          *(reader(s) for s in range(4))])
    assert errors == []
    s = cache.stats()
    assert checked[0] > 100 and s.stale > 0 and s.evictions > 0 and s.entries <= 12
    print(f"checked {checked[0]} hits; {s}")


def test_hammering_with_policy_reloads_never_serves_another_bindings_verdict(
        tmp_path: Path) -> None:
    cache = TrustedCache(str(tmp_path / "cache"), BINDING, max_entries=64)
    bindings = (BINDING, OTHER_BINDING)
    done = threading.Event()
    lookups = [0] * 6

    def worker(n: int) -> Callable[[], None]:
        def run() -> None:
            rnd = random.Random(n)
            for _ in range(20_000):
                ident = fake_identity(rnd.randrange(200))
                b = rnd.choice(bindings)
                op = rnd.random()
                if op < 0.3:  # the verdict names the binding it was produced under
                    sha = hashlib.sha256(b.encode()).hexdigest()
                    cache.store(ident, sha, trusted(detail=b), b)
                elif op < 0.9:
                    lookups[n] += 1
                    hit = cache.lookup(ident, binding=b)
                    assert hit is None or (hit.identity == ident and hit.verdict.detail == b)
                elif op < 0.97:
                    d = cache.lookup_digest(hashlib.sha256(b.encode()).hexdigest(), binding=b)
                    assert d is None or d.verdict.detail == b
                else:
                    cache.discard(ident)
        return run

    def reloader() -> None:
        i = 0
        while not done.is_set():
            i += 1
            cache.rebind(bindings[i % 2])
            time.sleep(0.0005)

    def flusher() -> None:
        while not done.is_set():
            cache.flush()

    def workers_then_stop() -> None:
        try:
            assert run_threads([worker(n) for n in range(6)]) == []
        finally:
            done.set()

    assert run_threads([workers_then_stop, reloader, flusher]) == []
    s = cache.stats()
    assert s.hits + s.misses == sum(lookups) and s.entries <= 64 and s.rebinds > 10
    assert s.hits > 0 and s.flush_errors == 0
    cache.flush()
    again = TrustedCache(cache.path, cache.binding)
    report = again.load()
    assert report.set_aside is None and report.entries == s.entries


_CHILD = """
import sys
from agent.cache import TrustedCache
from tests.cache_fixtures import BINDING, fake_identity, rich_verdict
c = TrustedCache(sys.argv[1], BINDING, max_entries=8000)
for i in range(8000):
    c.store(fake_identity(i), "ab" * 32, rich_verdict(), BINDING)
c.flush()
print("ready", flush=True)
k = 0
while True:
    k += 1
    c.discard(fake_identity(k % 8000))
    c.store(fake_identity(k % 8000), "ab" * 32, rich_verdict(), BINDING)
    c.flush()
"""


def _kill_when(child: subprocess.Popen[bytes], path: str, on_tmp: bool, delay: float) -> None:
    """SIGKILL the writer: at a random moment, or the moment its tmp file appears."""
    end = time.monotonic() + DEADLINE_S
    if on_tmp:
        while not os.path.exists(path + ".tmp"):
            assert time.monotonic() < end, "the writer never started a write"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)


def test_kill_during_writes_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    path = str(tmp_path / "cache")
    root = str(Path(__file__).resolve().parents[2])
    rnd = random.Random(3)
    mid_write = 0  # kills that left a partial tmp file: the case this test exists for
    for i in range(12):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, path], cwd=root,
                                 stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": root})
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            _kill_when(child, path, on_tmp=i % 3 != 0, delay=rnd.uniform(0.0, 0.004))
            child.wait(DEADLINE_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(DEADLINE_S)
        mid_write += os.path.exists(path + ".tmp")
        report = TrustedCache(path, BINDING, max_entries=8000).load()
        assert report.set_aside is None, report.warnings
        assert report.entries == 8000
        assert not any(".corrupt-" in f for f in os.listdir(tmp_path))
    print(f"{mid_write} of 12 kills landed mid-write")
    assert mid_write >= 3, "too few kills landed during a write"
