"""agent/scope: what "in scope" means, from mount tables written out by hand.

Each table is what /proc/self/mountinfo shows in the case named; the classes are the ones
docs/threat-model.md ("Scope") promises. Pure: no mounts are made here (the integration
test tests/integration/test_scope_live.py makes real ones).
"""

from __future__ import annotations

import os
from typing import List

import pytest

from agent.scope import FsClass, classify
from agent.scope.mountinfo import Mount, fs_relative, overlay_layers, parse

ROOT = os.makedev(254, 0)
TMPFS = os.makedev(0, 40)
OTHER = os.makedev(0, 41)
OVERLAY = os.makedev(0, 50)
PROC = os.makedev(0, 21)

BASE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,mode=755
"""


def table(*extra: str) -> List[Mount]:
    return parse(BASE + "".join(line + "\n" for line in extra))


def test_everything_in_scope_puts_every_filesystem_in_but_the_pseudo_ones() -> None:
    view = classify(table("40 27 0:40 / /srv rw - tmpfs t rw"), ["/"])
    assert view.class_of(ROOT) is FsClass.IN and view.class_of(TMPFS) is FsClass.IN
    assert view.class_of(PROC) is FsClass.OUT
    # devtmpfs can hold an executable (root can create one in /dev): never out by its type
    assert view.class_of(os.makedev(0, 6)) is FsClass.IN
    assert view.partial is False


def test_a_directory_scope_makes_its_filesystem_partial() -> None:
    view = classify(table("40 27 0:40 / /tmp rw - tmpfs t rw"), ["/opt/app"])
    assert view.class_of(ROOT) is FsClass.PARTIAL and view.subtrees[ROOT] == ("/opt/app",)
    assert view.class_of(TMPFS) is FsClass.OUT and view.partial
    assert view.in_scope(ROOT, "/opt/app/bin/x") and not view.in_scope(ROOT, "/usr/bin/x")
    assert not view.in_scope(ROOT, "/opt/apple")


def test_a_mount_point_scope_is_in_and_the_directory_it_hides_is_not_a_scope() -> None:
    view = classify(table("40 27 0:40 / /opt/app rw - tmpfs t rw"), ["/opt/app"])
    assert view.class_of(TMPFS) is FsClass.IN
    assert view.class_of(ROOT) is FsClass.OUT  # /opt/app on the root fs is covered


def test_a_filesystem_mounted_inside_a_scope_is_in_as_a_whole() -> None:
    view = classify(table("40 27 0:40 / /opt/app/cache rw - tmpfs t rw"), ["/opt/app"])
    assert view.class_of(TMPFS) is FsClass.IN
    assert view.class_of(ROOT) is FsClass.PARTIAL


def test_a_bind_mount_of_a_scope_elsewhere_keeps_the_same_subtree() -> None:
    """/opt/app bound onto /mnt/x: the root field says which directory it shows. The kernel
    finds /opt/app's directory above a file reached through /mnt/x; user space maps the file
    back to the path it has in the scope."""
    mounts = table("41 27 254:0 /opt/app /mnt/x rw - ext4 /dev/vda rw")
    view = classify(mounts, ["/opt/app"])
    assert view.subtrees[ROOT] == ("/opt/app",)
    assert fs_relative(mounts, "/mnt/x/bin/tool") == (ROOT, "/opt/app/bin/tool")
    assert view.in_scope(*fs_relative(mounts, "/mnt/x/bin/tool"))  # type: ignore[misc]


def test_a_scope_inside_a_bind_mount_maps_to_the_directory_it_shows() -> None:
    mounts = table("40 27 0:40 / /data rw - tmpfs t rw",
                   "41 27 0:40 /exports/app /srv/app rw - tmpfs t rw")
    view = classify(mounts, ["/srv/app/bin"])
    assert view.class_of(TMPFS) is FsClass.PARTIAL
    assert view.subtrees[TMPFS] == ("/exports/app/bin",)
    assert view.in_scope(TMPFS, "/exports/app/bin/tool")  # also as /data/exports/app/bin/tool


def test_an_overlay_is_in_when_a_layer_is_in_scope() -> None:
    mounts = table("50 27 0:50 / /run/ov rw - overlay overlay "
                   "rw,lowerdir=/opt/app:/usr,upperdir=/var/up,workdir=/var/work")
    view = classify(mounts, ["/opt/app"])
    assert view.class_of(OVERLAY) is FsClass.IN
    assert any("overlay at /run/ov" in n for n in view.notes)


def test_an_overlay_is_in_when_a_scope_lies_inside_a_layer() -> None:
    mounts = table("50 27 0:50 / /run/ov rw - overlay overlay rw,lowerdir=/opt,upperdir=/u,"
                   "workdir=/w")
    assert classify(mounts, ["/opt/app"]).class_of(OVERLAY) is FsClass.IN


def test_an_overlay_of_layers_outside_every_scope_is_out() -> None:
    mounts = table("50 27 0:50 / /var/lib/c/merged rw - overlay overlay "
                   "rw,lowerdir=/var/lib/c/l1:/var/lib/c/l2,upperdir=/var/lib/c/u,"
                   "workdir=/var/lib/c/w")
    assert classify(mounts, ["/opt/app"]).class_of(OVERLAY) is FsClass.OUT


@pytest.mark.parametrize("options", [
    "rw,lowerdir=relative/path,upperdir=/u,workdir=/w",  # cannot be placed
    "rw,xino=off",  # no layers at all: options we cannot read
])
def test_an_overlay_whose_layers_cannot_be_read_is_in(options: str) -> None:
    mounts = table(f"50 27 0:50 / /run/ov rw - overlay overlay {options}")
    view = classify(mounts, ["/opt/app"])
    assert view.class_of(OVERLAY) is FsClass.IN


def test_an_unseen_filesystem_is_in_scope() -> None:
    view = classify(table(), ["/opt/app"])
    assert view.class_of(OTHER) is FsClass.IN  # mounted since, or only in another namespace


def test_mountinfo_escapes_and_overlay_separators() -> None:
    [m] = parse("60 27 0:60 / /mnt/with\\040space rw - tmpfs t rw\n")
    assert m.point == "/mnt/with space"
    assert overlay_layers("rw,lowerdir=/a\\:b:/c,upperdir=/d\\,e,workdir=/w") == [
        "/a:b", "/c", "/d,e"]
    assert parse("garbage\n27 1 254:0 / / rw\n") == []  # a truncated line is skipped
