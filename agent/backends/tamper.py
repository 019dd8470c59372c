"""Tamper resistance for the BPF runners (policy ``on_agent_exit``, docs/threat-model.md
"Tamper resistance").

``keep-enforcing`` in enforce mode: the program's links are pinned (agent/sensors/bpf/pins.py)
so enforcement outlives the agent (bpf-lsm, fmod-ret), and on bpf-lsm the LSM refuses
everyone but the agent its process, its BPF objects, its pins and the files it lives on
(exec_verdict.h EG_PROTECT); a task_free hook tells the pinned programs the agent died,
and they count what they deny alone. Only ``release`` (an authorized stop) or a switch to
``fail-open`` or monitor mode undoes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import agent
from agent.policy import PolicySnapshot

# paths the agent reads that the policy does not name (the break-glass keys directory):
# the daemon adds them before its runner starts
EXTRA_GUARDED: List[str] = []
HEARTBEAT_EVERY_S = 1.0
PINNABLE = ("bpf-lsm", "fmod-ret")  # the kernel calls an agent silent for 5 s gone (EG_ORPHAN_NS)
CONFIG_DIR = "/etc/execguard"


def guarded_paths(snapshot: PolicySnapshot) -> List[str]:
    """What the agent lives on: its code, state, logs, trust keys, policy and /etc/execguard
    (the break-glass keys are there). Paths that do not exist are left out."""
    doc = json.loads(snapshot.canonical)
    # a venv: all of it (the agent imports its dependencies lazily, as itself)
    code = sys.prefix if sys.prefix != sys.base_prefix else \
        os.path.dirname(os.path.abspath(agent.__file__))
    paths = [code, os.path.dirname(os.path.abspath(agent.__file__)), snapshot.state_dir,
             snapshot.log_dir, CONFIG_DIR, *doc.get("trust", {}).get("keys", []),
             *EXTRA_GUARDED]
    if snapshot.source.startswith("/"):
        paths.append(snapshot.source)
    out: List[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if os.path.exists(real) and real not in out:
            out.append(real)
    return out


def inodes_of(paths: List[str]) -> List[Tuple[int, int, int]]:
    """(st_dev, st_ino, EG_GUARD_* flags) to guard for ``paths``: each path (a directory
    and all below it, or one file), and every directory above it (not renamed, not mounted
    over: either would put other files at the paths the agent reads). A file whose device
    differs from its directory's (overlayfs reports the layer's inode, while the hooks may
    see the overlay's) is guarded through its directory too."""
    from agent.sensors.bpf.pins import GUARD_ABOVE, GUARD_DIR, GUARD_FILE

    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        is_dir = os.path.isdir(path)
        out.append((st.st_dev, st.st_ino, GUARD_DIR if is_dir else GUARD_FILE))
        parent = os.path.dirname(path) or "/"
        if not is_dir:
            pst = os.stat(parent)
            if pst.st_dev != st.st_dev:
                out.append((pst.st_dev, pst.st_ino, GUARD_DIR))
        while True:
            with contextlib.suppress(OSError):
                pst = os.stat(parent)
                out.append((pst.st_dev, pst.st_ino, GUARD_ABOVE))
            if parent == "/":
                break
            parent = os.path.dirname(parent) or "/"
    return out


def held_for_write(paths: List[str]) -> List[str]:
    """The guarded regular files someone holds open for write now: self-protection judges
    opens, so a descriptor taken before it keeps writing (agent/writers.py tells)."""
    from agent.writers import has_writers

    out = []
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if has_writers(fd):
                out.append(path)
        finally:
            os.close(fd)
    return out


class SelfProtection:
    """Pins and guards one bpf-lsm sensor while the policy keeps enforcing."""

    def __init__(self, backend: str, say: Callable[[str], None]) -> None:
        self.backend = backend
        self.say = say
        self.pins: Any = None  # agent.sensors.bpf.pins.PinSet while pinned
        self.guarded: List[str] = []
        self.registered: Dict[str, Any] = {}
        self.orphans: List[Dict[str, Any]] = []
        self.open_for_write: List[str] = []
        self.error: Optional[str] = None
        self._sensor: Any = None

    def start(self, sensor: Any, snapshot: PolicySnapshot) -> None:
        """Report pins left by an agent that died (they still enforce), then apply."""
        from agent.sensors.bpf.pins import orphans
        from agent.sensors.bpf.sensor import VERDICT_STAT_NAMES

        self._sensor = sensor
        self.orphans = [dict(o.__dict__) for o in orphans(VERDICT_STAT_NAMES)]
        for o in self.orphans:
            denied = o["counters"].get("orphan_denied", "an unknown number of")
            self.say(f"WARNING: pinned enforcement of a previous agent (pid {o['pid']}, "
                     f"{o['directory']}) is still attached and denied {denied} exec(s) while "
                     "no agent answered; it denies what it had not verified until a "
                     "reboot: this agent cannot adopt it (docs/threat-model.md, \"Tamper "
                     "resistance\")")
        self.apply(snapshot)

    def supported(self) -> bool:
        """The sensor's programs can be pinned (bpf-lsm, fmod-ret)."""
        return self._sensor is not None and hasattr(self._sensor, "link_fds") \
            and self._sensor.backend in PINNABLE

    def protects(self) -> bool:
        """And the LSM guards the agent (bpf-lsm only: fmod-ret's hooks cannot refuse
        signals or bpf(); its pins go with an rm)."""
        return self.supported() and bool(getattr(self._sensor, "self_protection", False))

    def apply(self, snapshot: PolicySnapshot) -> None:
        """Pin and protect when the policy keeps enforcing; otherwise undo both."""
        if not self.supported():
            return
        if snapshot.keeps_enforcing and self.pins is None:
            self._pin(snapshot)
        elif not snapshot.keeps_enforcing and self.pins is not None:
            self.release()

    def _pin(self, snapshot: PolicySnapshot) -> None:
        from agent.sensors.bpf.pins import PinSet

        sensor = self._sensor
        try:
            self.pins = PinSet.create(self.backend, sensor.link_fds(), sensor.stats_fd())
            if self.protects():
                self.guarded = guarded_paths(snapshot)
                self.registered = sensor.protect(self.pins, inodes_of(self.guarded))
                self.open_for_write = held_for_write(self.guarded)
                for path in self.open_for_write:
                    self.say(f"WARNING: {path} is open for write by another process: its "
                             "writes through that descriptor are not refused (only new "
                             "opens are); restart that process or the agent")
            self.error = None
        except (OSError, KeyError) as exc:
            self.error = f"cannot pin or protect: {exc}"
            self.say(f"WARNING: on_agent_exit = keep-enforcing: {self.error}; enforcement "
                     "ends with this agent (fail-open)")
            self.release()
            return
        if self.protects():
            self.say(f"keep-enforcing: programs pinned in {self.pins.directory}; the agent, "
                     f"its BPF objects and {len(self.guarded)} paths are self-protected")
        else:
            self.say(f"keep-enforcing: programs pinned in {self.pins.directory}; "
                     f"{self.backend} cannot protect the agent or its pins (root's kill or "
                     "rm ends enforcement): use bpf-lsm for that")

    def release(self) -> None:
        """Self-protection off and pins removed: enforcement ends with this agent."""
        sensor, pins = self._sensor, self.pins
        if sensor is not None and hasattr(sensor, "unprotect"):
            try:
                sensor.unprotect()
            except Exception as exc:  # a closed sensor: its programs are gone already
                self.error = f"unprotect: {exc}"
        if pins is not None:
            pins.remove()
            self.pins = None

    def stats(self, snapshot: PolicySnapshot) -> Dict[str, Any]:
        sensor = self._sensor
        return {"on_agent_exit": snapshot.on_agent_exit,
                "keep_enforcing": self.pins is not None,
                "protected": bool(getattr(sensor, "protecting", False)),
                "supported": self.supported(), "self_protection": self.protects(),
                "pin_directory": self.pins.directory if self.pins is not None else None,
                "guarded_paths": list(self.guarded), **self.registered,
                "open_for_write": list(self.open_for_write),
                "orphans": list(self.orphans), "error": self.error}


# EG_TAMPER_* kinds (exec_verdict.h) -> the attempt's name in records
ATTEMPTS = {1: "signal", 2: "ptrace", 3: "task", 4: "bpf-id", 5: "bpf-fd", 6: "bpf-load",
            7: "pin", 8: "file", 9: "umount", 10: "mount"}
_OPS = {1: "open", 2: "write", 3: "unlink", 4: "rename", 5: "create", 6: "setattr",
        7: "truncate", 8: "link"}
_TASK = {1: "a resource limit", 2: "the scheduling policy", 3: "the nice value",
         4: "the I/O priority"}
_IDS = {1: "map", 2: "program", 3: "link"}


def describe_attempt(aux: int, event: Any) -> Tuple[str, str]:
    """(attempt name, one sentence) for a tamper record's ``aux`` (kind << 16 | detail);
    the object is in the record's (dev, ino), a target process in its size field."""
    kind, detail = (aux >> 16) & 0xFFFF, aux & 0xFFFF
    name = ATTEMPTS.get(kind, f"kind-{kind}")
    target = event.identity.size
    if kind == 1:
        return name, f"signal {detail} to the agent (pid {target})"
    if kind == 2:
        return name, f"ptrace (mode {detail:#x}) of the agent (pid {target})"
    if kind == 3:
        return name, f"a change to {_TASK.get(detail, 'a property')} of the agent (pid {target})"
    if kind in (4, 5):
        obj = _IDS.get(detail, "object") if kind == 5 else f"object (bpf command {detail})"
        return name, f"a descriptor for the agent's BPF {obj} id {event.identity.ino}"
    if kind == 6:
        return name, f"loading a BPF program of type {detail} (runs in other processes)"
    if kind in (7, 8):
        where = "a pinned object of the agent" if kind == 7 else "a file the agent guards"
        path = f" {event.path}" if event.path else ""
        return name, (f"{_OPS.get(detail, 'a change')} of {where}{path} (dev "
                      f"{event.identity.dev}, inode {event.identity.ino})")
    if kind == 9:
        return name, "unmounting the bpffs that holds the agent's pins"
    if kind == 10:
        return name, f"a mount onto a path the agent guards (inode {event.identity.ino})"
    return name, f"an attempt of kind {kind} on the agent"
