"""`execguard run --metrics-listen/--metrics-textfile` on the real agent: fanotify-exec in
enforce mode on a tmpfs the test owns, real signed Go binaries. The exposition is read with
prometheus_client's own text parser and checked against the decision log."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.control import request
from tests.agent_fixtures import REPO, RunningAgent, exec_file, running_agent, scoped_tmpfs
from tests.policy_bundle_fixtures import make_bundle, root_keys, write_policy
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(240)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def material(material_fixture: Material) -> Material:  # noqa: F811
    return material_fixture


def parse(text: str) -> List[Sample]:
    families = text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    return [s for fam in families for s in fam.samples]


def one(samples: List[Sample], name: str, **labels: str) -> Optional[float]:
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, f"{name} {labels}: {found}"
    return found[0] if found else None


def port_of(agent: RunningAgent) -> int:
    info = request(agent.socket, "metrics", timeout=5)
    assert info["listen"] is not None, info
    host, _, port = info["listen"]["listen"].rpartition(":")
    assert host == "127.0.0.1"
    return int(port)


def scrape(port: int) -> List[Sample]:
    with _NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(resp.read().decode())


def decisions_by_label(samples: List[Sample]) -> Dict[Tuple[str, str, str, str], float]:
    return {(s.labels["verdict"], s.labels["reason"], s.labels["enforcement"],
             s.labels["backend"]): s.value
            for s in samples if s.name == "execguard_decisions_total"}


def log_by_label(agent: RunningAgent) -> Dict[Tuple[str, str, str, str], float]:
    return dict(Counter((d["decision"], d["reason"], d["enforcement"], d["event"]["backend"])
                        for d in agent.decisions()))


def settle(agent: RunningAgent, port: int, timeout: float = 15.0) -> List[Sample]:
    """Scrape until the metrics and the (asynchronously written) log agree; both counted."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if decisions_by_label(samples) == log_by_label(agent) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def histogram(samples: List[Sample], name: str) -> Tuple[List[Tuple[float, float]], float]:
    buckets = sorted((float(s.labels["le"]), s.value) for s in samples
                     if s.name == f"{name}_bucket")
    count = one(samples, f"{name}_count")
    assert count is not None
    return buckets, count


def other_addresses() -> List[str]:
    """Every address of this host but 127.0.0.1: the listener must refuse them all."""
    found = ["127.0.0.2"]  # loopback too, but not the address bound
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True,
                         timeout=10).stdout
    for link in json.loads(out):
        for addr in link.get("addr_info", []):
            if addr.get("scope") == "global":
                found.append(addr["local"])
    return found


def test_metrics_match_the_decision_log(tmp_path: Path, material: Material) -> None:
    textfile = tmp_path / "textfile" / "execguard.prom"
    textfile.parent.mkdir()
    with scoped_tmpfs() as scope:
        signed = copy_signed(material.bins["app"], scope / "ok", material.private["a"])
        unsigned = copy_signed(material.bins["app"], scope / "bad", None)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "fanotify-exec",
                           "--audit", "off", "--metrics-listen", "127.0.0.1:0",
                           "--metrics-textfile", str(textfile), "--metrics-interval", "1"
                           ) as agent:
            port = port_of(agent)
            status = agent.status()
            assert status["metrics"] == {"listen": f"127.0.0.1:{port}", "listen_error": None,
                                         "textfile": str(textfile)}
            assert exec_file(signed).returncode == 0
            assert exec_file(unsigned).returncode == 126
            agent.wait_decision(str(unsigned))
            before = settle(agent, port)
            hits0 = one(before, "execguard_cache_hits_total")
            misses0 = one(before, "execguard_cache_misses_total")
            assert hits0 is not None and misses0 is not None

            # the same denied file again: the cached verdict answers
            assert exec_file(unsigned).returncode == 126
            agent.wait_decision(str(unsigned), 2)
            with open(signed, "ab") as fh:  # tampered: verified again, denied
                fh.write(b"\0")
            assert exec_file(signed).returncode == 126
            agent.wait_decision(str(signed), 2)
            after = settle(agent, port)

            # counts by verdict, reason, enforcement and backend are the decision log's
            logged = log_by_label(agent)
            assert decisions_by_label(after) == logged
            assert logged[("deny", "no-signature", "fanotify-deny", "fanotify-exec")] == 2
            assert logged[("deny", "bad-signature", "fanotify-deny", "fanotify-exec")] == 1
            assert logged[("allow", "ok", "none", "fanotify-exec")] == 1

            # every fanotify decision went through the decider, one observation each, but
            # the allows the loop answered from memory (the signed file was pre-verified)
            buckets, count = histogram(after, "execguard_decision_duration_seconds")
            from_memory = agent.status()["sensor"]["cached"]
            assert sum(logged.values()) == 4 and from_memory <= 1
            assert count == sum(logged.values()) - from_memory
            assert buckets[-1] == (float("inf"), count)
            assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), buckets
            vbuckets, vcount = histogram(after, "execguard_verification_duration_seconds")
            assert vcount >= 2 and vbuckets[-1] == (float("inf"), vcount)  # 1st deny, tamper
            assert all(a[1] <= b[1] for a, b in zip(vbuckets, vbuckets[1:])), vbuckets

            # the repeated exec was a hit: the hit ratio moved up
            hits1 = one(after, "execguard_cache_hits_total")
            misses1 = one(after, "execguard_cache_misses_total")
            assert hits1 is not None and misses1 is not None
            assert hits1 >= hits0 + 1
            assert hits1 / (hits1 + misses1) > hits0 / (hits0 + misses0)

            # the agent, its backend and policy
            assert one(after, "execguard_up") == 1
            assert one(after, "execguard_agent_state", state="ready") == 1
            assert one(after, "execguard_backend_info", backend="fanotify-exec",
                       enforcement="fanotify-deny") == 1
            assert one(after, "execguard_policy_info", digest=status["policy"]["digest"],
                       mode="enforce") == 1
            assert one(after, "execguard_sensor_lost_events_total", backend="fanotify-exec",
                       cause="observer-backlog") == 0
            assert one(after, "execguard_console_dropped_total") is not None
            started = one(after, "execguard_start_time_seconds")
            assert started is not None and abs(started - (time.time() - status["uptime_s"])) < 60

            # the textfile carries the same numbers once its next write is done
            deadline = time.monotonic() + 10
            while True:
                written = parse(textfile.read_text())
                if decisions_by_label(written) == logged or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert decisions_by_label(written) == logged
            assert one(written, "execguard_up") == 1

            # bound to 127.0.0.1 only: every other address of the host refuses the port
            for address in other_addresses():
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((address, port), timeout=5).close()
        # stopped cleanly: the last textfile says so, and the port is closed
        final = parse(textfile.read_text())
        assert one(final, "execguard_up") == 0
        assert decisions_by_label(final) == logged
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert sorted(p.name for p in textfile.parent.iterdir()) == ["execguard.prom"]


def test_textfile_is_replaced_atomically(tmp_path: Path, material: Material) -> None:
    textfile = tmp_path / "tf" / "execguard.prom"
    textfile.parent.mkdir()
    stop = threading.Event()
    inodes: set[int] = set()
    reads: List[int] = []
    problems: List[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                with open(textfile, "rb") as fh:
                    inode = os.fstat(fh.fileno()).st_ino
                    data = fh.read()
            except FileNotFoundError:
                time.sleep(0.01)
                continue
            try:
                samples = parse(data.decode())
            except Exception as exc:  # the parser refuses a torn file
                problems.append(f"unparsable: {exc!r}: {data[-120:]!r}")
                continue
            names = {s.name for s in samples}
            # first and last families the agent writes: a truncated file lacks the last
            if "execguard_up" not in names or "execguard_process_start_time_seconds" not in names:
                problems.append(f"incomplete file: {data[-120:]!r}")
            inodes.add(inode)
            reads.append(len(data))
            time.sleep(0.002)

    with scoped_tmpfs() as scope:
        unsigned = copy_signed(material.bins["app"], scope, None)
        with running_agent(tmp_path, "--mode", "monitor", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "fanotify-exec",
                           "--audit", "off", "--metrics-textfile", str(textfile),
                           "--metrics-interval", "1") as agent:
            threads = [threading.Thread(target=reader) for _ in range(2)]
            for t in threads:
                t.start()
            try:
                deadline = time.monotonic() + 20
                while len(inodes) < 4 and time.monotonic() < deadline:
                    exec_file(unsigned)  # keep the numbers moving between writes
                    time.sleep(0.2)
            finally:
                stop.set()
                for t in threads:
                    t.join(10)
            info = request(agent.socket, "metrics", timeout=5)
            assert info["listen"] is None and info["textfile"]["errors"] == 0
            assert info["textfile"]["writes"] >= 4
    assert not problems, problems[:3]
    assert len(inodes) >= 4 and len(reads) > 20  # readers overlapped several replacements


def exec_times(path: Path, n: int) -> List[float]:
    out = []
    for _ in range(n):
        started = time.monotonic()
        assert exec_file(path, timeout=10).returncode == 126
        out.append(time.monotonic() - started)
    return out


def test_stalled_scrapers_do_not_delay_execs(tmp_path: Path, material: Material) -> None:
    with scoped_tmpfs() as scope:
        unsigned = copy_signed(material.bins["app"], scope, None)
        with running_agent(tmp_path, "--mode", "enforce", "--scope", str(scope), "--key",
                           str(material.keys["a"]), "--backend", "fanotify-exec",
                           "--audit", "off", "--metrics-listen", "127.0.0.1:0",
                           "--quiet") as agent:
            port = port_of(agent)
            exec_times(unsigned, 3)  # verified once, then answered from the cache
            baseline = exec_times(unsigned, 15)

            stalled: List[socket.socket] = []
            stop = threading.Event()

            def hammer() -> None:  # a scraper in a tight loop, on top of the stalled ones
                while not stop.is_set():
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                            while s.recv(65536):
                                pass
                    except OSError:
                        pass
            try:
                for _ in range(3):  # send a request, never read the answer
                    s = socket.socket()
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                    s.connect(("127.0.0.1", port))
                    s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                    stalled.append(s)
                for _ in range(4):  # connect, never send a byte: every slot taken
                    stalled.append(socket.create_connection(("127.0.0.1", port)))
                hammering = threading.Thread(target=hammer, daemon=True)
                hammering.start()
                time.sleep(0.3)
                during = exec_times(unsigned, 15)
                listener = request(agent.socket, "metrics", timeout=5)["listen"]
            finally:
                stop.set()
                for s in stalled:
                    s.close()
            print(f"exec s: baseline median {statistics.median(baseline):.4f} max "
                  f"{max(baseline):.4f}; stalled median {statistics.median(during):.4f} max "
                  f"{max(during):.4f}; listener {listener}")
            # the listener was saturated (slots full, extra clients turned away) ...
            assert listener["rejected_busy"] > 0, listener
            # ... and the execs did not notice: no exec near the decision deadline, and the
            # typical one no slower than before beyond scheduling noise on a shared CPU
            assert max(during) < 1.0, during
            assert statistics.median(during) < statistics.median(baseline) * 3 + 0.05, \
                (baseline, during)
            late = [d["latency_us"] for d in agent.decisions()[-15:]]
            assert all(us < 500_000 for us in late), late
            # after the stalled clients are gone it answers again
            deadline = time.monotonic() + 15
            while True:
                try:
                    assert one(scrape(port), "execguard_up") == 1
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60, cwd=str(REPO))
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def test_bundle_expiry_and_break_glass_are_exported(tmp_path: Path,
                                                    material: Material) -> None:
    """The gauges follow the real features: a signed bundle applied over the control
    socket (docs/bundles.md) and a real break-glass token (docs/breakglass.md)."""
    keys = root_keys(tmp_path / "root")
    r = keys.private
    bg_keys = tmp_path / "bg-keys"
    bg_keys.mkdir()
    cli("keygen", "--output-prefix", str(bg_keys / "ops"), "--no-password")
    issued = datetime.now(timezone.utc).replace(microsecond=0)
    with scoped_tmpfs() as scope:
        v1 = make_bundle(tmp_path / "v1.bundle",
                         write_policy(tmp_path / "v1.toml", 1, scope, material.keys["a"]),
                         [r["r1"]], issued_at=issued, lifetime=timedelta(days=30))
        v2 = make_bundle(tmp_path / "v2.bundle",
                         write_policy(tmp_path / "v2.toml", 2, scope, material.keys["a"]),
                         [r["r2"]], issued_at=issued, lifetime=timedelta(days=2))
        (tmp_path / "drop").mkdir()
        with running_agent(tmp_path, "--policy", str(v1), "--backend", "fanotify-exec",
                           "--audit", "off", "--policy-keys", str(keys.pinned_dir),
                           "--policy-drop-dir", str(tmp_path / "drop"),
                           "--breakglass-keys", str(bg_keys),
                           "--metrics-listen", "127.0.0.1:0") as agent:
            port = port_of(agent)
            first = scrape(port)
            assert one(first, "execguard_policy_version") == 1
            assert one(first, "execguard_policy_expiry_timestamp_seconds") == \
                (issued + timedelta(days=30)).timestamp()
            assert one(first, "execguard_break_glass_active") == 0
            loaded = one(first, "execguard_policy_loaded_timestamp_seconds")
            assert loaded is not None

            cli("policy", "apply", str(v2), "--state-dir", str(agent.state_dir), "--json")
            time.sleep(0.6)  # past the listener's render reuse
            second = scrape(port)
            assert one(second, "execguard_policy_version") == 2
            assert one(second, "execguard_policy_expiry_timestamp_seconds") == \
                (issued + timedelta(days=2)).timestamp()
            moved = one(second, "execguard_policy_loaded_timestamp_seconds")
            assert moved is not None and moved > loaded

            host = cli("breakglass", "host-id").stdout.strip()
            token = tmp_path / "bg.tok"
            cli("breakglass", "issue", "--host", host, "--seconds", "600", "--reason",
                "metrics test", "--key", str(bg_keys / "ops.key"), "-o", str(token))
            cli("breakglass", "apply", str(token), "--state-dir", str(agent.state_dir))
            not_after = agent.status()["breakglass"]["not_after"]
            time.sleep(0.6)
            during = scrape(port)
            assert one(during, "execguard_break_glass_active") == 1
            assert one(during, "execguard_break_glass_expiry_timestamp_seconds") == \
                datetime.strptime(not_after, "%Y-%m-%dT%H:%M:%SZ").replace(
                    tzinfo=timezone.utc).timestamp()
            assert one(during, "execguard_policy_info", version="2", mode="monitor") == 1

            cli("breakglass", "end", "--state-dir", str(agent.state_dir))
            time.sleep(0.6)
            after = scrape(port)
            assert one(after, "execguard_break_glass_active") == 0
            assert one(after, "execguard_break_glass_expiry_timestamp_seconds") is None
            assert one(after, "execguard_policy_info", version="2", mode="enforce") == 1


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "run", *args], capture_output=True,
                          text=True, timeout=60, cwd=str(REPO))


def test_bad_metrics_flags_are_refused_before_anything_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for args, why in ((("--metrics-listen", "0.0.0.0:9464"), "not a loopback address"),
                      (("--metrics-listen", "192.0.2.2:9464"), "--metrics-allow-remote"),
                      (("--metrics-listen", "host:9464"), "not an IP address"),
                      (("--metrics-textfile", str(tmp_path / "x.txt")), "must end in .prom")):
        ran = run_agent("--state-dir", str(state), "--log-dir", str(tmp_path / "log"),
                        "--audit", "off", *args)
        assert ran.returncode == 2, ran
        assert why in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
        assert not (state / "control.sock").exists()
    helped = run_agent("--help")
    assert "--metrics-listen" in helped.stdout and "--metrics-textfile" in helped.stdout
