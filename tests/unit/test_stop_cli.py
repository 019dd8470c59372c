"""``execguard stop`` as operators run it: a subprocess, its exit codes (0 stopping,
1 rejected, 2 usage or input error, 3 no agent) and ``--json`` (one object on stdout).

The agent side here is a real control server answered by a real Agent object with the
break-glass and stop verbs (no kernel backend; tests/unit/test_breakglass_agent.py builds
it); the running agent is tests/integration/test_authorized_stop.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from agent import signing
from agent.breakglass.overlay import BreakGlass
from agent.breakglass.stop import register as register_stop
from agent.breakglass.token import local_host_id
from agent.control import ControlServer
from agent.daemon import Agent
from tests.agent_fixtures import cli
from tests.unit.test_breakglass_agent import make_agent


def one_json(done: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("stopkeys")
    path = base / "ops.key"
    path.write_bytes(signing.plain_private_pem(signing.generate("ecdsa-p256")))
    return path


def issue_cli(key: Path, out: Path, grant: str, host: str = "") -> Path:
    done = cli("breakglass", "issue", "--host", host or local_host_id().text(), "--seconds",
               "300", "--reason", "retire web-1", "--key", str(key), "--grant", grant,
               "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_help_says_what_it_does() -> None:
    done = cli("stop", "--help")
    text = " ".join(done.stdout.split())
    assert done.returncode == 0
    assert "--grant stop" in text and "keep-enforcing" in text
    assert "only way to end enforcement short of a reboot" in text
    assert "3 no agent" in text
    assert "stop" in cli("--help").stdout


def test_no_agent_is_exit_3(tmp_path: Path, key_file: Path) -> None:
    token = issue_cli(key_file, tmp_path / "stop.tok", "stop")
    state = str(tmp_path / "nothing")
    done = cli("stop", "--token", str(token), "--state-dir", state)
    assert done.returncode == 3 and "no agent" in done.stderr and done.stdout == ""
    done = cli("stop", "--token", str(token), "--socket", str(tmp_path / "none.sock"),
               "--json")
    assert done.returncode == 3 and "no agent" in one_json(done)["error"]


def test_unreadable_token_file_is_exit_2(tmp_path: Path) -> None:
    state = str(tmp_path / "nothing")
    (tmp_path / "big.tok").write_bytes(b"x" * 10000)
    for path, message in ((tmp_path / "absent.tok", "absent.tok"),
                          (tmp_path, str(tmp_path)),  # a directory
                          (tmp_path / "big.tok", "not a break-glass token")):
        done = cli("stop", "--token", str(path), "--state-dir", state)
        assert done.returncode == 2, (path, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.startswith("execguard stop: ")
        assert message in done.stderr
        done = cli("stop", "--token", str(path), "--state-dir", state, "--json")
        assert done.returncode == 2 and message in one_json(done)["error"]
    done = cli("stop", "--token", str(tmp_path / "absent.tok"), "--state-dir", state,
               "--why", "two\nlines", "--json")
    assert done.returncode == 2 and "--why" in one_json(done)["error"]


def test_issue_grant_flag(tmp_path: Path, key_file: Path) -> None:
    token = issue_cli(key_file, tmp_path / "s.tok", "stop")
    done = cli("breakglass", "issue", "--host", local_host_id().text(), "--seconds", "60",
               "--reason", "r", "--key", str(key_file), "--grant", "stop", "--json")
    assert done.returncode == 0 and one_json(done)["payload"]["grant"] == "stop"
    assert "grant stop" in done.stderr
    done = cli("breakglass", "issue", "--host", local_host_id().text(), "--seconds", "60",
               "--reason", "r", "--key", str(key_file), "--json")
    assert one_json(done)["payload"]["grant"] == "monitor"  # the default, as before
    assert "monitor mode from" in done.stderr
    done = cli("breakglass", "issue", "--host", local_host_id().text(), "--seconds", "60",
               "--reason", "r", "--key", str(key_file), "--grant", "reboot")
    assert done.returncode == 2 and "invalid choice" in done.stderr
    assert token.stat().st_size > 0


@pytest.fixture
def agent_socket(tmp_path: Path, key_file: Path) -> Iterator[Tuple[Agent, str]]:
    key = signing.load_private_key(key_file.read_bytes(), "k", None)
    agent = make_agent(tmp_path, key)
    bg = BreakGlass(agent, str(tmp_path / "bg-keys"))
    bg.register()
    register_stop(agent, bg)
    path = str(tmp_path / "control.sock")
    server = ControlServer(path, agent.handle)
    server.start()
    try:
        yield agent, path
    finally:
        server.close()
        agent.console.close()


def test_rejected_is_exit_1_and_accepted_exit_0(tmp_path: Path, key_file: Path,
                                                agent_socket: Tuple[Agent, str]) -> None:
    agent, path = agent_socket
    monitor = issue_cli(key_file, tmp_path / "m.tok", "monitor")
    done = cli("stop", "--token", str(monitor), "--socket", path)
    assert done.returncode == 1 and "rejected: wrong-grant" in done.stderr
    done = cli("stop", "--token", str(monitor), "--socket", path, "--json")
    doc = one_json(done)
    assert done.returncode == 1 and doc["rejected"] == "wrong-grant" and "error" in doc
    stop = issue_cli(key_file, tmp_path / "s.tok", "stop")
    applied = cli("breakglass", "apply", str(stop), "--socket", path, "--json")
    assert applied.returncode == 1 and one_json(applied)["rejected"] == "wrong-grant"
    assert not agent.stopping
    done = cli("stop", "--token", "-", "--socket", path, "--json", "--why", "host retired",
               stdin=stop.read_text())
    doc = one_json(done)
    assert done.returncode == 0 and doc["ok"] and doc["stopping"], done.stderr
    assert doc["reason"] == "host retired (token reason: retire web-1)"
    assert agent._stop.wait(5)
