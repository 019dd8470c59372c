"""``subject_of``: the policy's reading of a file's Go evidence, remembered per file version.

A file that is not Go is read in full by the runtime scan; the answer is kept for that
exact version (dev, ino, ctime, mtime, size), so a rewrite of the same inode is read again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from agent.digest import Artifact
from agent.policy import subject_of
from agent.policy.model import Subject
from tests import pclntab_synth as ps

GO_IMAGE = ps.image(ps.tables())
NOT_GO = ps.image(ps.Tables(b"\0" * len(GO_IMAGE), b""))


def subject(path: Path) -> Subject:
    with Artifact.open(str(path)) as art:
        return subject_of(art, 1000)


def test_a_fresh_file_is_read_at_every_decision(tmp_path: Path) -> None:
    """Two writes within one timestamp tick can leave (ctime, mtime, size) unchanged."""
    path = tmp_path / "fresh"
    path.write_bytes(NOT_GO)
    assert not subject(path).go
    os.truncate(path, 0)
    with open(path, "r+b") as fh:
        fh.write(GO_IMAGE[: len(NOT_GO)])
    assert subject(path).go_evidence == "runtime"


def test_runtime_evidence_reaches_the_subject(tmp_path: Path) -> None:
    path = tmp_path / "go-bare"
    path.write_bytes(GO_IMAGE)
    s = subject(path)
    assert (s.go, s.buildinfo, s.go_evidence) == (True, None, "runtime")
    assert s.go_runtime is not None and s.go_runtime.startswith("Go runtime pclntab (go1.20+")
    assert "no Go build info" in s.go_detail and s.owner_uid == os.getuid()


def test_a_rewrite_in_place_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "same-inode"
    path.write_bytes(NOT_GO)
    time.sleep(1.1)  # settled: now remembered (a fresh file would be read at every exec)
    first = subject(path)
    assert not first.go and first.go_evidence is None
    assert subject(path) == first  # the same version: the same answer
    ino = path.stat().st_ino
    with open(path, "r+b") as fh:  # same inode, same size, new bytes: ctime moves
        fh.write(GO_IMAGE)
    assert path.stat().st_ino == ino
    assert subject(path).go_evidence == "runtime"
