"""One exec in, one Decision out: scope → trusted cache → verifier → policy.

The decider works on the file descriptor the sensor handed over (the fanotify event fd, or
a file the agent opened itself), never on a path re-opened later. It never raises: an
unreadable file is an untrusted verdict, so enforcement fails closed inside the scope.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Optional

from agent.cache import TrustedCache, binding_for, identity_from_stat
from agent.decision import Decision, Enforcement, ExecEvent, Source
from agent.digest import Artifact
from agent.errors import InputError, Reason
from agent.metrics.tally import HistogramSnapshot, LatencyHistogram
from agent.policy import (
    Mode,
    PolicySnapshot,
    PolicyStore,
    Subject,
    decide,
    subject_of,
    trust_digest,
)
from agent.policy.globs import Glob
from agent.verify import verify_artifact
from agent.verify.discovery import SUFFIXES
from agent.verify.model import TrustConfig, Verdict
from agent.writers import has_writers

EVERYWHERE = Glob.compile("/")  # the scope a placed file is judged in, whatever its path
SETTLE_NS = 20_000_000  # a file changed more recently is verified again at its next exec


@dataclass
class DecisionStats:
    """Counters for ``execguard status``; updated under the decider's lock."""

    by_outcome: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    latencies_us: Deque[int] = field(default_factory=lambda: deque(maxlen=4096))
    errors: int = 0
    # cumulative-bucket histograms for Prometheus (agent/metrics): whole decisions, and the
    # verifications a cache miss (or pre-warming) ran
    decision_hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    verify_hist: LatencyHistogram = field(default_factory=LatencyHistogram)

    def to_json(self) -> Dict[str, Any]:
        lat = sorted(self.latencies_us)

        def pct(p: float) -> Optional[int]:
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

        return {"decisions": dict(self.by_outcome), "errors": self.errors,
                "latency_us": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                               "max": lat[-1] if lat else None, "samples": len(lat)}}


def _signature_since(path: str, sha256_hex: str, trust: TrustConfig, since_ns: int) -> bool:
    """A signature appeared or changed after a denial was cached: the denial is stale.

    Deploy tools often write the binary first and rename its signature in after, which no
    close-after-write event reports; this check costs a few stat() calls per cached denial.
    """
    places = [path + s for s in SUFFIXES]
    places += [os.path.join(d, sha256_hex + s) for d in trust.store_dirs for s in SUFFIXES]
    for place in places:
        try:
            if os.lstat(place).st_ctime_ns >= since_ns:
                return True
        except OSError:
            continue
    return False


def _go_summary(subject: Subject) -> Optional[Dict[str, Any]]:
    """The decision record's ``go`` object: how Go-ness was established (``evidence``:
    ``build-info``, ``runtime`` or ``malformed``) and what is known about the build."""
    if not subject.go:
        return None
    info = subject.buildinfo
    if info is None:
        evidence = subject.go_evidence or "malformed"
        out: Dict[str, Any] = {"evidence": evidence, "go_version": None, "path": None}
        if evidence != "runtime":  # the only marker records had before "evidence"
            out["malformed"] = True
        if subject.go_detail:
            out["detail"] = subject.go_detail
        if subject.go_runtime:
            out["runtime"] = subject.go_runtime
        return out
    main = info.main
    out = {"evidence": "build-info", "go_version": info.go_version, "path": info.path,
           "module": main.path if main else None, "version": main.version if main else None,
           "vcs.modified": info.setting("vcs.modified")}
    if info.no_module_info:  # a GOPATH build, or module info Go would drop (predicates.py)
        out["no_module_info"] = info.no_module_info
    return out


class Decider:
    """Shared by every backend and the pre-warm worker; thread-safe."""

    def __init__(self, store: PolicyStore, cache: TrustedCache) -> None:
        self.store = store
        self.cache = cache
        self.stats = DecisionStats()
        self._lock = threading.Lock()

    def verify_into_cache(self, artifact: Artifact, trust: TrustConfig,
                          snapshot: PolicySnapshot, cache_negative: bool = True,
                          use_cache: bool = True) -> tuple[Verdict, bool]:
        """The verdict for ``artifact`` under ``trust``; (verdict, was_cache_hit).

        The cache holds verdicts under the policy's own trust only. A rule that narrows or
        extends it (its own signers, module pins) is verified afresh, never from the cache.
        ``use_cache`` False: hash and verify even when the identity is cached (the caller
        knows the bytes may have changed under the same stamp); the result is cached.
        """
        if trust_digest(trust) != snapshot.trust_digest:
            return self._timed_verify(artifact, trust), False
        binding = binding_for(snapshot.verdict_digest, snapshot.trust_digest)
        if self.cache.binding != binding:
            self.cache.rebind(binding)  # a policy reload: stale verdicts are re-verified
        identity = identity_from_stat(os.fstat(artifact.fd))
        entry = self.cache.lookup(identity, binding) if use_cache else None
        if entry is not None and (entry.verdict.trusted or not _signature_since(
                artifact.path, entry.sha256, trust, entry.verified_at_ns)):
            artifact.known_digest("sha256", bytes.fromhex(entry.sha256))
            return entry.verdict, True
        # a file open for write may change without a new stamp (a writable shared mapping):
        # its verdict is used for this decision only (agent/writers.py)
        writers = has_writers(artifact.fd)
        verdict = self._timed_verify(artifact, trust)
        # a file changed while it was verified is not cached either, nor one changed within
        # the last clock tick or so: a second write in the same tick (ctime is as coarse as
        # the kernel's clock tick, 4 ms at HZ=250) would keep the stamp of these bytes
        settled = identity.ctime_ns < time.time_ns() - SETTLE_NS
        if (verdict.trusted or cache_negative) and not writers and settled and \
                identity_from_stat(os.fstat(artifact.fd)) == identity:
            self.cache.store(identity, artifact.sha256.hex(), verdict, binding)
        return verdict, False

    def _timed_verify(self, artifact: Artifact, trust: TrustConfig) -> Verdict:
        started = time.monotonic_ns()
        try:
            return verify_artifact(artifact, trust)
        finally:
            elapsed = (time.monotonic_ns() - started) // 1000
            with self._lock:
                self.stats.verify_hist.observe(elapsed)

    def histograms(self) -> Dict[str, HistogramSnapshot]:
        """Consistent copies of the latency histograms (``decision``, ``verify``)."""
        with self._lock:
            return {"decision": self.stats.decision_hist.snapshot(),
                    "verify": self.stats.verify_hist.snapshot()}

    def decide(self, event: ExecEvent, fd: int, deny_enforcement: Enforcement,
               in_scope: Optional[bool] = None, rehash: bool = False) -> Decision:
        """Decide the exec of ``event`` whose file is open as ``fd`` (not closed here).
        ``in_scope``: the caller placed the file itself (agent/scope: a file reached through
        another namespace's mount, or without a name, is in scope whatever its path says);
        None: by ``event.path``. ``rehash``: trust no cache keyed by the file's identity
        (the kernel dropped its verdict: someone opened it for write, and a write through a
        shared mapping can change the bytes without changing the stamp)."""
        started = time.monotonic_ns()
        snapshot = self.store.current.snapshot
        common: Dict[str, Any] = {"policy_version": snapshot.version,
                                  "policy_digest": snapshot.digest}
        if not (snapshot.in_scope(event.path) if in_scope is None else in_scope):
            return self._finish(Decision(event, True, Reason.OK, "outside every scope",
                                         Enforcement.NONE, Source.DEFAULT, **common), started)
        rules = snapshot
        if in_scope and not snapshot.in_scope(event.rules_path or event.path):
            # placed in scope by the caller while the path its rules see is outside every
            # scope glob (a detached or foreign mount, no name, a path another namespace
            # chose): the policy's own scope check would allow it unjudged, and that allow
            # would reach the kernel for the file's inode.
            rules = dataclasses.replace(snapshot, scopes=(EVERYWHERE,))
        artifact = Artifact(event.path, fd, event.identity.size, event.identity.dev,
                            event.identity.ino, event.identity.ctime_ns, 0)
        hit = {"value": False}

        def verify_fn(trust: TrustConfig) -> Verdict:
            verdict, hit["value"] = self.verify_into_cache(artifact, trust, snapshot,
                                                           use_cache=not rehash)
            return verdict

        try:
            st = os.fstat(fd)
            artifact.size = st.st_size  # the fd's own size, not the sensor's copy
            if st.st_size > snapshot.limits.max_file_bytes:
                raise InputError(event.path, f"{st.st_size} bytes is over the policy's "
                                 f"max_file_bytes ({snapshot.limits.max_file_bytes})")
            subject = subject_of(artifact, event.uid, event.rules_path or event.path,
                                 event.gid, fresh=rehash)
            outcome = decide(rules, subject, verify_fn)
        except (InputError, OSError) as exc:
            allow = snapshot.mode is Mode.MONITOR
            enforcement = Enforcement.MONITOR if allow else deny_enforcement
            with self._lock:
                self.stats.errors += 1
            return self._finish(Decision(event, allow, Reason.VERIFY_FAILED,
                                         f"cannot read the file: {exc}", enforcement,
                                         Source.VERIFY, **common), started)
        if outcome.allow:
            enforcement = Enforcement.NONE
        elif outcome.mode is Mode.MONITOR:  # the deciding rule's mode (a monitor rule)
            enforcement = Enforcement.MONITOR
        else:
            enforcement = deny_enforcement
        source = Source.CACHE if hit["value"] and outcome.source is Source.VERIFY \
            else outcome.source
        verdict = outcome.verdict
        return self._finish(Decision(
            event, outcome.allow, outcome.reason, outcome.detail, enforcement, source,
            sha256=artifact.sha256.hex() if verdict is not None else None,
            evidence=verdict.evidence if verdict is not None else None,
            rule_id=outcome.rule_id, go=_go_summary(subject), **common), started)

    def _finish(self, decision: Decision, started_ns: int) -> Decision:
        latency = (time.monotonic_ns() - started_ns) // 1000
        with self._lock:
            key = "allow" if decision.allow else (
                "would-deny" if decision.enforcement is Enforcement.MONITOR else "deny")
            self.stats.by_outcome[key] += 1
            self.stats.latencies_us.append(latency)
            self.stats.decision_hist.observe(latency)
        return Decision(**{**decision.__dict__, "latency_us": latency})
