"""``execguard policy whatif`` end to end on logs written by the real Recorder: exit codes,
text and JSON, bad lines (skipped with file:line, or an error with --strict), rotation,
time windows and policy bundles as candidates. Runs the command in-process (the same
``run`` the CLI calls) to stay fast; the integration test runs it as a subprocess."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from agent import signing
from agent.cli import main as cli_main
from agent.decision import Decision
from agent.errors import Reason
from agent.policy.bundle import build_bundle
from tests.review_fixtures import write_log
from tests.whatif_fixtures import APP, GO, by_key, keypair, record

CAND = """version = 3
mode = "enforce"
scopes = ["/srv"]
[trust]
keys = ["{pub}"]
[[rules]]
id = "go-signed"
action = "require-signature"
match = {{ go = true }}
[[rules]]
id = "rest"
action = "allow"
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> Tuple[int, str, str]:
    code = cli_main(["policy", "whatif", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def setup(tmp: Path, n_other: int = 3) -> Tuple[Path, Path, Path, List[str]]:
    """A log: 2 execs of APP signed by a, ``n_other`` of /srv/other signed by b, one unsigned
    script (allowed, not Go). Returns (log dir, candidate trusting a, candidate trusting b)."""
    _, pub_a, fp_a = keypair(tmp, "a")
    _, pub_b, fp_b = keypair(tmp, "b")
    recs: List[Decision] = [record(evidence=by_key(fp_a), n=i) for i in range(2)]
    recs += [record("/srv/other", evidence=by_key(fp_b, "/srv/other.sig"), n=10 + i,
                    uid=1001) for i in range(n_other)]
    recs.append(record("/srv/run.sh", go=None, evidence=None, sha256=None, rule_id="rest",
                       n=20))
    log = tmp / "log"
    ids = write_log(log, recs)
    cand_a, cand_b = tmp / "a.toml", tmp / "b.toml"
    cand_a.write_text(CAND.format(pub=pub_a))
    cand_b.write_text(CAND.format(pub=pub_b))
    return log, cand_a, cand_b, ids


def test_newly_denied_groups_and_exit_1(tmp_path: Path, capsys: Any) -> None:
    log, cand_a, _, _ = setup(tmp_path)
    code, out, err = run(capsys, str(cand_a), "--log", str(log))
    assert code == 1, out + err
    assert "summary: 3 same, 3 newly denied, 0 newly allowed, 0 unknown" in out
    assert "NEWLY DENIED:" in out and "/srv/other" in out and "deny (untrusted-key)" in out
    assert "method recorded-evidence" in out and "uid 1001" in out
    assert "result: 3 exec(s) would newly be denied (exit 1)" in out
    assert "signature: not applicable" in out


def test_json_and_exit_0_when_nothing_is_newly_denied(tmp_path: Path, capsys: Any) -> None:
    log, cand_a, cand_b, ids = setup(tmp_path, n_other=0)
    code, out, _ = run(capsys, str(cand_a), "--log", str(log), "--json", "--all")
    assert code == 0
    doc = json.loads(out)
    assert doc["summary"] == {"same": 3, "newly-denied": 0, "newly-allowed": 0, "unknown": 0}
    assert doc["candidate"]["kind"] == "policy" and doc["candidate"]["mode"] == "enforce"
    assert doc["candidate"]["signature_checked"] is None and doc["exit"] == 0
    app = next(g for g in doc["groups"] if g["binary"] == APP)
    assert app["change"] == "same" and app["count"] == 2 and app["reason"] == "ok"
    assert app["methods"] == {"recorded-evidence": 2} and app["example"]["id"] == ids[0]
    assert app["first_seen"] < app["last_seen"]
    # the other key: both APP execs newly denied
    code, out, _ = run(capsys, str(cand_b), "--log", str(log), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["summary"]["newly-denied"] == 2
    [group] = doc["groups"]
    assert group["reason"] == "untrusted-key" and group["blocks"] == 2
    assert group["recorded"] == {"allow (ok, rule go-signed)": 2}


def test_unknown_only_fails_with_fail_on_unknown(tmp_path: Path, capsys: Any) -> None:
    _, pub, _ = keypair(tmp_path, "a")
    write_log(tmp_path / "log", [record(evidence=None, sha256=None, rule_id="x")])
    cand = tmp_path / "c.toml"
    cand.write_text(CAND.format(pub=pub))
    code, out, _ = run(capsys, str(cand), "--log", str(tmp_path / "log"))
    assert code == 0 and "1 unknown" in out and "unknown: no-signature-evidence" in out
    code, out, _ = run(capsys, str(cand), "--log", str(tmp_path / "log"), "--fail-on-unknown")
    assert code == 1 and "--fail-on-unknown" in out


def test_bad_lines_are_skipped_with_file_and_line_or_fail_with_strict(
        tmp_path: Path, capsys: Any) -> None:
    log, cand_a, _, _ = setup(tmp_path, n_other=0)
    path = log / "decisions.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"v": 1, "id": "torn\n' + b"\xff\xfe not json\n"
                     + b"".join(lines[1:]))
    code, out, err = run(capsys, str(cand_a), "--log", str(log))
    assert code == 0 and "3 records" in out and "skipped 2 bad log lines" in out
    assert f"{path}: line 2:" in err and f"{path}: line 3:" in err
    assert "Traceback" not in err
    code, out, err = run(capsys, str(cand_a), "--log", str(log), "--strict", "--json")
    assert code == 2 and f"{path}: line 2:" in json.loads(out)["error"]
    assert "Traceback" not in err


def test_errors_exit_2_without_a_traceback(tmp_path: Path, capsys: Any) -> None:
    log, cand_a, _, _ = setup(tmp_path, n_other=0)
    code, _, err = run(capsys, str(tmp_path / "missing.toml"), "--log", str(log))
    assert code == 2 and "missing.toml" in err and "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\nmdoe = "enforce"\n')
    code, _, err = run(capsys, str(bad), "--log", str(log))
    assert code == 2 and "mdoe: unknown key" in err
    code, out, _ = run(capsys, str(cand_a), "--log", str(tmp_path / "nolog"), "--json")
    assert code == 2 and "nolog" in json.loads(out)["error"]
    code, _, err = run(capsys, str(cand_a), "--log", str(log), "--since", "yesterday")
    assert code == 2 and "--since" in err


def test_rotated_files_and_time_window(tmp_path: Path, capsys: Any) -> None:
    _, _, fp_a = keypair(tmp_path, "a")
    _, pub_b, _ = keypair(tmp_path, "b")
    log = tmp_path / "log"
    write_log(log, [record(evidence=by_key(fp_a), n=i) for i in range(40)], max_bytes=4000,
              keep=20)
    assert (log / "decisions.jsonl.1").exists()
    cand = tmp_path / "c.toml"
    cand.write_text(CAND.format(pub=pub_b))
    code, out, _ = run(capsys, str(cand), "--log", str(log), "--json")
    doc = json.loads(out)
    assert doc["records"] == 40 and len(doc["logs"]) > 1 and doc["summary"]["newly-denied"] == 40
    # record n is at 1_795_000_000 + n seconds
    since = datetime.fromtimestamp(1_795_000_030, tz=timezone.utc).isoformat()
    code, out, _ = run(capsys, str(cand), "--log", str(log), "--json", "--since", since)
    assert json.loads(out)["records"] == 10
    # one file only: exactly that file
    code, out, _ = run(capsys, str(cand), "--log", str(log / "decisions.jsonl"), "--json")
    assert code == 1 and json.loads(out)["records"] < 40


def test_group_by_sha256(tmp_path: Path, capsys: Any) -> None:
    _, _, fp_a = keypair(tmp_path, "a")
    _, pub_b, _ = keypair(tmp_path, "b")
    write_log(tmp_path / "log", [record(evidence=by_key(fp_a), n=0),
                                 record("/srv/copy", evidence=by_key(fp_a, "/srv/copy.sig"),
                                        n=1)])
    cand = tmp_path / "c.toml"
    cand.write_text(CAND.format(pub=pub_b))
    code, out, _ = run(capsys, str(cand), "--log", str(tmp_path / "log"), "--json",
                       "--group-by", "sha256")
    [group] = json.loads(out)["groups"]
    assert code == 1 and group["binary"] == "ab" * 32 and group["count"] == 2
    assert set(group["paths"]) == {APP, "/srv/copy"}


def test_a_bundle_candidate_says_whether_its_signature_was_checked(
        tmp_path: Path, capsys: Any) -> None:
    log, cand_a, _, _ = setup(tmp_path, n_other=1)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    env, _, snap = build_bundle(str(cand_a), None, now, now + timedelta(days=1))
    bundle = tmp_path / "cand.bundle"
    bundle.write_bytes(env.to_bytes())
    code, out, _ = run(capsys, str(bundle), "--log", str(log), "--json",
                       "--policy-keys", str(tmp_path / "nokeys"))
    doc: Dict[str, Any] = json.loads(out)
    assert code == 1 and doc["candidate"]["kind"] == "bundle"
    assert doc["candidate"]["signature_checked"] is False
    assert doc["candidate"]["digest"] == snap.digest and doc["summary"]["newly-denied"] == 1
    # signed by a pinned policy key: checked and reported
    root = signing.generate()
    pinned = tmp_path / "policy-keys"
    pinned.mkdir()
    (pinned / "root.pub").write_bytes(signing.public_pem(root.public_key()))
    bundle.write_bytes(env.signed_by(root).to_bytes())
    code, out, _ = run(capsys, str(bundle), "--log", str(log), "--policy-keys", str(pinned))
    assert code == 1 and "signature: checked against 1 pinned key(s)" in out
    assert "1 valid, 0 invalid" in out


def test_recorded_policy_by_digest(tmp_path: Path, capsys: Any) -> None:
    """A failed check replays as denied only when the recorded policy is known."""
    _, pub_a, _ = keypair(tmp_path, "a")
    old = tmp_path / "old.toml"
    old.write_text(CAND.format(pub=pub_a))
    from agent.policy import load_policy

    digest = load_policy(str(old)).digest
    write_log(tmp_path / "log", [record(allow=False, reason=Reason.BAD_SIGNATURE, go=GO,
                                        digest=digest)])
    stricter = tmp_path / "new.toml"
    stricter.write_text(CAND.format(pub=pub_a).replace("version = 3", "version = 4"))
    code, out, _ = run(capsys, str(stricter), "--log", str(tmp_path / "log"), "--json")
    assert code == 0 and json.loads(out)["summary"]["unknown"] == 1
    code, out, _ = run(capsys, str(stricter), "--log", str(tmp_path / "log"), "--json",
                       "--recorded-policy", str(old))
    doc = json.loads(out)
    assert code == 0 and doc["summary"]["same"] == 1
    assert doc["recorded_policies"][0]["known_as"] == str(old)
