"""``execguard policy whatif`` on a log the real agent wrote: the agent runs in monitor mode
with fanotify on a tmpfs scope this test owns, real Go binaries (signed by key a, by key b,
and unsigned) and a script are exec'd, the agent is stopped, then candidate policies are
replayed with ``python -m agent policy whatif`` and the groups and exit codes checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from tests.agent_fixtures import REPO, exec_file, running_agent, scoped_tmpfs
from tests.policy_fixtures import Material, copy_signed, material_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(240)

RULES = """
[[rules]]
id = "go-signed"
action = "require-signature"
match = {{ go = true }}
{go}
[[rules]]
id = "not-go"
action = "allow"
match = {{ go = false }}
"""


def policy_text(tmp: Path, scope: Path, mode: str, keys: List[Path], go: str = "",
                extra_rules: str = "") -> str:
    key_list = ", ".join(f'"{k}"' for k in keys)
    # state_dir/log_dir as the agent runner passes them: the recorded digest is this file's
    return (f'version = 1\nmode = "{mode}"\nscopes = ["{scope}"]\nfallthrough = "allow"\n'
            f'state_dir = "{tmp / "state"}"\nlog_dir = "{tmp / "log"}"\n'
            f'[trust]\nkeys = [{key_list}]\n' + extra_rules + RULES.format(go=go))


def whatif(*args: str) -> Tuple[int, Dict[str, Any], str]:
    proc = subprocess.run([sys.executable, "-m", "agent", "policy", "whatif", *args, "--json"],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def groups(doc: Dict[str, Any]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    return {(Path(g["binary"]).parent.name, g["change"]): g for g in doc["groups"]}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory,
             material: Material) -> Iterator[Dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("whatif")
    with scoped_tmpfs() as scope:
        bins = {
            "signed-a": copy_signed(material.bins["app"], scope / "signed-a",
                                    material.private["a"]),
            "signed-b": copy_signed(material.bins["tool"], scope / "signed-b",
                                    material.private["b"]),
            "dirty-a": copy_signed(material.bins["app-dirty"], scope / "dirty-a",
                                   material.private["a"]),
            "unsigned": copy_signed(material.bins["app"], scope / "unsigned", None),
        }
        (scope / "script").mkdir()
        bins["script"] = scope / "script" / "run.sh"
        shutil.copy2(material.script, bins["script"])
        recorded_policy = tmp / "recorded.toml"
        recorded_policy.write_text(policy_text(tmp, scope, "monitor", [material.keys["a"]]))
        with running_agent(tmp, "--policy", str(recorded_policy), "--backend",
                           "fanotify-exec", "--audit", "off") as agent:
            for name, path in bins.items():
                # monitor: all run; an allowed file is then ignore-marked (not asked again)
                assert exec_file(path).returncode == 0, name
                agent.wait_decision(str(path))
            decisions = agent.decisions()
        # the agent is stopped: the log is complete; the files stay for --reverify
        yield {"tmp": tmp, "scope": scope, "log": tmp / "log", "bins": bins,
               "recorded": recorded_policy, "decisions": decisions, "material": material}


def test_the_log_holds_what_the_replay_needs(recorded: Dict[str, Any]) -> None:
    by_path = {d["event"]["path"]: d for d in recorded["decisions"]}
    a = by_path[str(recorded["bins"]["signed-a"])]
    assert a["decision"] == "allow" and a["evidence"]["key_fingerprint"].startswith("sha256:")
    assert a["go"]["go_version"].startswith("go1.") and a["go"]["vcs.modified"] == "false"
    assert by_path[str(recorded["bins"]["signed-b"])]["reason"] == "bad-signature"
    assert by_path[str(recorded["bins"]["unsigned"])]["reason"] == "no-signature"
    assert by_path[str(recorded["bins"]["script"])]["go"] is None


def test_the_same_policy_enforced_changes_nothing(recorded: Dict[str, Any]) -> None:
    tmp, scope, m = recorded["tmp"], recorded["scope"], recorded["material"]
    cand = tmp / "enforce.toml"
    cand.write_text(policy_text(tmp, scope, "enforce", [m.keys["a"]]))
    code, doc, _ = whatif(str(cand), "--log", str(recorded["log"]),
                          "--recorded-policy", str(recorded["recorded"]))
    assert code == 0, doc
    assert doc["summary"] == {"same": len(recorded["decisions"]), "newly-denied": 0,
                              "newly-allowed": 0, "unknown": 0}
    assert doc["recorded_policies"][0]["known_as"] == str(recorded["recorded"])


def test_enforce_with_another_key(recorded: Dict[str, Any]) -> None:
    tmp, scope, m = recorded["tmp"], recorded["scope"], recorded["material"]
    cand = tmp / "key-b.toml"
    cand.write_text(policy_text(tmp, scope, "enforce", [m.keys["b"]]))
    code, doc, _ = whatif(str(cand), "--log", str(recorded["log"]),
                          "--recorded-policy", str(recorded["recorded"]))
    assert code == 1
    g = groups(doc)
    signed_a = g[("signed-a", "newly-denied")]
    assert signed_a["count"] == 1 and signed_a["reason"] == "untrusted-key"
    assert signed_a["methods"] == {"recorded-evidence": 1} and signed_a["blocks"] == 1
    assert g[("dirty-a", "newly-denied")]["reason"] == "untrusted-key"
    # signed by b, but the log only knows the check under key a failed: unknown, not allow
    unknown = g[("signed-b", "unknown")]
    assert unknown["verdict"] == "unknown" and unknown["reason"] == "new-signers"
    assert doc["summary"]["same"] == 2  # the unsigned Go binary (denied) and the script
    # --reverify checks the file, unchanged on disk, with the real verifier
    code, doc, _ = whatif(str(cand), "--log", str(recorded["log"]), "--reverify",
                          "--recorded-policy", str(recorded["recorded"]))
    g = groups(doc)
    assert g[("signed-b", "newly-allowed")]["methods"] == {"reverified": 1}
    assert g[("signed-a", "newly-denied")]["methods"] == {"reverified": 1}
    assert doc["summary"]["unknown"] == 0 and code == 1


def test_a_deny_rule_on_a_path(recorded: Dict[str, Any]) -> None:
    tmp, scope, m = recorded["tmp"], recorded["scope"], recorded["material"]
    deny = (f'[[rules]]\nid = "no-script"\naction = "deny"\n'
            f'match = {{ paths = ["{scope}/script"] }}\n')
    cand = tmp / "deny.toml"
    cand.write_text(policy_text(tmp, scope, "enforce", [m.keys["a"]], extra_rules=deny))
    code, doc, _ = whatif(str(cand), "--log", str(recorded["log"]),
                          "--recorded-policy", str(recorded["recorded"]))
    assert code == 1
    [changed] = [g for g in doc["groups"] if g["change"] != "same"]
    assert changed["binary"] == str(recorded["bins"]["script"])
    assert (changed["change"], changed["reason"]) == ("newly-denied", "policy-deny")
    assert changed["rules"] == {"no-script": 1} and changed["methods"] == {"policy": 1}


def test_go_predicates_on_the_recorded_build_info(recorded: Dict[str, Any]) -> None:
    tmp, scope, m = recorded["tmp"], recorded["scope"], recorded["material"]
    cand = tmp / "go.toml"
    cand.write_text(policy_text(tmp, scope, "enforce", [m.keys["a"]],
                                go='go = { min_version = "1.99", deny_vcs_modified = true }'))
    code, doc, _ = whatif(str(cand), "--log", str(recorded["log"]), "--all",
                          "--recorded-policy", str(recorded["recorded"]))
    assert code == 1
    g = groups(doc)
    for name in ("signed-a", "dirty-a"):
        group = g[(name, "newly-denied")]
        assert group["reason"] == "go-predicate" and "older than 1.99" in \
            group["example"]["detail"]
    # bad signature / unsigned stay denied, as recorded under the same trust
    assert ("signed-b", "same") in g and ("unsigned", "same") in g
    cand.write_text(policy_text(tmp, scope, "enforce", [m.keys["a"]],
                                go="go = { deny_vcs_modified = true }"))
    code, doc, _ = whatif(str(cand), "--log", str(recorded["log"]),
                          "--recorded-policy", str(recorded["recorded"]))
    [changed] = [g for g in doc["groups"] if g["change"] != "same"]
    assert Path(changed["binary"]).parent.name == "dirty-a"
    assert "vcs.modified=true" in changed["example"]["detail"] and code == 1


def test_text_output_and_a_broken_log_line(recorded: Dict[str, Any]) -> None:
    tmp, scope, m = recorded["tmp"], recorded["scope"], recorded["material"]
    log = tmp / "broken-log"
    shutil.copytree(recorded["log"], log)
    with open(log / "decisions.jsonl", "ab") as fh:
        fh.write(b'{"v": 1, "id": "cut sho')
    cand = tmp / "key-b-text.toml"
    cand.write_text(policy_text(tmp, scope, "enforce", [m.keys["b"]]))
    proc = subprocess.run([sys.executable, "-m", "agent", "policy", "whatif", str(cand),
                           "--log", str(log)], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "NEWLY DENIED:" in proc.stdout and str(recorded["bins"]["signed-a"]) in proc.stdout
    assert "skipped 1 bad log lines" in proc.stdout
    lines = len((log / "decisions.jsonl").read_bytes().splitlines())
    assert f"decisions.jsonl: line {lines}:" in proc.stderr
    strict = subprocess.run([sys.executable, "-m", "agent", "policy", "whatif", str(cand),
                             "--log", str(log), "--strict"], capture_output=True, text=True,
                            timeout=120, cwd=str(REPO))
    assert strict.returncode == 2 and f"line {lines}" in strict.stderr
    assert "Traceback" not in strict.stderr
