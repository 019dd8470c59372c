"""The decision-log schema: one object per Decision, back to the same Decision, and clear
errors naming the file, line and field for anything else."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Dict

import pytest

from agent.decision import Enforcement
from agent.hostid import record_host
from agent.record.decision_log import (
    SCHEMA_VERSION,
    LogFormatError,
    from_json,
    from_line,
    new_record_id,
    to_json,
    to_line,
)
from tests.record_fixtures import make_decision

TOP_KEYS = ["v", "id", "time", "time_ns", "host", "agent_version", "decision", "reason",
            "detail", "enforcement", "source", "event", "sha256", "evidence", "rule_id",
            "policy_version", "policy_digest", "go", "latency_us", "extra"]


def test_documented_shape() -> None:
    obj = to_json("abc", make_decision(3))
    assert list(obj) == TOP_KEYS
    assert obj["v"] == SCHEMA_VERSION and obj["decision"] == "deny"
    assert obj["time"] == "2026-11-18T11:06:40.000003Z"
    assert obj["host"] == record_host() and obj["host"]["hostname"] == socket.gethostname()
    assert list(obj["event"]) == ["pid", "ppid", "uid", "gid", "auid", "comm", "path", "dev", "ino",
                                  "ctime_ns", "size", "backend"]
    assert obj["evidence"]["kind"] == "sigstore-bundle-keyless"
    assert obj["evidence"]["log_index"] == 123456789
    assert obj["go"]["module"] == "github.com/acme/tool"
    with open(Path(__file__).resolve().parents[2] / "docs" / "records.md") as fh:
        doc = fh.read()
    for key in TOP_KEYS + list(obj["event"]):
        assert f"`{key}`" in doc, f"docs/records.md does not describe {key}"


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("allow", [True, False])
def test_round_trip(full: bool, allow: bool) -> None:
    d = make_decision(9, allow=allow, full=full, enforcement=Enforcement.POST_EXEC_KILL)
    line = to_line("id9", d)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = from_line(line, "f", 1)
    assert back.id == "id9" and back.decision == d and back.host == record_host()


def test_odd_paths_round_trip() -> None:
    for path in ["/tmp/a\nb", "/tmp/\udcff\udcfe", "/tmp/日本", '/tmp/"q"\\']:
        d = make_decision(1, path=path, comm="x\ty")
        line = to_line("i", d)
        assert line.count(b"\n") == 1
        assert from_line(line).decision == d


def _obj(**changes: Any) -> Dict[str, Any]:
    obj = json.loads(to_line("i", make_decision(1)))
    for k, v in changes.items():
        if v is KeyError:
            del obj[k]
        else:
            obj[k] = v
    return obj


@pytest.mark.parametrize("changes, problem", [
    ({"v": 2}, "schema version 2 is not supported"),
    ({"event": KeyError}, "missing field 'event'"),
    ({"reason": "nope"}, "field 'reason': unknown value 'nope'"),
    ({"enforcement": 3}, "field 'enforcement' must be str, not int"),
    ({"decision": "maybe"}, "field 'decision' must be 'allow' or 'deny'"),
    ({"policy_version": True}, "field 'policy_version' must be int, not bool"),
    ({"evidence": {"kind": "pgp", "source": "x"}}, "field 'kind': unknown value 'pgp'"),
    ({"evidence": []}, "field 'evidence' must be an object"),
])
def test_bad_records_name_the_problem(changes: Dict[str, Any], problem: str) -> None:
    with pytest.raises(LogFormatError) as info:
        from_json(_obj(**changes), "/var/log/execguard/decisions.jsonl", 12)
    assert str(info.value).startswith("/var/log/execguard/decisions.jsonl: line 12: ")
    assert problem in str(info.value)


def test_not_an_object() -> None:
    with pytest.raises(LogFormatError, match="line 3: a record must be a JSON object"):
        from_line(b"[1]\n", "f", 3)
    with pytest.raises(LogFormatError, match="line 4: not JSON"):
        from_line(b"\xff{", "f", 4)


def test_ids_are_unique_and_time_ordered() -> None:
    ids = [new_record_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)
    assert all(len(i) == 19 and int(i, 16) >= 0 for i in ids)


def test_records_name_the_host_that_wrote_them_and_older_records_still_read() -> None:
    """A fleet merges logs: each record says which host (hostname and machine-id, as
    `breakglass host-id` prints them) decided it; a record written before the field existed
    reads with no host, and a malformed host names the field."""
    obj = to_json("h1", make_decision(1), host={"hostname": "web-7", "machine_id": None})
    assert from_json(json.loads(json.dumps(obj))).host == {"hostname": "web-7",
                                                           "machine_id": None,
                                                           "boot_id": None}
    del obj["host"]
    assert from_json(obj).host is None
    obj["host"] = {"hostname": 7}
    with pytest.raises(LogFormatError, match="field 'hostname' must be str"):
        from_json(obj)


def test_a_record_read_back_keeps_the_host_and_version_that_wrote_it() -> None:
    """`denials --json` and `denials explain` on a fleet's logs show the writer's host and
    version, never the reviewer's."""
    other = {"hostname": "fleet-host-a", "machine_id": "0" * 32, "boot_id": "b"}
    obj = to_json("r1", make_decision(1), host=other)
    obj["agent_version"] = "0.0.9"
    back = from_json(json.loads(json.dumps(obj)))
    again = back.to_json()
    assert again["host"] == other and again["agent_version"] == "0.0.9"
    assert list(again) == TOP_KEYS
    del obj["host"], obj["agent_version"]  # a record from before both existed
    old = from_json(obj).to_json()
    assert old["host"] is None and old["agent_version"] is None
