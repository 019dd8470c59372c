"""Review at fleet size: `denials` and `policy whatif` read a collector's tree of many hosts'
logs (recursively, rotated files compressed by logrotate included), several trees at once,
or standard input, and `--host` picks one host's records by hostname or machine-id."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path
from typing import Dict, List

from agent.record.decision_log import to_json
from tests.record_fixtures import make_decision
from tests.review_fixtures import ENTRY, denials

HOSTS = {"web-1": "1" * 32, "web-2": "2" * 32}


def host_log(directory: Path, hostname: str, first: int, rotated_gz: bool) -> List[str]:
    """Two denials written by ``hostname`` (one in a rotated file, gzipped if asked)."""
    directory.mkdir(parents=True)
    host = {"hostname": hostname, "machine_id": HOSTS[hostname], "boot_id": "b"}
    ids = []
    for n, name in ((first, "decisions.jsonl.1"), (first + 1, "decisions.jsonl")):
        rid = f"{hostname}-{n}"
        line = json.dumps(to_json(rid, make_decision(n), host=host)) + "\n"
        if name.endswith(".1") and rotated_gz:
            with gzip.open(directory / (name + ".gz"), "wt") as fh:
                fh.write(line)
        else:
            (directory / name).write_text(line)
        ids.append(rid)
    return ids


def ids_of(stdout: str) -> List[str]:
    return [json.loads(line)["id"] for line in stdout.splitlines()]


def fleet(tmp_path: Path) -> Dict[str, List[str]]:
    return {"web-1": host_log(tmp_path / "collector" / "web-1", "web-1", 1, rotated_gz=True),
            "web-2": host_log(tmp_path / "collector" / "dc2" / "web-2", "web-2", 10,
                              rotated_gz=False)}


def test_a_collectors_tree_reads_recursively_gz_included_in_rotation_order(
        tmp_path: Path) -> None:
    ids = fleet(tmp_path)
    done = denials("--log-dir", str(tmp_path / "collector"), "--json")
    assert done.returncode == 0, done.stderr
    # directories in path order (dc2/web-2 before web-1), each oldest file first
    assert ids_of(done.stdout) == ids["web-2"] + ids["web-1"]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["host"]["hostname"] for r in records} == {"web-1", "web-2"}


def test_host_picks_one_hosts_records_by_name_or_machine_id(tmp_path: Path) -> None:
    ids = fleet(tmp_path)
    by_name = denials("--log-dir", str(tmp_path / "collector"), "--host", "web-1", "--json")
    assert by_name.returncode == 0 and ids_of(by_name.stdout) == ids["web-1"]
    by_id = denials("--log-dir", str(tmp_path / "collector"), "--host", HOSTS["web-2"],
                    "--json")
    assert by_id.returncode == 0 and ids_of(by_id.stdout) == ids["web-2"]
    nobody = denials("--log-dir", str(tmp_path / "collector"), "--host", "db-9", "--json")
    assert nobody.returncode == 1 and nobody.stdout == ""


def test_several_places_and_standard_input(tmp_path: Path) -> None:
    ids = fleet(tmp_path)
    both = denials("--log-dir", str(tmp_path / "collector" / "web-1"),
                   "--log-dir", str(tmp_path / "collector" / "dc2"), "--json")
    assert both.returncode == 0 and ids_of(both.stdout) == ids["web-1"] + ids["web-2"]
    piped = subprocess.run([*ENTRY, "denials", "--log-dir", "-", "--json"],
                           input=(tmp_path / "collector" / "dc2" / "web-2" /
                                  "decisions.jsonl").read_text(),
                           capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and ids_of(piped.stdout) == ids["web-2"][1:]
    one = denials("--log-dir", str(tmp_path / "collector" / "web-1" / "decisions.jsonl.1.gz"),
                  "--json")
    assert one.returncode == 0 and ids_of(one.stdout) == ids["web-1"][:1]
    explained = denials("explain", ids["web-2"][0], "--log-dir", str(tmp_path / "collector"),
                        "--json")
    assert explained.returncode == 0, explained.stderr
    assert json.loads(explained.stdout)["record"]["host"]["hostname"] == "web-2"


def test_whatif_replays_a_fleets_tree(tmp_path: Path) -> None:
    fleet(tmp_path)
    candidate = tmp_path / "candidate.toml"
    candidate.write_text('version = 1\nmode = "enforce"\nscopes = ["/"]\n'
                         '[[rules]]\nid = "all"\naction = "allow"\n')
    done = subprocess.run([*ENTRY, "policy", "whatif", str(candidate), "--log",
                           str(tmp_path / "collector"), "--json"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    assert report["records"] == 4, report
