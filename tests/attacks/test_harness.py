"""The harness's own rules, without an agent: how a run is classified, that the build cache
refuses a directory others could have planted programs in, that a file nobody cannot reach
is an ERROR (never a denial), and that the expectation table is complete."""

from __future__ import annotations

import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.attacks.harness import (
    Result,
    User,
    _safe_dir,
    build_all,
    classify,
    run_attack,
    unreachable,
)
from tests.attacks.ways import BACKENDS, EXPECTED, WAYS, expected

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("rc", "out", "err", "result"), [
    (0, "EG-PWNED payload\n", "", Result.RAN),
    (-signal.SIGKILL, "EG-PWNED payload\n", "", Result.RAN),  # ran, then a late kill
    (-signal.SIGKILL, "", "", Result.KILLED),
    (126, "", "EG-DENIED mmap: Operation not permitted\n", Result.DENIED),
    (1, "", "setpriv: failed to execute /x: Operation not permitted\n", Result.DENIED),
    (0, "EG-BENIGN\n", "ERROR: ld.so: object '/s/p.so' from LD_PRELOAD cannot be preloaded "
     "(failed to map segment from shared object): ignored.\n", Result.DENIED),
    # a setup step's own failure wins over any denial text in the same output
    (70, "", "mount: Permission denied\nEG-ERROR mount\n", Result.ERROR),
    (-signal.SIGSEGV, "", "", Result.ERROR),
    (0, "EG-BENIGN\n", "", Result.ERROR),
])
def test_classify(rc: int, out: str, err: str, result: Result) -> None:
    outcome = classify(["x"], rc, out, err, 0.0)
    assert outcome.result is result, outcome
    assert outcome.killed_after_marker == (result is Result.RAN and rc == -signal.SIGKILL)


def test_cache_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    planted = tmp_path / "cache"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    with pytest.raises(RuntimeError, match="closed to others"):
        _safe_dir(planted)


def test_nobody_cannot_reach_a_private_directory_and_that_is_an_error() -> None:
    with tempfile.TemporaryDirectory() as private:  # mkdtemp: 0700
        path = Path(private) / "prog"
        path.write_text("#!/bin/sh\necho EG-PWNED\n")
        path.chmod(0o755)
        assert unreachable(path, User.NOBODY) == f"nobody cannot search {private}"
        assert unreachable(path, User.ROOT) is None
        outcome = run_attack([str(path)], User.NOBODY)
        assert outcome.result is Result.ERROR and "setup" in outcome.detail


def test_a_deadline_is_an_error_and_kills_the_group() -> None:
    outcome = run_attack(["sh", "-c", "sleep 30.0417 & sleep 30.0417"], timeout=0.5)
    assert outcome.result is Result.ERROR and "deadline" in outcome.detail
    left = subprocess.run(["pgrep", "-f", "sleep 30.0417"], capture_output=True, timeout=10)
    assert left.stdout == b"", "a child of the attack outlived its deadline"


def test_every_program_builds_and_the_cache_is_reused() -> None:
    first = build_all()
    assert build_all() == first
    assert all(p.stat().st_mode & 0o005 == 0o005 for p in first.values())  # nobody: r-x


def test_every_way_has_an_expectation_for_every_backend_and_user() -> None:
    names = [w.name for w in WAYS]
    assert len(names) == len(set(names))
    assert set(EXPECTED) == set(names) | {k for k in EXPECTED if "/" in k}
    for way in WAYS:
        for backend in BACKENDS:
            for user in way.users:
                expected(way.name, backend, user)  # raises KeyError when missing
