"""The digest reads from the fd the verifier opened, at OpenSSL speed, and refuses odd inputs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.digest import Artifact, hash_fd
from agent.errors import InputError


def test_sha256_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    for size in (0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 17):
        data = os.urandom(size)
        p = tmp_path / f"f{size}"
        p.write_bytes(data)
        with Artifact.open(str(p)) as art:
            assert art.sha256 == hashlib.sha256(data).digest()
            assert art.size == size
            assert art.digest("sha384") == hashlib.sha384(data).digest()


def test_digest_comes_from_the_opened_fd_not_the_path(tmp_path: Path) -> None:
    p = tmp_path / "bin"
    p.write_bytes(b"original")
    with Artifact.open(str(p)) as art:
        # an attacker swaps the path after the open: the verdict must cover what was opened
        (tmp_path / "evil").write_bytes(b"replacement")
        os.rename(tmp_path / "evil", p)
        assert art.sha256 == hashlib.sha256(b"original").digest()


def test_file_growing_while_hashed_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "grow"
    p.write_bytes(b"a" * 100)
    with Artifact.open(str(p)) as art:
        with open(p, "ab") as fh:
            fh.write(b"more")
        with pytest.raises(InputError, match="changed while hashing"):
            art.digest()


def test_hash_fd_leaves_offset_alone(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.lseek(fd, 4, os.SEEK_SET)
        assert hash_fd(fd) == hashlib.sha256(b"x" * 10).digest()
        assert os.lseek(fd, 0, os.SEEK_CUR) == 4
    finally:
        os.close(fd)


def test_directory_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        Artifact.open(str(tmp_path))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope: No such file"):
        Artifact.open(str(tmp_path / "nope"))


def test_special_files_are_refused() -> None:
    with pytest.raises(InputError, match="not a regular file"):
        Artifact.open("/dev/null")


def test_size_limit(tmp_path: Path) -> None:
    p = tmp_path / "big"
    p.write_bytes(b"z" * 1000)
    with pytest.raises(InputError, match="over the 999-byte limit"):
        Artifact.open(str(p), max_size=999)


def test_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        Artifact.open(str(fifo))
