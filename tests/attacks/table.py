"""The ways-in table of docs/threat-model.md, made from ``ways.EXPECTED``: the table the tests
assert is the table the page shows (tests/unit/test_threat_model_doc.py checks that they are
the same). ``python -m tests.attacks.table`` prints it, to paste between the page's markers.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from tests.attacks.harness import User
from tests.attacks.ways import BPF_BACKENDS, WAYS, Expect, expected

BEGIN = "<!-- ways-table: made by python -m tests.attacks.table; do not edit by hand -->"
END = "<!-- /ways-table -->"
COLUMNS: Tuple[Tuple[str, str], ...] = (("fanotify-exec", "fanotify-exec"), ("kill", "kill"),
                                        ("bpf-lsm, fmod-ret", BPF_BACKENDS[0]))
WORD = {"BLOCKED": "blocked", "KILLED": "killed", "LATE": "late", "RUNS": "open"}


def _cell(way: str, backend: str, users: Tuple[User, ...], notes: Dict[str, int]) -> str:
    def word(e: Expect) -> str:
        text = WORD[e.outcome]
        if e.reason:
            number = notes.setdefault(e.reason, len(notes) + 1)
            text += f" [{number}]"
        return text

    words = {u: word(expected(way, backend, u)) for u in users}
    if len(set(words.values())) == 1:
        return next(iter(words.values()))
    return "; ".join(f"{u.value}: {w}" for u, w in words.items())


def render() -> str:
    notes: Dict[str, int] = {}
    lines: List[str] = [BEGIN, "", "| Way in | " + " | ".join(c for c, _ in COLUMNS) + " |",
                        "|---" * (len(COLUMNS) + 1) + "|"]
    for way in WAYS:
        cells = [_cell(way.name, backend, way.users, notes) for _, backend in COLUMNS]
        who = "" if way.as_nobody else " (root)"
        lines.append(f"| `{way.name}`{who}: {way.description} | " + " | ".join(cells) + " |")
    lines += ["", "Why **open** (or **late**), and what closes it:", ""]
    lines += [f"{n}. {reason}" for reason, n in sorted(notes.items(), key=lambda kv: kv[1])]
    lines += ["", END]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
