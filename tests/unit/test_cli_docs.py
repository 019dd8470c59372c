"""The man page and the bash completion (packaging/man, packaging/completion) are generated
from the argparse parsers by scripts/cli_docs.py: they must match what the parsers say now,
render, and complete in a real bash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPLETION = REPO / "packaging" / "completion" / "execguard.bash"
MAN = REPO / "packaging" / "man" / "execguard.1"


def test_the_committed_man_page_and_completion_are_what_the_parsers_say_now() -> None:
    done = subprocess.run([sys.executable, "scripts/cli_docs.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_man_page_renders_with_every_verb_and_the_exit_codes() -> None:
    done = subprocess.run(["man", "-l", "-P", "cat", str(MAN)], capture_output=True,
                          text=True, timeout=60, env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert text.startswith("execguard(1)") and "execguard - only Go binaries" in text
    for verb in ("verify", "goinfo", "doctor", "run", "status", "stop", "denials", "breakglass",
                 "policy apply", "policy whatif"):
        assert f"execguard {verb}" in text, verb
    assert "3 no agent answers on the control socket" in text


def complete(*words: str) -> List[str]:
    """What bash offers after ``words`` (the last one is the word being completed)."""
    script = (f'source {COMPLETION}; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); '
              '_shtab_execguard; printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


@pytest.mark.parametrize("words,offered", [
    (("execguard", "po"), ["policy"]),
    (("execguard", "policy", ""), ["build", "sign", "verify", "lint", "diff", "apply", "whatif"]),
    (("execguard", "run", "--back"), ["--backend"]),
    (("execguard", "run", "--backend", ""),
     ["auto", "bpf-lsm", "fmod-ret", "fanotify-exec", "fanotify-open", "kill", "audit-only"]),
    (("execguard", "breakglass", "is"), ["issue"]),
    (("execguard", "status", "--so"), ["--socket"]),
])
def test_bash_completes_verbs_nested_verbs_options_and_choices(words: List[str],
                                                                offered: List[str]) -> None:
    assert complete(*words) == offered
