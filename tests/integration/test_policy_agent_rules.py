"""The real agent (``execguard run``, fanotify-exec backend, enforce policy) scoped to a tmpfs
the test owns: rules that match on the exec's gid and on the file's owner, and a rule in
monitor mode inside the enforce policy.

Everything is real: the kernel's FAN_OPEN_EXEC_PERM events, the agent process reading the
caller's gid from /proc/<pid>/status while the exec waits, the owner from fstat of the event
fd, and execs made by subprocesses running with a chosen gid (the suite runs as root).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from tests.agent_fixtures import EXEC_TIMEOUT, running_agent, scoped_tmpfs

pytestmark = pytest.mark.timeout(180)

STAFF_GID = 4242


def script(path: Path, owner: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho ran\n")
    path.chmod(0o755)
    os.chown(path, owner, owner)
    return path


def run_as(path: Path, gid: Optional[int] = None) -> subprocess.CompletedProcess[str]:
    """Exec ``path`` (uid 0) with real and effective gid ``gid``; EPERM comes back as 126."""
    try:
        return subprocess.run([str(path)], capture_output=True, text=True,
                              timeout=EXEC_TIMEOUT, group=gid,
                              extra_groups=[] if gid is not None else None)
    except PermissionError as exc:
        return subprocess.CompletedProcess([str(path)], 126, "", str(exc))


def test_gid_owner_and_monitor_rule_in_an_enforce_policy(tmp_path: Path) -> None:
    with scoped_tmpfs("16m") as scope:
        trial = script(scope / "trial" / "new.sh", owner=1000)
        staff = script(scope / "staff" / "tool.sh", owner=1000)
        root_owned = script(scope / "owned" / "root.sh", owner=0)
        user_owned = script(scope / "owned" / "user.sh", owner=1000)
        policy = tmp_path / "policy.toml"
        policy.write_text(f"""
version = 3
mode = "enforce"
scopes = ["{scope}"]
fallthrough = "deny"
[trust]
keys = []

[[rules]]
id = "trial"
description = "new rule, observed before it is enforced"
action = "deny"
mode = "monitor"
match = {{ paths = ["{scope}/trial"] }}

[[rules]]
id = "staff-only"
action = "allow"
match = {{ paths = ["{scope}/staff"], gids = [{STAFF_GID}] }}

[[rules]]
id = "root-owned"
action = "allow"
match = {{ paths = ["{scope}/owned"], owner_uids = [0] }}
""")
        with running_agent(tmp_path, "--policy", str(policy), "--backend",
                           "fanotify-exec", "--no-prewarm") as agent:
            assert agent.status()["enforcement"] == "fanotify-deny"

            # a monitor rule in an enforce policy: decided deny, recorded, not blocked
            ran = run_as(trial)
            assert ran.returncode == 0 and ran.stdout == "ran\n", ran.stderr
            rec = agent.wait_decision(str(trial))[-1]
            assert (rec["decision"], rec["reason"], rec["rule_id"], rec["enforcement"]) == (
                "deny", "policy-deny", "trial", "monitor")

            # gid: the staff group may run it, this test's own gid (0) may not
            ok = run_as(staff, STAFF_GID)
            assert ok.returncode == 0 and ok.stdout == "ran\n", ok.stderr
            rec = agent.wait_decision(str(staff))[-1]
            assert (rec["decision"], rec["rule_id"]) == ("allow", "staff-only")
            denied = run_as(staff, 0)
            assert denied.returncode == 126 and "Operation not permitted" in denied.stderr
            rec = agent.wait_decision(str(staff), 2)[-1]
            assert (rec["decision"], rec["reason"], rec["rule_id"], rec["enforcement"]) == (
                "deny", "no-rule", None, "fanotify-deny")

            # owner: root's file runs, the same script owned by uid 1000 does not
            assert run_as(root_owned).returncode == 0
            assert agent.wait_decision(str(root_owned))[-1]["rule_id"] == "root-owned"
            assert run_as(user_owned).returncode == 126
            rec = agent.wait_decision(str(user_owned))[-1]
            assert (rec["decision"], rec["reason"]) == ("deny", "no-rule")


def test_monitor_rule_would_deny_leaves_no_ignore_mark_a_rename_could_carry(
        tmp_path: Path) -> None:
    """Review finding: a monitor rule's would-deny was answered like an allow, with a
    per-inode fanotify ignore mark. The mark survives a rename, so the same unsigned file
    moved into a path that an enforcing rule covers ran there unjudged and unrecorded."""
    with scoped_tmpfs("16m") as scope:
        trial = script(scope / "trial" / "new.sh")
        (scope / "prod").mkdir()
        policy = tmp_path / "policy.toml"
        policy.write_text(f"""
version = 1
mode = "enforce"
scopes = ["{scope}"]
fallthrough = "deny"
[trust]
keys = []

[[rules]]
id = "trial"
action = "deny"
mode = "monitor"
match = {{ paths = ["{scope}/trial"] }}
""")
        with running_agent(tmp_path, "--policy", str(policy), "--backend",
                           "fanotify-exec", "--no-prewarm") as agent:
            assert run_as(trial).returncode == 0
            assert agent.wait_decision(str(trial))[-1]["enforcement"] == "monitor"
            # every exec of a would-deny file is decided and recorded, not only the first
            assert run_as(trial).returncode == 0
            assert len(agent.wait_decision(str(trial), 2)) == 2

            moved = scope / "prod" / "new.sh"
            os.rename(trial, moved)  # same inode: an ignore mark would come along
            denied = run_as(moved)
            assert denied.returncode == 126 and "Operation not permitted" in denied.stderr
            rec = agent.wait_decision(str(moved))[-1]
            assert (rec["decision"], rec["reason"], rec["enforcement"]) == (
                "deny", "no-rule", "fanotify-deny")


def test_an_allow_earned_by_path_does_not_follow_the_file_through_a_rename(
        tmp_path: Path) -> None:
    """Review finding: an allow by a path rule put a fanotify ignore mark on the inode; the
    mark survives a rename, so the file moved into a denied directory on the same mount ran
    there unjudged. With path rules the agent keeps no ignore marks, so every exec is asked."""
    with scoped_tmpfs("16m") as scope:
        tool = script(scope / "tools" / "t.sh")
        (scope / "uploads").mkdir()
        policy = tmp_path / "policy.toml"
        policy.write_text(f"""
version = 1
mode = "enforce"
scopes = ["{scope}"]
fallthrough = "deny"
[trust]
keys = []

[[rules]]
id = "tools"
action = "allow"
match = {{ paths = ["{scope}/tools"] }}
""")
        with running_agent(tmp_path, "--policy", str(policy), "--backend",
                           "fanotify-exec", "--no-prewarm") as agent:
            for _ in range(2):  # the second exec would have been a kernel cache hit
                assert run_as(tool).returncode == 0
            assert agent.status()["sensor"].get("ignore_marks", 0) == 0
            moved = scope / "uploads" / "t.sh"
            os.rename(tool, moved)  # same inode
            denied = run_as(moved)
            assert denied.returncode == 126 and "Operation not permitted" in denied.stderr
            rec = agent.wait_decision(str(moved))[-1]
            assert (rec["decision"], rec["reason"], rec["enforcement"]) == (
                "deny", "no-rule", "fanotify-deny")
