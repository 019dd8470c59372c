"""A file the caller placed in scope (agent/scope: another namespace's or a detached mount,
no name) is judged by the policy's rules even though its path is outside every scope glob.
Before, the policy's own scope check allowed it unjudged, and the kill backend then wrote
that allow into the kernel for the inode: an unsigned file of the scope, exec'd once through
an open_tree(2) clone, ran afterwards from its real path too."""

from __future__ import annotations

import os
from pathlib import Path

from agent.decision import Enforcement
from agent.errors import Reason
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401
from tests.unit.test_decide import event_for, make


def test_placed_in_scope_is_judged_whatever_its_path(tmp_path: Path,
                                                     material: Material) -> None:
    decider, scope = make(tmp_path, material, "enforce")
    outside = tmp_path / "elsewhere"
    unsigned = copy_signed(material.bins["app"], outside, None)
    signed = copy_signed(material.bins["app"], outside / "s", material.private["a"])
    for path, allow, reason in ((unsigned, False, Reason.NO_SIGNATURE),
                                (signed, True, Reason.OK)):
        event, fd = event_for(path)
        try:
            by_path = decider.decide(event, fd, Enforcement.POST_EXEC_KILL)
            placed = decider.decide(event, fd, Enforcement.POST_EXEC_KILL, in_scope=True)
            out = decider.decide(event, fd, Enforcement.POST_EXEC_KILL, in_scope=False)
        finally:
            os.close(fd)
        assert by_path.allow and by_path.detail == "outside every scope"
        assert (placed.allow, placed.reason) == (allow, reason), placed
        assert out.allow and out.detail == "outside every scope"
    assert not str(unsigned).startswith(str(scope))
