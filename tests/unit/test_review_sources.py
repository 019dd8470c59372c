"""agent/review/sources.py: the raw-line prefilter of `denials --host` skips only lines that
cannot match; what it lets through is filtered on the parsed record."""

from __future__ import annotations

import json
from pathlib import Path

from agent.record.decision_log import to_json
from agent.review.query import build_query
from agent.review.sources import log_paths, read_records
from tests.record_fixtures import make_decision


def test_the_host_prefilter_never_drops_a_match(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    lines = []
    for n, (name, comm) in enumerate((("web-1", "web-2"), ("web-2", "a"), ("db-1", "b"))):
        host = {"hostname": name, "machine_id": f"{n}" * 32, "boot_id": None}
        lines.append(json.dumps(to_json(f"r{n}", make_decision(n, comm=comm), host=host)))
    old = to_json("old", make_decision(9))
    del old["host"]
    lines.append(json.dumps(old))
    log.write_text("\n".join(lines) + "\n")
    query = build_query(hosts=["web-2"], include_allowed=True)
    passed = list(read_records([str(log)], lambda e: None, needles=query.needles()))
    # web-1's record has "web-2" as its command name: the prefilter lets it through (it only
    # looks at bytes), the query does not
    assert [r.id for r in passed] == ["r0", "r1"]
    assert [r.id for r in passed if query.matches(r)] == ["r1"]
    by_id = build_query(hosts=["2" * 32], include_allowed=True)
    assert [r.id for r in read_records([str(log)], lambda e: None, needles=by_id.needles())
            if by_id.matches(r)] == ["r2"]


def test_a_rotated_file_that_vanishes_while_a_live_log_is_read_is_skipped(
        tmp_path: Path) -> None:
    """The agent's rotation deletes the oldest file at any time; a review of a live log
    reads what is still there and reports nothing for what went."""
    for name in ("decisions.jsonl.2", "decisions.jsonl.1", "decisions.jsonl"):
        (tmp_path / name).write_text(json.dumps(to_json(name, make_decision(1))) + "\n")
    paths = log_paths([str(tmp_path)])
    assert [Path(p).name for p in paths] == ["decisions.jsonl.2", "decisions.jsonl.1",
                                             "decisions.jsonl"]
    (tmp_path / "decisions.jsonl.2").unlink()
    errors: list = []  # type: ignore[type-arg]
    assert [r.id for r in read_records(paths, errors.append)] == ["decisions.jsonl.1",
                                                                  "decisions.jsonl"]
    assert errors == []
