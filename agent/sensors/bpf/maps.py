"""The agent's side of a loaded BPF program: its maps and its ring buffer, over plain
descriptors and ``bpf(2)`` (issue 10, point 4).

The program is compiled and loaded by a short-lived loader process (agent/sensors/bpf/
loader.py), which hands the descriptors over and exits: the agent never holds libbcc,
LLVM or clang (~140 MB resident). What BCC's table and ring-buffer API gave the agent is
here, for the maps it reads and writes, with the key and value layouts of events.h and
exec_verdict.h as ctypes structures; each is checked against the map's own key and value
sizes when it is opened, so a header change that this file misses stops the load with the
map's name instead of corrupting a map.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import select
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Type

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, -1)  # -1: ENOSYS
LOOKUP, UPDATE, DELETE, GET_NEXT_KEY, OBJ_GET_INFO_BY_FD = 1, 2, 3, 4, 15
BPF_ANY, BPF_NOEXIST = 0, 1
PERCPU_TYPES = {5, 6, 10}  # BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH
RINGBUF_TYPE = 27

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfCallError(OSError):
    """A bpf(2) command failed (errno and the command in the message)."""


class ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):  # struct bpf_map_info, its stable head
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    rc = int(_libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise BpfCallError(err, f"bpf({cmd}): {os.strerror(err)}")
    return rc


def map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    bpf(OBJ_GET_INFO_BY_FD, InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info)))
    return info


def possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
        text = f.read().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


# -- the layouts (events.h, exec_verdict.h) ------------------------------------------------

class FileKey(ctypes.Structure):  # struct eg_file_key
    _fields_ = [("ino", ctypes.c_uint64), ("dev", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class Verdict(ctypes.Structure):  # struct eg_verdict
    _fields_ = [("ctime_ns", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("verdict", ctypes.c_uint32), ("epoch", ctypes.c_uint32),
                ("mtime_ns", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class Config(ctypes.Structure):  # struct eg_config
    _fields_ = [("flags", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class Runtime(ctypes.Structure):  # struct eg_runtime
    _fields_ = [("epoch", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("fresh_after_ns", ctypes.c_uint64), ("agent_gone_ns", ctypes.c_uint64),
                ("pin_dev", ctypes.c_uint32), ("agent_mnt_ns", ctypes.c_uint32)]


U32, U64, I32 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32
Layout = Tuple[Type[Any], Type[Any]]
# name -> (key, value) of every map the agent reads or writes; the others (the programs'
# scratch and per-thread maps) are only named by id (self-protection)
LAYOUTS: Dict[str, Layout] = {
    "verdicts": (FileKey, Verdict),
    "sb_class": (U32, U32),
    "scope_dirs": (FileKey, U32),
    "loaders": (FileKey, U32),
    "exempt": (U32, U64),
    "config": (I32, Config),
    "runtime": (I32, Runtime),
    "stats": (I32, U64),
    "kill_stats": (I32, U64),
    "guarded": (FileKey, U32),
    "guarded_ids": (U64, U32),
    "guarded_devs": (U32, U32),
}


# -- maps ------------------------------------------------------------------------------------

class Map:
    """One map by descriptor, with the part of BCC's table API the sensors use: ``Key`` and
    ``Leaf``, ``m[key]`` (KeyError when absent), ``m[key] = value``, ``del m[key]``,
    ``keys()``, ``insert`` (only where absent) and ``sum`` (a per-CPU array slot)."""

    def __init__(self, name: str, fd: int, key: Type[Any], leaf: Type[Any]) -> None:
        info = map_info(fd)
        self.name, self.map_fd, self.Key, self.Leaf = name, fd, key, leaf
        self.type, self.max_entries = int(info.type), int(info.max_entries)
        if (info.key_size, info.value_size) != (ctypes.sizeof(key), ctypes.sizeof(leaf)):
            raise ValueError(f"map {name}: the kernel's key/value sizes are {info.key_size}/"
                             f"{info.value_size} bytes, agent/sensors/bpf/maps.py says "
                             f"{ctypes.sizeof(key)}/{ctypes.sizeof(leaf)}")
        self.percpu = self.type in PERCPU_TYPES
        self._cpus = possible_cpus() if self.percpu else 1
        # a per-CPU value is one slot per possible CPU (one CPU too), each rounded up to 8
        self._slot = (ctypes.sizeof(leaf) + 7) // 8 * 8

    def _key(self, key: Any) -> Any:
        if isinstance(key, self.Key):
            return key
        return self.Key(getattr(key, "value", key))

    def _value(self, value: Any) -> Any:
        if isinstance(value, self.Leaf):
            return value
        return self.Leaf(getattr(value, "value", value))

    def _elem(self, cmd: int, key: Any, value: Any = None, flags: int = 0) -> None:
        k = self._key(key)
        vaddr = ctypes.addressof(value) if value is not None else 0
        bpf(cmd, ElemAttr(self.map_fd, 0, ctypes.addressof(k), vaddr, flags))

    def __getitem__(self, key: Any) -> Any:
        if self.percpu:
            raise TypeError(f"map {self.name} is per-CPU: use sum()")
        out = self.Leaf()
        try:
            self._elem(LOOKUP, key, out)
        except BpfCallError as exc:
            if exc.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise
        return out

    def __setitem__(self, key: Any, value: Any) -> None:
        self._elem(UPDATE, key, self._value(value), BPF_ANY)

    def __delitem__(self, key: Any) -> None:
        try:
            self._elem(DELETE, key)
        except BpfCallError as exc:
            if exc.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise

    def insert(self, key: Any, value: Any) -> bool:
        """Write only where the key has no entry (BPF_NOEXIST); False when one was there."""
        try:
            self._elem(UPDATE, key, self._value(value), BPF_NOEXIST)
        except BpfCallError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def keys(self) -> Iterator[Any]:
        prev: Optional[Any] = None
        while True:
            nxt = self.Key()
            attr = ElemAttr(self.map_fd, 0, ctypes.addressof(prev) if prev is not None else 0,
                             ctypes.addressof(nxt), 0)
            try:
                bpf(GET_NEXT_KEY, attr)
            except BpfCallError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            yield nxt
            prev = nxt

    def sum(self, key: Any) -> int:
        """A per-CPU slot of integers summed over the possible CPUs."""
        raw = (ctypes.c_uint8 * (self._slot * self._cpus))()
        self._elem(LOOKUP, key, raw)
        fmt = "<" + {1: "B", 2: "H", 4: "I", 8: "Q"}[ctypes.sizeof(self.Leaf)]
        return sum(struct.unpack_from(fmt, raw, i * self._slot)[0] for i in range(self._cpus))


# -- the ring buffer ---------------------------------------------------------------------------

_BUSY, _DISCARD, _HDR = 1 << 31, 1 << 30, 8


@dataclass
class RingBuffer:
    """A BPF ring buffer read as libbpf reads one: the consumer position (a page this
    process writes), the producer position and the data (mapped twice back to back, so a
    record across the end reads straight on), 8-byte record headers (length, busy and
    discard bits). Wake-ups come through epoll on the map's descriptor. x86-64 keeps loads
    in order (TSO), so plain reads are the acquire loads libbpf makes; the agent's BPF
    backends are built for x86-64 (their offsets and syscall numbers), another
    architecture fails to load with ENOSYS."""

    fd: int
    callback: Callable[[bytes], None]

    def __post_init__(self) -> None:
        info = map_info(self.fd)
        if info.type != RINGBUF_TYPE:
            raise ValueError(f"map {info.name.decode(errors='replace')} is no ring buffer")
        page = mmap.PAGESIZE
        self._size = int(info.max_entries)
        self._mask = self._size - 1
        self._cons = mmap.mmap(self.fd, page, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(self.fd, page + 2 * self._size, mmap.MAP_SHARED,
                               mmap.PROT_READ, offset=page)
        self._page = page
        self._epoll = select.epoll()
        self._epoll.register(self.fd, select.EPOLLIN)

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for a wake-up, then consume; the records handed on."""
        with contextlib.suppress(InterruptedError):
            self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1)
        return self.consume()

    def consume(self) -> int:
        n = 0
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        while True:
            prod = struct.unpack_from("<Q", self._prod, 0)[0]
            got = False
            while cons < prod:
                at = self._page + (cons & self._mask)
                head = struct.unpack_from("<I", self._prod, at)[0]
                if head & _BUSY:
                    return n
                got = True
                length = head & ~(_BUSY | _DISCARD)
                cons += (length + _HDR + 7) // 8 * 8
                if not head & _DISCARD:
                    self.callback(self._prod[at + _HDR:at + _HDR + length])
                    n += 1
                struct.pack_into("<Q", self._cons, 0, cons)
            if not got:
                return n

    def close(self) -> None:
        self._epoll.close()
        self._prod.close()
        self._cons.close()
