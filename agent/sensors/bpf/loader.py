"""Compile and load a BPF program in a short-lived process, and hand its descriptors over
(issue 10, point 4: the agent's resident memory).

BCC compiles with the LLVM and clang that libbcc links: a process that does it grows by
~140 MB, and keeps most of it (docs/performance.md, "Memory"). So the agent never imports
BCC. ``load`` starts a loader process (``child_main``), which compiles and loads the
program, attaches it (BCC attaches LSM, fentry, tracepoint and raw tracepoint programs
itself; fmod_ret programs by name, ``tracing``), and sends every map, program and attach
descriptor back over a socket (SCM_RIGHTS) with a manifest naming each, then exits without
BCC's cleanup: the agent's copies keep everything loaded and attached. The agent reads and
writes the maps with agent/sensors/bpf/maps.py. Closing the descriptors (``Loaded.close``)
detaches and unloads, as BCC's cleanup did.

A failure in the loader (BCC missing, a compile error, the verifier's refusal, an attach
error) comes back as the error text and BCC's own log, for ``explain``.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from agent.sensors.bpf.maps import LAYOUTS, Map, RingBuffer

MAX_FDS = 250  # SCM_RIGHTS carries at most 253 descriptors in one message
MANIFEST_MAX = 1 << 20
LOAD_TIMEOUT_S = 900  # a compile under qemu's TCG takes minutes
# BCC's attach tables: name -> fd (kprobes: name -> {function: fd})
ATTACH_TABLES = ("lsm_fds", "kfunc_entry_fds", "kfunc_exit_fds", "raw_tracepoint_fds",
                 "tracepoint_fds", "kprobe_fds")
LINK_TABLES = ("lsm_fds", "kfunc_entry_fds", "kfunc_exit_fds")  # BPF links (pinnable)


class LoadFailed(Exception):
    """The loader process could not load the program: its error and BCC's log."""

    def __init__(self, message: str, log: List[str], kind: str = "load") -> None:
        super().__init__(message)
        self.log, self.kind = log, kind


@dataclass
class Loaded:
    """The agent's descriptors of one loaded program. ``links``: BPF links by program name
    (LSM, fentry, fmod_ret: what pinning keeps); ``attach``: every descriptor that keeps a
    program attached (links, raw tracepoints, perf events), closed first."""

    maps: Dict[str, int]
    progs: Dict[str, int]
    links: Dict[str, int]
    attach: List[int]
    _tables: Dict[str, Map] = field(default_factory=dict)
    _ring: Optional[RingBuffer] = None

    def __getitem__(self, name: bytes) -> Map:
        key = name.decode()
        table = self._tables.get(key)
        if table is None:
            if key not in self.maps or key not in LAYOUTS:
                raise KeyError(f"no map {key} with a known layout")
            table = self._tables[key] = Map(key, self.maps[key], *LAYOUTS[key])
        return table

    def open_ring_buffer(self, name: bytes, callback: Callable[[bytes], None]) -> None:
        self._ring = RingBuffer(self.maps[name.decode()], callback)

    def ring_buffer_poll(self, timeout_ms: int) -> int:
        return self._ring.poll(timeout_ms) if self._ring is not None else 0

    def ring_buffer_consume(self) -> int:
        return self._ring.consume() if self._ring is not None else 0

    def close(self) -> None:
        """Detach (the attach descriptors first: nothing is judged once they are gone),
        then unload."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        _close([*self.attach, *self.progs.values(), *self.maps.values()])
        self.attach, self.progs, self.maps, self.links = [], {}, {}, {}


def load(text: bytes, cflags: List[str], tracing: List[bytes]) -> Loaded:
    """Compile, load and attach in a loader process; raise LoadFailed with its log."""
    request = json.dumps({"text": text.decode(), "cflags": cflags,
                          "tracing": [t.decode() for t in tracing]}).encode()
    # files, not pipes: neither side ever blocks on the other
    with tempfile.TemporaryFile() as asked, tempfile.TemporaryFile() as output:
        asked.write(request)
        asked.seek(0)
        data, fds, code = _run_loader(asked, output)
        output.seek(0)
        said = output.read()[-8000:].decode("utf-8", "replace").splitlines()[-20:]
    try:
        manifest = json.loads(data) if data else {"error": "the BPF loader process sent "
                                                  f"nothing (exit {code})"}
        if "error" in manifest:
            raise LoadFailed(str(manifest["error"]), list(manifest.get("log", [])) + said,
                             str(manifest.get("kind", "load")))
        return _loaded(manifest, fds)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        _close(fds)
        raise LoadFailed(f"the BPF loader process sent a broken manifest: {exc!r}",
                         said) from None
    except LoadFailed:
        _close(fds)
        raise


def _close(fds: List[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _run_loader(asked: Any, output: Any) -> Tuple[bytes, List[int], Optional[int]]:
    """Start the loader (its request in ``asked``, its output to ``output``) with a socket
    and receive its one message. Isolated (-I: no PYTHON* variables, no user site, not the
    working directory) and run from /: no module planted where root happens to stand is
    imported by a process that loads BPF programs. Its own code comes from the directory
    this module was imported from."""
    # SOCK_SEQPACKET: the manifest and its descriptors arrive whole, in one message
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = theirs.fileno()  # the loader's number for it (inherited as is)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    boot = (f"import sys; sys.path.insert(0, {root!r}); "
            f"from agent.sensors.bpf.loader import child_main; sys.exit(child_main({sock}))")
    fds: List[int] = []
    try:
        with ours:
            try:
                proc = subprocess.Popen([sys.executable, "-I", "-c", boot], stdin=asked,
                                        stdout=output, stderr=output, pass_fds=[sock],
                                        cwd="/")
            finally:
                theirs.close()
            try:
                ours.settimeout(LOAD_TIMEOUT_S)
                data, fds = _receive(ours)
                return data, fds, proc.wait(LOAD_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
                raise
    except (OSError, subprocess.TimeoutExpired) as exc:
        _close(fds)
        raise LoadFailed(f"the BPF loader process: {exc}", []) from exc


def _receive(sock: socket.socket) -> Tuple[bytes, List[int]]:
    """One manifest and its descriptors (the loader sends both in one message)."""
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(MANIFEST_MAX, socket.CMSG_LEN(MAX_FDS * 4))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return msg, list(fds)


def _loaded(manifest: Dict[str, Any], fds: List[int]) -> Loaded:
    def pick(names: Dict[str, int]) -> Dict[str, int]:
        return {name: fds[i] for name, i in names.items()}
    return Loaded(maps=pick(manifest["maps"]), progs=pick(manifest["progs"]),
                  links=pick(manifest["links"]), attach=[fds[i] for i in manifest["attach"]])


# -- the loader process ------------------------------------------------------------------------

def _flatten(table: Dict[Any, Any]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for name, fd in table.items():
        key = name.decode() if isinstance(name, bytes) else str(name)
        if isinstance(fd, dict):  # kprobes: event -> {function: fd}
            out.update({f"{key}/{k}": int(v) for k, v in _flatten(fd).items()})
        else:
            out[key] = int(fd)
    return out


def _compile_and_attach(req: Dict[str, Any]) -> Dict[str, Any]:
    import bcc  # the one process that holds it

    from agent.sensors.bpf.build import captured_stderr

    fds: List[int] = []

    def add(fd: int) -> int:
        fds.append(int(fd))
        return len(fds) - 1

    log: List[str] = []
    try:
        with captured_stderr() as log:
            b = bcc.BPF(text=req["text"].encode(), cflags=list(req["cflags"]))
            tracing: Dict[str, int] = {}
            for hook in req["tracing"]:  # fmod_ret: BCC < 0.35 has no attach_fmod_ret()
                fn = b.load_func(hook.encode(), bcc.BPF.TRACING)
                link = int(bcc.lib.bpf_attach_kfunc(fn.fd))
                if link < 0:
                    raise RuntimeError(f"Failed to attach fmod_ret program {hook} "
                                       f"({os.strerror(-link) if link < -1 else 'refused'})")
                tracing[hook] = link
    except Exception as exc:  # BCC raises bare Exception for compile, load and attach
        return {"error": str(exc), "log": log, "fds": []}
    module = b.module
    # libbcc.py declares neither: a char * returned as int would be cut to 32 bits
    bcc.lib.bpf_num_tables.restype = ctypes.c_size_t
    bcc.lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    bcc.lib.bpf_table_name.restype = ctypes.c_char_p
    bcc.lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    maps = {}
    for i in range(int(bcc.lib.bpf_num_tables(module))):
        name = bcc.lib.bpf_table_name(module, i)
        maps[name.decode()] = add(bcc.lib.bpf_table_fd(module, name))
    progs = {(k.decode() if isinstance(k, bytes) else str(k)): add(fn.fd)
             for k, fn in b.funcs.items()}
    links: Dict[str, int] = {}
    attach: List[int] = []
    for name, fd in tracing.items():  # first: the verdict hooks of fmod-ret go first
        i = add(fd)
        attach.append(i)
        links[name] = i
    for table in ATTACH_TABLES:
        for name, fd in _flatten(getattr(b, table, {})).items():
            i = add(fd)
            attach.append(i)
            if table in LINK_TABLES:
                links[name] = i
    if len(fds) > MAX_FDS:
        return {"error": f"{len(fds)} descriptors: more than one message carries", "log": [],
                "fds": []}
    return {"maps": maps, "progs": progs, "links": links, "attach": attach, "fds": fds}


def child_main(sock_fd: int) -> int:
    """The loader process: the request on stdin, the answer on socket ``sock_fd``."""
    req = json.loads(sys.stdin.buffer.read())
    sock = socket.socket(fileno=sock_fd)
    try:
        out = _compile_and_attach(req)
    except ImportError as exc:
        out = {"error": f"import bcc failed: {exc}", "kind": "import", "log": [], "fds": []}
    fds = out.pop("fds")
    sock.sendmsg([json.dumps(out).encode()],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    sock.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # no BCC cleanup: it would detach what the agent now holds (the kernel closes ours)
    os._exit(0 if "error" not in out else 1)


