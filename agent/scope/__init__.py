"""What "in scope" means, for every backend: filesystems classified from the mount table
(classify.py, pure), kept current as mounts come and go (live.py). docs/threat-model.md,
"Scope", states the semantics this package implements."""

from agent.scope.classify import FsClass, ScopeView, classify
from agent.scope.live import MountWatcher, Placement, ScopeTracker, classes_diff

__all__ = ["FsClass", "MountWatcher", "Placement", "ScopeTracker", "ScopeView", "classes_diff",
           "classify"]
