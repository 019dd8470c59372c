"""The CLI contract a fleet scripts against, run as subprocesses: an agent started with the
default flags is found by every other verb with theirs; "no agent" is exit 3 on every verb
that needs one, and with ``--json`` it is one JSON object on stdout; every verb's ``--help``
ends with the one exit-code table (agent/cli/exits.py).

The default-flags test runs in a private mount namespace with fresh tmpfs over /run, /var/lib
and /var/log: the agent's default socket, state and log directories exist only there, and
nothing of the host's is touched. Its scope is a tmpfs made in that namespace.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

from agent.cli import VERBS, build_parser
from agent.cli.exits import TABLE
from tests.agent_fixtures import REPO, cli

pytestmark = pytest.mark.timeout(240)

# every verb that talks to the agent, with what it needs besides the socket
AGENT_VERBS: List[List[str]] = [
    ["status"],
    ["stop", "--token", "{token}"],
    ["breakglass", "status"],
    ["breakglass", "apply", "{token}"],
    ["breakglass", "end"],
    ["policy", "apply", "{bundle}"],
]


@pytest.mark.parametrize("verb", AGENT_VERBS, ids=lambda v: " ".join(v[:2]).replace("{", ""))
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_no_agent_is_exit_3_on_every_verb_that_needs_one(tmp_path: Path, verb: List[str],
                                                         as_json: bool) -> None:
    (tmp_path / "token").write_text('{"payload": "x", "signatures": []}\n')
    (tmp_path / "bundle").write_text("{}\n")
    args = [a.format(token=tmp_path / "token", bundle=tmp_path / "bundle") for a in verb]
    missing = tmp_path / "nowhere" / "control.sock"
    for where in (["--socket", str(missing)], ["--state-dir", str(missing.parent)]):
        done = cli(*args, *where, *(["--json"] if as_json else []))
        assert done.returncode == 3, (args, where, done)
        if as_json:
            reply = json.loads(done.stdout)  # one object, and nothing else on stdout
            assert isinstance(reply, dict) and "no agent" in reply["error"], done.stdout
            assert str(missing) in reply["error"]
        else:
            assert done.stdout == "" and "no agent" in done.stderr, done


# every verb with --json, each given input it must refuse (a file that does not exist)
JSON_ERRORS: List[List[str]] = [
    ["verify", "{missing}"],
    ["goinfo", "{missing}"],
    ["policy", "verify", "{missing}", "--keys", "{tmp}"],
    ["policy", "lint", "{missing}"],
    ["policy", "diff", "{missing}", "{missing}"],
    ["policy", "whatif", "{missing}"],
    ["denials", "--log-dir", "{missing}"],
    ["denials", "explain", "abcdef0123", "--log-dir", "{missing}"],
    ["breakglass", "issue", "--host", "not-a-host-id", "--seconds", "60", "--reason", "r",
     "--key", "{missing}"],
    ["stop", "--token", "{missing}"],
    ["doctor", "--backend", "bpf-lsm", "--probe-timeout", "0"],
]


@pytest.mark.parametrize("verb", JSON_ERRORS, ids=lambda v: " ".join(v[:2]))
def test_every_json_error_is_one_object_on_stdout(tmp_path: Path, verb: List[str]) -> None:
    args = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in verb]
    done = cli(*args, "--json")
    assert done.returncode == 2, done
    reply = json.loads(done.stdout)  # the whole of stdout is one JSON object
    assert isinstance(reply, dict) and reply.get("error"), done.stdout


@pytest.mark.parametrize("verb", sorted(set(VERBS)))
def test_every_verb_help_ends_with_the_one_exit_code_table(verb: str) -> None:
    done = cli(verb, "--help")
    assert done.returncode == 0, done
    flat = " ".join(done.stdout.split())
    assert flat.endswith(TABLE), flat[-400:]


DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    for where in ("/run", "/var/lib", "/var/log", "/mnt"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "eg-cli", where],
                       check=True)
    scope = "/mnt/scope"
    os.mkdir(scope)
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--scope", scope,
                              "--backend", "fanotify-exec", "--audit", "off", "--quiet",
                              "--status-interval", "0", "--no-prewarm"],
                             stdout=subprocess.DEVNULL, stderr=open("/mnt/agent.err", "w"))
    out = {}
    try:
        deadline = time.monotonic() + 90
        while not os.path.exists("/run/execguard/control.sock"):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("no socket: " + open("/mnt/agent.err").read())
            time.sleep(0.1)
        open("/mnt/bundle", "w").write("{}\\n")
        for name, args in (("status", ["status", "--json"]),
                           ("breakglass status", ["breakglass", "status", "--json"]),
                           ("policy apply", ["policy", "apply", "/mnt/bundle", "--json"]),
                           ("denials", ["denials", "--json", "--all"])):
            deadline = time.monotonic() + 30
            while True:
                done = subprocess.run([sys.executable, "-m", "agent", *args],
                                      capture_output=True, text=True, timeout=60)
                if name != "status" or json.loads(done.stdout).get("state") != "starting" \\
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            out[name] = {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        out["run"] = sorted(os.listdir("/run/execguard"))
        out["state"] = sorted(os.listdir("/var/lib/execguard"))
    finally:
        agent.terminate()
        out["agent_rc"] = agent.wait(timeout=30)
    print(json.dumps(out))
""")


def test_an_agent_started_with_the_default_flags_is_found_by_every_verb_with_theirs() -> None:
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                           "-c", DRIVER], capture_output=True, text=True, timeout=200,
                          cwd=str(REPO))
    assert done.returncode == 0, done
    out: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    status = json.loads(out["status"]["stdout"])
    assert out["status"]["rc"] == 0 and status["socket"] == "/run/execguard/control.sock"
    assert status["state_dir"] == "/var/lib/execguard" and status["backend"] == "fanotify-exec"
    assert out["breakglass status"]["rc"] == 0, out["breakglass status"]
    # the agent answered: it refused the bundle (1 or 2), which is not "no agent" (3)
    applied = json.loads(out["policy apply"]["stdout"])
    assert out["policy apply"]["rc"] in (1, 2) and "no agent" not in json.dumps(applied), applied
    assert out["denials"]["rc"] in (0, 1), out["denials"]  # it found the agent's log dir
    assert "control.sock" in out["run"] and "control.sock" not in out["state"], out
    assert out["agent_rc"] == 0


def _parsers() -> Dict[str, argparse.ArgumentParser]:
    """Every verb's parser by its full name ("policy apply", "breakglass end", ...)."""
    out: Dict[str, argparse.ArgumentParser] = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(f"{prefix} {name}".strip(), sub)
        out[prefix] = parser

    walk("", build_parser())
    return out


def _options(parser: argparse.ArgumentParser) -> List[str]:
    return [o for action in parser._actions for o in action.option_strings]


def test_flags_that_name_the_same_thing_have_the_same_name_on_every_verb() -> None:
    parsers = _parsers()
    for verb in ("status", "stop", "breakglass apply", "breakglass status", "breakglass end",
                 "policy apply", "denials", "denials explain", "policy whatif", "run"):
        assert {"--state-dir", "--socket"} <= set(_options(parsers[verb])), verb
    for verb in ("run", "policy verify", "policy whatif"):
        assert "--policy-keys" in _options(parsers[verb]), verb
    for verb in ("run", "policy verify"):
        assert "--policy-threshold" in _options(parsers[verb]), verb
