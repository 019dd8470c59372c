"""`make cli-docs`: the man page and the bash completion, generated from the argparse
parsers (agent/cli) with Debian's python3-argparse-manpage and shtab (the test extras), so
they never disagree with `--help`. The generated files are kept in packaging/ (installed by
scripts/install.sh and the packages, which then need neither tool);
tests/unit/test_cli_docs.py fails when they are stale.

    python scripts/cli_docs.py          write them
    python scripts/cli_docs.py --check  exit 1 when a committed file differs
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[1]
MAN = REPO / "packaging" / "man" / "execguard.1"
COMPLETION = REPO / "packaging" / "completion" / "execguard.bash"
SUMMARY = "only Go binaries with a trusted cosign/Sigstore signature execute"


def generate() -> Dict[Path, str]:
    os.environ["COLUMNS"] = "80"  # argparse wraps help text at the terminal's width
    sys.path.insert(0, str(REPO))
    import shtab
    from build_manpages.manpage import Manpage

    from agent.cli import build_parser
    from agent.cli.exits import TABLE

    parser = build_parser()
    man = str(Manpage(parser)).rstrip("\n") + "\n"
    # whatis(1) and apropos(1) read the NAME line: "name \- what it does"
    man = man.replace(".SH NAME\nexecguard\n", f".SH NAME\nexecguard \\- {SUMMARY}\n", 1)
    # argparse-manpage leaves epilogs out: the one exit-code table gets its own section
    man += ".SH EXIT STATUS\n" + TABLE.replace("-", "\\-") + "\n"
    completion = shtab.complete(parser, shell="bash").rstrip("\n") + "\n"
    return {MAN: man, COMPLETION: completion}


def main(argv: list[str]) -> int:
    stale = []
    for path, text in generate().items():
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(REPO)))
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}: run 'make cli-docs'", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
