"""The trusted cache: file identity -> sha256 -> verdict, bound to the policy and trust roots.

A lookup is a dict access under a lock; disk I/O happens only in ``load`` and ``flush``,
which the daemon calls off the decision path. A cache file that is corrupt or foreign is
set aside and the cache starts empty: a bad file costs re-verification, never an allow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from agent import __version__
from agent import cache_wire as wire
from agent.decision import FileIdentity
from agent.verify.model import Verdict

_logger = logging.getLogger(__name__)

CACHE_FILE_NAME = "verdict-cache.msgpack"
DEFAULT_MAX_ENTRIES = 32768
DEFAULT_NEGATIVE_TTL_S = 30.0  # a .sig added beside a denied binary is seen within this
_KEEP_SET_ASIDE = 3  # corrupt files kept for inspection; older ones are removed

_Key = Tuple[int, int]  # (dev, ino): one entry per inode, so a hard link shares it


def binding_for(policy_digest: str, trust_digest: str, verifier: str = __version__) -> str:
    """The binding of verdicts produced under this policy, these trust roots and this agent.

    The agent version is part of it: an upgrade that fixes the verifier re-verifies all.
    """
    h = hashlib.sha256(b"execguard-cache-binding-v1")
    for part in (policy_digest.encode(), trust_digest.encode(), verifier.encode()):
        h.update(len(part).to_bytes(8, "big") + part)  # length-prefixed: no ambiguity
    return h.hexdigest()


def default_path(state_dir: str) -> str:
    return os.path.join(state_dir, CACHE_FILE_NAME)


def identity_from_stat(st: os.stat_result) -> FileIdentity:
    """The identity of an fstat() result (take it from the fd that is exec'd or hashed)."""
    return FileIdentity(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class CacheEntry:
    identity: FileIdentity
    sha256: str  # lowercase hex
    verdict: Verdict
    verified_at_ns: int  # CLOCK_REALTIME at store time (persisted, so wall clock)


@dataclass(frozen=True)
class CacheStats:
    entries: int
    hits: int
    misses: int
    digest_hits: int  # verdicts reused by content (a copy) after the caller hashed it
    stale: int  # an inode was found with another change stamp: modified since verified
    expired: int  # negative verdicts older than the TTL
    evictions: int
    corrupt_loads: int
    rebinds: int
    flushes: int
    flush_errors: int
    last_error: Optional[str]

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_json(self) -> Dict[str, Any]:
        """The ``cache`` object of ``execguard status --json``."""
        out: Dict[str, Any] = dataclasses.asdict(self)
        out["hit_rate"] = round(self.hit_rate, 4)
        return out


@dataclass(frozen=True)
class LoadReport:
    entries: int  # entries now in the cache
    dropped: int  # valid but not kept: other binding, expired, over capacity
    set_aside: Optional[str]  # where a corrupt or foreign file was moved
    warnings: Tuple[str, ...]


class TrustedCache:
    """Thread-safe verdict cache. Construct, ``load()`` once, ``flush()`` periodically."""

    def __init__(self, path: str, binding: str, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 negative_ttl_s: float = DEFAULT_NEGATIVE_TTL_S,
                 max_file_bytes: int = wire.MAX_FILE_BYTES,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not binding:
            raise ValueError("binding must not be empty")
        self.path = path
        self._binding = binding
        self._max_entries = max_entries
        self._negative_ttl_ns = int(negative_ttl_s * 1e9)
        self._max_file_bytes = max_file_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one writer at a time; never held by lookups
        self._entries: OrderedDict[_Key, CacheEntry] = OrderedDict()  # LRU: oldest first
        self._by_digest: Dict[str, Set[_Key]] = {}  # trusted entries only
        self._dirty = False
        self._n: Dict[str, int] = dict.fromkeys(
            ("hits", "misses", "digest_hits", "stale", "expired", "evictions",
             "corrupt_loads", "rebinds", "flushes", "flush_errors"), 0)
        self._last_error: Optional[str] = None

    @property
    def binding(self) -> str:
        return self._binding

    # -- the decision path: memory only -------------------------------------------------

    def lookup(self, identity: FileIdentity, binding: Optional[str] = None) -> Optional[CacheEntry]:
        """The entry for this exact identity under ``binding`` (default: the current one).

        Pass the identity from fstat() of the fd being exec'd: a changed ctime or size
        (write, truncate, chmod) misses, and a file renamed over the path is another inode.
        """
        key = (identity.dev, identity.ino)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and binding is not None and binding != self._binding:
                entry = None
            if entry is not None and entry.identity != identity:
                self._remove(key)  # modified since verified: the old verdict is worthless
                self._n["stale"] += 1
                entry = None
            if entry is not None and self._expired(entry):
                self._remove(key)
                self._n["expired"] += 1
                entry = None
            if entry is None:
                self._n["misses"] += 1
                return None
            self._entries.move_to_end(key)
            self._n["hits"] += 1
            return entry

    def lookup_digest(self, sha256: str, binding: Optional[str] = None) -> Optional[CacheEntry]:
        """A *trusted* entry for this content, once the caller has hashed the file itself.

        Only trusted verdicts are shared by content: a signature covers bytes wherever they
        are, but a denial may come from where the file was (no .sig beside that copy).
        """
        with self._lock:
            if binding is not None and binding != self._binding:
                return None
            for key in self._by_digest.get(sha256, ()):
                entry = self._entries[key]
                if entry.verdict.trusted:
                    self._n["digest_hits"] += 1
                    return entry
            return None

    def _expired(self, entry: CacheEntry) -> bool:
        if entry.verdict.trusted:
            return False
        age = self._clock() - entry.verified_at_ns
        return age < 0 or age >= self._negative_ttl_ns  # a clock step back expires too

    # -- mutation ------------------------------------------------------------------------

    def store(self, identity: FileIdentity, sha256: str, verdict: Verdict,
              binding: str) -> bool:
        """Record what the verifier found for the file with this identity.

        ``binding`` is the one the verdict was produced under; a verdict from before a
        policy reload is refused (returns False). Store only verifier output, never a
        timeout's default answer. The identity must be taken before the file was hashed.
        """
        wire.check_identity(identity)
        wire.check_sha256(sha256)
        wire.check_verdict(verdict)
        if not verdict.trusted and self._negative_ttl_ns <= 0:
            return False
        entry = CacheEntry(identity, sha256, verdict, self._clock())
        key = (identity.dev, identity.ino)
        with self._lock:
            if binding != self._binding:
                return False
            self._insert(key, entry)
            self._dirty = True
        return True

    def discard(self, identity: FileIdentity) -> bool:
        """Forget the inode (e.g. a .sig appeared beside it); True when something was held."""
        with self._lock:
            held = self._remove((identity.dev, identity.ino))
            self._dirty = self._dirty or held
            return held

    def rebind(self, binding: str) -> int:
        """Switch to a new policy/trust binding; every verdict held is dropped. Returns count."""
        if not binding:
            raise ValueError("binding must not be empty")
        with self._lock:
            if binding == self._binding:
                return 0
            dropped = len(self._entries)
            self._entries.clear()
            self._by_digest.clear()
            self._binding = binding
            self._n["rebinds"] += 1
            self._dirty = True
            return dropped

    def _insert(self, key: _Key, entry: CacheEntry) -> None:
        self._remove(key)
        self._entries[key] = entry
        if entry.verdict.trusted:
            self._by_digest.setdefault(entry.sha256, set()).add(key)
        while len(self._entries) > self._max_entries:
            self._remove(next(iter(self._entries)))
            self._n["evictions"] += 1

    def _remove(self, key: _Key) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        keys = self._by_digest.get(entry.sha256)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_digest[entry.sha256]
        return True

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(entries=len(self._entries), last_error=self._last_error,
                              **self._n)

    # -- persistence: called by the daemon, off the decision path --------------------------

    def load(self) -> LoadReport:
        """Replace the contents with the file's. Never raises for a bad file: it is set aside."""
        warnings: List[str] = []
        wire.remove_stray_tmp(self.path, warnings)
        set_aside: Optional[str] = None
        try:
            doc = wire.read_file(self.path, self._max_file_bytes)
        except FileNotFoundError:
            doc = None
        except wire.CorruptCache as exc:
            doc = None
            set_aside = wire.set_aside(self.path, _KEEP_SET_ASIDE, warnings)
            where = f"; moved to {set_aside}" if set_aside else ""
            warnings.append(f"{self.path}: {exc.problem}; starting with an empty cache{where}")
            with self._lock:
                self._n["corrupt_loads"] += 1
        except OSError as exc:
            doc = None
            warnings.append(f"{self.path}: cannot read ({exc.strerror or exc}); starting empty")
        dropped = 0
        with self._lock:
            evictions_before = self._n["evictions"]
            self._entries.clear()
            self._by_digest.clear()
            if doc is not None and doc.binding != self._binding:
                dropped = len(doc.entries)  # valid, but made under another policy or roots
            elif doc is not None:
                for ident, sha, verdict, at_ns in doc.entries:
                    entry = CacheEntry(ident, sha, verdict, at_ns)
                    if self._expired(entry):
                        dropped += 1
                        continue
                    self._insert((ident.dev, ident.ino), entry)
                dropped += self._n["evictions"] - evictions_before  # file held more
                self._n["evictions"] = evictions_before
            self._dirty = doc is not None and dropped > 0
            count = len(self._entries)
        for w in warnings:
            _logger.warning("%s", w)
        return LoadReport(count, dropped, set_aside, tuple(warnings))

    def flush(self) -> bool:
        """Write the cache atomically if it changed. Returns True when a file was written.

        I/O errors are counted and kept in ``stats().last_error``, never raised: a
        full disk costs persistence, not decisions.
        """
        with self._flush_lock:
            with self._lock:
                if not self._dirty:
                    return False
                held = list(self._entries.values())  # entries are immutable: copy refs only
                binding = self._binding
                self._dirty = False
            snapshot = [(e.identity, e.sha256, e.verdict, e.verified_at_ns) for e in held]
            try:
                wire.write_file(self.path, binding, snapshot, self._max_file_bytes)
            except (OSError, ValueError) as exc:
                msg = f"{self.path}: write failed: {getattr(exc, 'strerror', None) or exc}"
                _logger.warning("%s", msg)
                with self._lock:
                    self._dirty = True
                    self._n["flush_errors"] += 1
                    self._last_error = msg
                return False
            with self._lock:
                self._n["flushes"] += 1
            return True
