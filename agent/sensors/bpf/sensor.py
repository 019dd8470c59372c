"""One base for the BCC sensors (kill, bpf-lsm, fmod-ret): load, ring, maps, scope, mode.

Every program shares exec_verdict.h's maps: the verdict map, the filesystem classes and
scope directories (``KernelScope`` writes them, agent/backends/kernel_scope.py), the dynamic
loaders, the exempt agent, the run-time state and the knobs. A subclass names its program
(``source``), how its fields are read (``load``), the offsets it needs (``offsets_fn``), how
the hooks BCC does not attach itself (``tracing_hooks``), what a record becomes
(``_wrap``) and what its counters mean (``stats``). Nothing else is per backend, so a new
map or knob lives here. The program is compiled and loaded in a loader process
(agent/sensors/bpf/loader.py): this process holds descriptors, never BCC.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import dataclass
from typing import (
    Any,
    ClassVar,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    TypeVar,
)

from agent.decision import FileIdentity
from agent.sensors.bpf.build import (
    LOAD_DIRECT,
    OffsetsFn,
    SensorConfig,
    build_cflags,
    explain,
    header_warnings,
    program_text,
    realtime_offset,
)
from agent.sensors.bpf.loader import LoadFailed
from agent.sensors.bpf.loader import load as load_program
from agent.sensors.decode import ExecRecord, RecordDecoder, st_dev_to_kernel_dev
from agent.sensors.errors import SensorMapError, SensorUnavailable

S = TypeVar("S", bound="BpfSensor")
VERDICT_ALLOW, VERDICT_DENY = 1, 2  # EG_VERDICT_* in events.h
# EG_LSM_CFG_* in exec_verdict.h (the kill backend's EG_CFG_KILL is the same bit as
# ENFORCE: "act on a denial", by EPERM or by SIGKILL)
CFG_ENFORCE, CFG_DENY_UNKNOWN, CFG_LOADER, CFG_MAPS = 0x01, 0x02, 0x04, 0x08
CFG_PATHS, CFG_MOUNTS, CFG_PTRACE, CFG_UNSEEN_OUT = 0x10, 0x20, 0x40, 0x80
CFG_STRICT_MAPS = 0x100
CFG_PROTECT, CFG_BPF_LOAD = 0x200, 0x400  # self-protection (bpf-lsm only)
SB_IN = 2  # EG_SB_IN (agent.scope.FsClass.IN)
SB_CLASS_MASK = 0xFF
SB_DYNAMIC = 0x100  # EG_SB_DYNAMIC: the filesystem appeared after the agent started
# stats[] of exec_verdict.h (EG_LSM_STAT_*), in index order
VERDICT_STAT_NAMES = ("execs", "drops", "denied", "invalidated", "in_scope", "maps",
                      "maps_denied", "loader_denied", "mounts_refused", "ptrace_refused",
                      "epochs", "orphan_denied", "tamper")


@dataclass(frozen=True)
class Guards:
    """The kernel switches beyond the exec verdict (exec_verdict.h EG_LSM_CFG_*)."""

    loader: bool = False  # deny a dynamic loader run as a program
    maps: bool = False  # judge PROT_EXEC mappings of files in scope
    paths: bool = False  # verdicts depend on paths: a rename or link drops them
    mounts: bool = False  # refuse mounts onto paths in scope
    ptrace: bool = False  # refuse ptrace attach to programs in scope
    unseen_out: bool = False  # filesystems without a class are out of scope
    strict_maps: bool = False  # the whole scope is verified: no mapping without a verdict

    def flags(self) -> int:
        return ((CFG_LOADER if self.loader else 0) | (CFG_MAPS if self.maps else 0)
                | (CFG_PATHS if self.paths else 0) | (CFG_MOUNTS if self.mounts else 0)
                | (CFG_PTRACE if self.ptrace else 0)
                | (CFG_UNSEEN_OUT if self.unseen_out else 0)
                | (CFG_STRICT_MAPS if self.strict_maps else 0))


class BpfSensor:
    """A BCC program that judges files from the shared maps. Loaded and attached on
    construction with every knob off (it denies nothing until ``set_mode``); ``close()``
    detaches it, and the kernel then denies nothing (fail-open, decision 6)."""

    backend: ClassVar[str]
    source: ClassVar[str]
    offsets_fn: OffsetsFn  # a staticmethod in each subclass
    load: ClassVar[str] = LOAD_DIRECT  # how exec_verdict.h reads kernel fields
    # programs BCC does not attach itself (fmod_ret), loaded as tracing and attached by name
    tracing_hooks: ClassVar[Tuple[bytes, ...]] = ()
    default_config: ClassVar[SensorConfig] = SensorConfig()
    # the guards before anyone configures the sensor
    initial_guards: ClassVar[Guards] = Guards()
    btf_hint: ClassVar[Optional[str]] = None  # for a sensor without BTF
    refused_hint: ClassVar[Optional[str]] = None  # root, yet the kernel refused the program

    def __init__(self, config: Optional[SensorConfig] = None,
                 offsets: Optional[Dict[str, int]] = None) -> None:
        self.config = config if config is not None else self.default_config
        self._bpf: Any = None  # agent/sensors/bpf/loader.py Loaded
        self._check_host()
        self.cflags = build_cflags(self.config, self.backend, type(self).offsets_fn,
                                   offsets=offsets, btf_hint=self.btf_hint)
        self.cflags += self._extra_cflags()
        self._records: List[Any] = []
        self._classes_now: Dict[int, int] = {}  # st_dev -> EG_SB_* value as written
        self._mode = (False, False)
        self._guards = self.initial_guards
        self._protect_flags = 0  # CFG_PROTECT | CFG_BPF_LOAD while self-protected (bpf-lsm)
        self._decoder = RecordDecoder(realtime_offset(), backend=self.backend)
        self.warnings = header_warnings(self.backend)
        try:
            # compiled and loaded in a process of its own: the agent never holds BCC and
            # LLVM (agent/sensors/bpf/loader.py)
            text = program_text(self.source, self.backend, self.load).encode()
            self._bpf = load_program(text, self.cflags, list(self.tracing_hooks))
        except LoadFailed as exc:
            if exc.kind == "import":
                raise SensorUnavailable(self.backend, str(exc),
                                        "install python3-bpfcc (scripts/setup.sh)") from exc
            cause, hint = explain(exc, exc.log)
            if self.refused_hint and os.geteuid() == 0 and (
                    "privileges" in cause or "not permitted" in cause):
                cause = (f"the kernel refused the {self.backend} program although we run as "
                         f"root ({cause[:200]})")
                hint = self.refused_hint
            raise SensorUnavailable(self.backend, cause, hint) from exc
        try:
            self._bpf.open_ring_buffer(b"events", self._on_ring)
            self._verdicts = self._bpf[b"verdicts"]
            self._classes = self._bpf[b"sb_class"]
            self._scope_dirs = self._bpf[b"scope_dirs"]
            self._loaders = self._bpf[b"loaders"]
            self._exempt = self._bpf[b"exempt"]
            self._runtime = self._bpf[b"runtime"]
            self._config = self._bpf[b"config"]
            self._open_maps()
            self.set_mode(enforce=False, deny_unknown=False)
            self.set_fresh_after(time.clock_gettime_ns(time.CLOCK_REALTIME))
        except Exception as exc:
            self.close()
            raise SensorUnavailable(self.backend, f"ring buffer or maps: {exc}") from exc

    # -- per backend -------------------------------------------------------------------------

    def _check_host(self) -> None:
        """Refuse early, with the reason, on a host where the program cannot work."""

    def _extra_cflags(self) -> List[str]:
        """Switches of this program for this host (after the knobs and offsets)."""
        return []

    def _open_maps(self) -> None:
        """The subclass's own maps, after the shared ones."""

    def _wrap(self, raw: bytes, rec: ExecRecord) -> Any:
        """What ``poll`` returns for one decoded record."""
        return rec

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        bpf = getattr(self, "_bpf", None)
        if bpf is not None:
            self._bpf = None
            bpf.close()

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- records -----------------------------------------------------------------------------

    def _on_ring(self, raw: bytes) -> None:
        try:
            rec = self._decoder.decode(raw)
            if rec is not None:
                self._records.append(self._wrap(raw, rec))
        except Exception:  # the decoder counts bad records; one never stops the drain
            self._decoder.stats.short += 1

    def poll(self, timeout_ms: int) -> List[Any]:
        """Wait up to ``timeout_ms`` for a wake-up, then drain every record (cache hits are
        submitted without a wake-up, so call this at least every ~100 ms)."""
        if self._bpf is None:
            raise SensorUnavailable(self.backend, "sensor is closed")
        self._decoder.realtime_offset_ns = realtime_offset()
        self._bpf.ring_buffer_poll(int(timeout_ms))
        self._bpf.ring_buffer_consume()
        out, self._records = self._records, []
        return out

    # -- verdicts ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _map_op(self, operation: str) -> Iterator[None]:
        if self._bpf is None:
            raise SensorMapError(self.backend, operation, "sensor is closed")
        try:
            yield
        except KeyError:
            raise
        except Exception as exc:  # BCC: E2BIG when full, EBADF when closed
            raise SensorMapError(self.backend, operation, str(exc)) from exc

    def _key(self, identity: FileIdentity) -> Any:
        return self._verdicts.Key(ino=identity.ino, dev=st_dev_to_kernel_dev(identity.dev))

    def set_verdict(self, identity: FileIdentity, allow: bool) -> None:
        """A verdict for this exact file version (dev, ino, ctime ns, size), written in the
        current rename epoch. The mtime goes with it: after a rename or a link the BPF LSM
        programs compare it instead of the ctime."""
        leaf = self._verdicts.Leaf(ctime_ns=identity.ctime_ns, size=identity.size,
                                   verdict=VERDICT_ALLOW if allow else VERDICT_DENY,
                                   epoch=self.epoch(), mtime_ns=identity.mtime_ns, flags=0)
        with self._map_op("set_verdict"):
            self._verdicts[self._key(identity)] = leaf

    def insert_verdict(self, identity: FileIdentity, allow: bool) -> bool:
        """``set_verdict`` only where the file has no entry yet (BPF_NOEXIST); False when one
        was there (it stays)."""
        leaf = self._verdicts.Leaf(ctime_ns=identity.ctime_ns, size=identity.size,
                                   verdict=VERDICT_ALLOW if allow else VERDICT_DENY,
                                   epoch=self.epoch(), mtime_ns=identity.mtime_ns, flags=0)
        key = self._key(identity)
        with self._map_op("insert_verdict"):
            return bool(self._verdicts.insert(key, leaf))

    def verdict(self, identity: FileIdentity) -> Optional[bool]:
        """The map's verdict for this exact version: True/False, None when absent or stale."""
        with self._map_op("verdict"):
            try:
                leaf = self._verdicts[self._key(identity)]
            except KeyError:
                return None
        if (leaf.ctime_ns, leaf.size) != (identity.ctime_ns, identity.size) \
                or leaf.epoch != self.epoch():
            return None
        return bool(leaf.verdict == VERDICT_ALLOW)

    def forget(self, identity: FileIdentity) -> None:
        """Drop the verdict for (dev, ino); a missing entry is not an error."""
        with self._map_op("forget"), contextlib.suppress(KeyError):
            del self._verdicts[self._key(identity)]

    def clear_verdicts(self, dev: Optional[int] = None) -> int:
        """Drop every verdict (a policy reload: none decided under the old policy stands),
        or those of one filesystem (``stat().st_dev``, gone from the mount table: its device
        number may come back with another filesystem). Returns how many were dropped."""
        kdev = None if dev is None else st_dev_to_kernel_dev(dev)
        dropped = 0
        with self._map_op("clear_verdicts"):
            for key in list(self._verdicts.keys()):
                if kdev is not None and key.dev != kdev:
                    continue
                with contextlib.suppress(KeyError):
                    del self._verdicts[key]
                    dropped += 1
        return dropped

    # -- where: filesystem classes and scope directories (agent/scope) ---------------------

    def set_fs_class(self, st_dev: int, cls: int, dynamic: bool = False) -> None:
        """The class (``agent.scope.FsClass`` value) of a filesystem; ``dynamic``: it
        appeared after the agent started, so none of its files gets the benefit of the
        doubt at a mapping."""
        value = int(cls) | (SB_DYNAMIC if dynamic else 0)
        with self._map_op("set_fs_class"):
            self._classes[ctypes.c_uint32(st_dev_to_kernel_dev(st_dev))] = ctypes.c_uint32(value)
        self._classes_now[st_dev] = value

    def drop_fs_class(self, st_dev: int) -> None:
        """Forget a filesystem (unmounted): unseen again, so in scope by default."""
        with self._map_op("drop_fs_class"), contextlib.suppress(KeyError):
            del self._classes[ctypes.c_uint32(st_dev_to_kernel_dev(st_dev))]
        self._classes_now.pop(st_dev, None)

    @property
    def fs_classes(self) -> Dict[int, int]:
        return dict(self._classes_now)

    def set_scope_dirs(self, dirs: Iterable[Tuple[int, int]]) -> None:
        """The (st_dev, ino) of every scope root inside a PARTIAL filesystem, exactly."""
        want = {(ino, st_dev_to_kernel_dev(dev)) for dev, ino in dirs}
        with self._map_op("set_scope_dirs"):
            have = {(k.ino, k.dev) for k in self._scope_dirs.keys()}  # noqa: SIM118 (a BCC table)
            for ino, kdev in want - have:
                self._scope_dirs[self._scope_dirs.Key(ino=ino, dev=kdev)] = ctypes.c_uint32(1)
            for ino, kdev in have - want:
                with contextlib.suppress(KeyError):
                    del self._scope_dirs[self._scope_dirs.Key(ino=ino, dev=kdev)]

    def set_loaders(self, files: Iterable[Tuple[int, int]]) -> None:
        """The (st_dev, ino) of the dynamic loaders (ld.so) on this host."""
        with self._map_op("set_loaders"):
            for key in list(self._loaders.keys()):
                with contextlib.suppress(KeyError):
                    del self._loaders[key]
            for dev, ino in files:
                key = self._loaders.Key(ino=ino, dev=st_dev_to_kernel_dev(dev))
                self._loaders[key] = ctypes.c_uint32(1)

    def exempt(self, tgid: int) -> None:
        """The agent: its mappings, ptrace and mounts are never judged, and neither are the
        execs of the processes it starts (after its self-test, which must not be exempt).
        Keyed by tgid and start time: pinned programs outlive the agent, its pid may not."""
        from agent.sensors.bpf.pins import start_ticks

        with self._map_op("exempt"):
            self._exempt[ctypes.c_uint32(tgid)] = ctypes.c_uint64(start_ticks(tgid))

    def stats_fd(self) -> int:
        """The counters' map (pinned beside the links: a restarted agent reads them)."""
        return int(self._bpf[b"stats"].map_fd)

    def link_fds(self) -> Dict[str, int]:
        """The BPF link of every attached program, by program name (for pinning)."""
        return dict(self._bpf.links)

    def object_fds(self) -> Tuple[List[int], List[int]]:
        """(map fds, program fds) of this program: what self-protection names by id."""
        return list(self._bpf.maps.values()), list(self._bpf.progs.values())

    def set_fresh_after(self, realtime_ns: int) -> None:
        """A file whose ctime is at or after this (CLOCK_REALTIME) changed since the agent
        started: at a mapping it is denied unless verified."""
        with self._map_op("set_fresh_after"):
            cell = self._runtime[ctypes.c_int(0)]
            cell.fresh_after_ns = int(realtime_ns)
            # the mount guard refuses only what reaches this namespace (exec_verdict.h)
            cell.agent_mnt_ns = os.stat("/proc/self/ns/mnt").st_ino
            self._runtime[ctypes.c_int(0)] = cell

    def epoch(self) -> int:
        """The rename epoch (each directory rename under path rules starts a new one)."""
        if self._bpf is None:
            return 0
        return int(self._runtime[ctypes.c_int(0)].epoch)

    # -- the older scope-by-device API (self-tests, tests): one filesystem in scope --------

    def add_scope_dev(self, st_dev: int) -> None:
        """Every file of this filesystem is in scope."""
        self.set_fs_class(st_dev, SB_IN)

    def remove_scope_dev(self, st_dev: int) -> None:
        """Back to unseen (in scope only while unseen filesystems are): a device number is
        reused."""
        self.drop_fs_class(st_dev)

    @property
    def scope(self) -> FrozenSet[int]:
        """The devices whose every file is in scope (class IN)."""
        return frozenset(d for d, v in self._classes_now.items() if v & SB_CLASS_MASK == SB_IN)

    # -- mode ------------------------------------------------------------------------------

    def set_mode(self, *, enforce: bool, deny_unknown: bool,
                 guards: Optional[Guards] = None) -> None:
        """enforce: act on denials in scope (EPERM, or SIGKILL for the kill backend).
        deny_unknown: unknown and stale files in scope are denials too. ``guards``: the
        switches beyond execve (kept as they were when None)."""
        if guards is not None:
            self._guards = guards
        flags = (CFG_ENFORCE if enforce else 0) | (CFG_DENY_UNKNOWN if deny_unknown else 0)
        flags |= self._guards.flags() | self._protect_flags
        with self._map_op("set_mode"):
            self._config[ctypes.c_int(0)] = self._config.Leaf(flags=flags)
        self._mode = (enforce, deny_unknown)

    def _set_protect_flags(self, flags: int) -> None:
        self._protect_flags = flags
        enforce, deny_unknown = self._mode
        self.set_mode(enforce=enforce, deny_unknown=deny_unknown)

    @property
    def mode(self) -> Tuple[bool, bool]:
        """(enforce, deny_unknown) as last set."""
        return self._mode

    @property
    def guards(self) -> Guards:
        return self._guards

    # -- counters --------------------------------------------------------------------------

    def counters(self, table: bytes = b"stats",
                 names: Tuple[str, ...] = VERDICT_STAT_NAMES) -> Dict[str, int]:
        """A per-CPU counter array summed over CPUs, by name (0s once closed)."""
        if self._bpf is None:
            return dict.fromkeys(names, 0)
        t = self._bpf[table]
        return {n: t.sum(i) for i, n in enumerate(names)}
