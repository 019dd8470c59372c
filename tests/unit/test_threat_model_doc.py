"""docs/threat-model.md shows the outcomes the attack suite asserts (tests/attacks/ways.py
EXPECTED): the ways-in table is made from it and must not drift. When a fix changes an
outcome, the test that asserts it changes and so does this table: regenerate it with
``python -m tests.attacks.table`` and paste it between the markers."""

from __future__ import annotations

from pathlib import Path

from tests.attacks.table import BEGIN, END, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "threat-model.md"


def test_the_ways_table_is_the_one_the_tests_assert() -> None:
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC}: the table markers are missing"
    shown = text[text.index(BEGIN): text.index(END) + len(END)]
    assert shown == render(), (f"{DOC}: the ways-in table differs from tests/attacks/ways.py; "
                               "regenerate it with python -m tests.attacks.table")


def test_every_way_has_a_row() -> None:
    from tests.attacks.ways import WAYS

    text = DOC.read_text()
    missing = [w.name for w in WAYS if f"| `{w.name}`" not in text]
    assert not missing, f"{DOC}: no row for {missing}"
