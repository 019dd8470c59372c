"""agent.fileio: every path an operator names is read bounded, and never hangs on a FIFO."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import InputError, MalformedInput
from agent.fileio import read_small_file


def test_reads_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "k.pub"
    f.write_bytes(b"x" * 10)
    assert read_small_file(str(f), 10, "a key") == b"x" * 10


def test_refusals_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="No such file") as info:
        read_small_file(str(tmp_path / "missing"), 10, "a key")
    assert info.value.path == str(tmp_path / "missing")
    with pytest.raises(InputError, match="is a directory, not a key"):
        read_small_file(str(tmp_path), 10, "a key")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open would hang here
    with pytest.raises(InputError, match="is not a regular file"):
        read_small_file(str(fifo), 10, "a key")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 11)
    with pytest.raises(MalformedInput, match="larger than 10 bytes, not a key"):
        read_small_file(str(big), 10, "a key")
