"""Which files are in scope, by filesystem: the semantics of docs/threat-model.md, "Scope".

A scope root names a directory as the agent sees it (the initial mount namespace). The scope
is that directory *in its filesystem* and everything below it there, however it is reached:
another mount of the same filesystem (a bind mount), another mount namespace, a chroot. A
filesystem mounted at or below a scope root is in scope as a whole, and so is an overlay with
a layer in scope. Everything the agent cannot place is in scope: a filesystem it has not
seen (mounted after the last look, or only in another namespace), and a file with no path.

This module is pure: the mount table and the scope roots in, one ``ScopeView`` out. Each
filesystem (``st_dev``) gets a class:

- ``IN``: every file on it is in scope;
- ``PARTIAL``: files below the listed directories of it are in scope (the kernel walks a
  file's directory ancestors within the filesystem, so no mount or namespace hides them);
- ``OUT``: no file on it is in scope (it is mounted only outside every scope, or it cannot
  hold an executable file at all).
A filesystem absent from the view is ``IN``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from agent.scope.mountinfo import Mount, fs_relative, holder, join, overlay_layers, under


class FsClass(IntEnum):
    """The kernel's ``EG_SB_*`` values (exec_verdict.h)."""

    OUT = 1
    IN = 2
    PARTIAL = 3


# Filesystems that cannot hold a regular file anyone can exec or map: never in scope.
# devtmpfs, tmpfs, hugetlbfs, fuse, overlay and every disk filesystem can, so they are
# not here (root can create an executable in /dev).
NO_EXECUTABLES = frozenset({
    "proc", "sysfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs", "tracefs",
    "bpf", "pstore", "mqueue", "fusectl", "configfs", "autofs", "binfmt_misc", "efivarfs",
    "nsfs", "rpc_pipefs", "selinuxfs",
})


@dataclass(frozen=True)
class ScopeView:
    """The classes of the filesystems the agent sees, and the in-scope subtrees of each."""

    classes: Dict[int, FsClass]
    subtrees: Dict[int, Tuple[str, ...]]  # PARTIAL dev -> directories (within the fs)
    roots: Tuple[str, ...]  # the scope roots this view was made from
    # True when some filesystem that can hold executables is OUT or PARTIAL: the scopes do
    # not cover the host, so a mount could put out-of-scope files under a scope path
    partial: bool = False
    notes: Tuple[str, ...] = field(default=())  # what was classified IN only to fail closed

    def class_of(self, dev: int) -> FsClass:
        return self.classes.get(dev, FsClass.IN)

    def in_scope(self, dev: int, fs_path: str) -> bool:
        """The file at ``fs_path`` within filesystem ``dev`` is in scope."""
        cls = self.class_of(dev)
        if cls is FsClass.PARTIAL:
            return any(under(fs_path, d) for d in self.subtrees.get(dev, ()))
        return cls is FsClass.IN


def _subtrees(mounts: List[Mount], roots: Iterable[str]) -> Dict[int, Set[str]]:
    """Directories of each filesystem that a scope root covers: all that a mount inside a
    scope shows, and the directory a scope root names in the mount that shows it (the
    last-mounted one: a directory hidden under a mount is not what the root names)."""
    dirs: Dict[int, Set[str]] = {}
    for root in roots:
        shown = holder(mounts, root)
        for m in mounts:
            if m.fstype in NO_EXECUTABLES:
                continue
            if under(m.point, root):  # the mount is inside the scope: all it shows
                dirs.setdefault(m.dev, set()).add(m.root)
            elif m is shown:  # the scope is inside this mount
                rest = root if m.point == "/" else root[len(m.point):]
                dirs.setdefault(m.dev, set()).add(join(m.root, rest))
    return dirs


def _minimal(dirs: Iterable[str]) -> Tuple[str, ...]:
    kept: List[str] = []
    for d in sorted(set(dirs), key=len):
        if not any(under(d, k) for k in kept):
            kept.append(d)
    return tuple(sorted(kept))


def classify(mounts: List[Mount], roots: Iterable[str],
             resolve: Callable[[str], str] = lambda p: p) -> ScopeView:
    """The view for ``roots`` (absolute, resolved directories) over ``mounts``. ``resolve``
    resolves an overlay's layer paths (symlinks) before they are placed."""
    roots = tuple(roots)
    seen: Dict[int, str] = {}
    for m in mounts:
        seen.setdefault(m.dev, m.fstype)
    dirs = _subtrees(mounts, roots)
    classes: Dict[int, FsClass] = {}
    subtrees: Dict[int, Tuple[str, ...]] = {}
    for dev, fstype in seen.items():
        found = _minimal(dirs.get(dev, ()))
        if fstype in NO_EXECUTABLES:
            classes[dev] = FsClass.OUT
        elif "/" in found:
            classes[dev] = FsClass.IN
        elif found:
            classes[dev], subtrees[dev] = FsClass.PARTIAL, found
        else:
            classes[dev] = FsClass.OUT
    notes = _overlays(mounts, classes, subtrees, resolve)
    partial = any(c is not FsClass.IN for d, c in classes.items()
                  if seen[d] not in NO_EXECUTABLES)
    return ScopeView(classes, subtrees, roots, partial, tuple(notes))


def _overlays(mounts: List[Mount], classes: Dict[int, FsClass],
              subtrees: Dict[int, Tuple[str, ...]], resolve: Callable[[str], str]
              ) -> List[str]:
    """An overlay shows the files of its layers under its own device: it is IN when a layer
    is in scope, holds a scope, or cannot be placed (then a note says why)."""
    notes: List[str] = []
    view = ScopeView(classes, subtrees, ())
    for _ in range(4):  # an overlay whose layer is on another overlay: settle in a few passes
        changed = False
        for m in mounts:
            if m.fstype != "overlay" or classes.get(m.dev) is FsClass.IN:
                continue
            why = _overlay_in_scope(mounts, view, m, resolve)
            if why is not None:
                classes[m.dev] = FsClass.IN
                subtrees.pop(m.dev, None)
                notes.append(f"overlay at {m.point}: in scope ({why})")
                changed = True
        if not changed:
            break
    return notes


def _overlay_in_scope(mounts: List[Mount], view: ScopeView, m: Mount,
                      resolve: Callable[[str], str]) -> Optional[str]:
    layers = overlay_layers(m.super_options)
    if layers is None:
        return "its layers cannot be read from mountinfo"
    for layer in layers:
        try:
            where = fs_relative(mounts, resolve(layer))
        except OSError:
            where = None
        if where is None:
            return f"layer {layer} is not in the mount table"
        dev, fs_path = where
        cls = view.class_of(dev)
        if cls is FsClass.IN:
            return f"layer {layer} is in scope"
        if cls is FsClass.PARTIAL and any(
                under(fs_path, d) or under(d, fs_path) for d in view.subtrees.get(dev, ())):
            return f"layer {layer} holds or is in a scope"
    return None

