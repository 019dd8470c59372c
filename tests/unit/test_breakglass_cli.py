"""``execguard breakglass``: output and exit codes (0 done, 1 rejected, 2 error, 3 no agent).

apply/status/end talk to a real control server answered by a real break-glass controller
in an Agent object (no kernel backend: tests/unit/test_breakglass_agent.py builds it)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from agent import signing
from agent.breakglass.overlay import BreakGlass
from agent.breakglass.token import HostId, Token, local_host_id
from agent.cli import main
from agent.cli.breakglass_cmd import parse_time
from agent.control import ControlServer
from agent.envelope import parse_envelope
from tests.unit.test_breakglass_agent import make_agent

Capture = pytest.CaptureFixture[str]


def run(capsys: Capture, *argv: str) -> Tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    base = tmp_path_factory.mktemp("bgkeys")
    key = signing.generate("ecdsa-p256")
    plain = base / "plain.key"
    plain.write_bytes(signing.plain_private_pem(key))
    encrypted = base / "enc.key"
    encrypted.write_bytes(signing.encrypt_private_key(key, b"s3cret"))
    (base / "ops.pub").write_bytes(signing.public_pem(key.public_key()))
    return plain, encrypted


def payload_of(text: str) -> Token:
    env = parse_envelope(text.encode(), "t", "application/vnd.execguard.breakglass+json;v=1")
    return Token.from_payload(env.payload, "t")


def test_host_id(capsys: Capture) -> None:
    code, out, _ = run(capsys, "breakglass", "host-id")
    assert code == 0 and HostId.parse(out.strip()) == local_host_id()
    code, out, _ = run(capsys, "breakglass", "host-id", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["host_id"] == local_host_id().text()
    assert doc["machine_id"] == local_host_id().machine_id


def test_issue_to_stdout_file_and_json(capsys: Capture, tmp_path: Path,
                                       key_files: Tuple[Path, Path],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    plain, encrypted = key_files
    host = "web-1:" + "ab" * 16
    code, out, err = run(capsys, "breakglass", "issue", "--host", host, "--minutes", "0.05",
                         "--reason", "r", "--key", str(plain))
    assert code == 0 and payload_of(out).duration == 3 and "for web-1:abab" in err
    out_file = tmp_path / "t.tok"
    monkeypatch.setenv("COSIGN_PASSWORD", "s3cret")
    code, out, err = run(capsys, "breakglass", "issue", "--host", host, "--seconds", "90",
                         "--reason", "r", "--key", str(encrypted), "-o", str(out_file))
    assert code == 0 and out == "" and f"written to {out_file}" in err
    assert payload_of(out_file.read_text()).duration == 90
    assert out_file.stat().st_mode & 0o777 == 0o600
    code, out, _ = run(capsys, "breakglass", "issue", "--host", host, "--seconds", "90",
                       "--reason", "r", "--key", str(plain), "--json",
                       "--not-before", "2100-01-01T00:00:00Z")
    doc = json.loads(out)
    assert code == 0 and doc["payload"]["not_before"] == 4102444800
    assert doc["payload"]["not_after"] == 4102444890


@pytest.mark.parametrize("argv,message", [
    (["--host", "nocolon", "--seconds", "9"], "HOSTNAME:MACHINE-ID"),
    (["--seconds", "90000"], "longer than the cap"),
    (["--seconds", "60", "--max-minutes", "0.5"], "longer than the cap"),
    (["--seconds", "0"], "at least 1 second"),
    (["--seconds", "9", "--not-before", "yesterday"], "not UNIX seconds or ISO 8601"),
    (["--seconds", "9", "--not-before", "1000"], "in the past"),
    (["--seconds", "9", "--key", "/nonexistent/k"], "/nonexistent/k"),
])
def test_issue_errors_exit_2(capsys: Capture, key_files: Tuple[Path, Path],
                             argv: List[str], message: str) -> None:
    base = {"--host": "web-1:" + "ab" * 16, "--reason": "r", "--key": str(key_files[0])}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    flat = [x for kv in base.items() for x in kv]
    code, out, err = run(capsys, "breakglass", "issue", *flat)
    assert code == 2 and message in err and "Traceback" not in err
    code, out, _ = run(capsys, "breakglass", "issue", *flat, "--json")
    assert code == 2 and message in json.loads(out)["error"]


def test_no_agent_is_exit_3_and_bad_token_file_exit_2(capsys: Capture, tmp_path: Path) -> None:
    state = str(tmp_path / "nothing")
    token = tmp_path / "t.tok"
    token.write_text("{}")
    for argv in (["apply", str(token)], ["status"], ["end"], ["revoke"]):
        code, _, err = run(capsys, "breakglass", *argv, "--state-dir", state)
        assert code == 3 and "no agent" in err, argv
    code, _, err = run(capsys, "breakglass", "apply", str(tmp_path / "absent"), "--state-dir",
                       state)
    assert code == 2 and "absent" in err
    token.write_bytes(b"x" * 10000)
    code, _, err = run(capsys, "breakglass", "apply", str(token), "--state-dir", state)
    assert code == 2 and "not a break-glass token" in err


@pytest.fixture
def agent_socket(tmp_path: Path, key_files: Tuple[Path, Path]) -> Iterator[str]:
    from agent.signing import load_private_key

    key = load_private_key(key_files[0].read_bytes(), "k", None)
    agent = make_agent(tmp_path, key)
    BreakGlass(agent, str(key_files[0].parent)).register()
    server = ControlServer(str(tmp_path / "control.sock"), agent.handle)
    server.start()
    try:
        yield str(tmp_path / "control.sock")
    finally:
        server.close()
        agent.console.close()


def test_apply_status_end_exit_codes(capsys: Capture, tmp_path: Path, agent_socket: str,
                                     key_files: Tuple[Path, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "ok.tok"
    assert run(capsys, "breakglass", "issue", "--host", local_host_id().text(), "--seconds",
               "300", "--reason", "outage", "--key", str(key_files[0]), "-o",
               str(token))[0] == 0
    code, out, _ = run(capsys, "breakglass", "status", "--socket", agent_socket)
    assert code == 0 and out.strip() == "break-glass: not active"
    code, out, _ = run(capsys, "breakglass", "apply", str(token), "--socket", agent_socket)
    assert code == 0 and "break-glass ACTIVE: monitor mode until" in out and "outage" in out
    code, out, err = run(capsys, "breakglass", "apply", str(token), "--socket", agent_socket)
    assert code == 1 and "rejected: replayed" in err
    code, out, _ = run(capsys, "breakglass", "apply", str(token), "--socket", agent_socket,
                       "--json")
    assert code == 1 and json.loads(out)["rejected"] == "replayed"
    code, out, _ = run(capsys, "status", "--socket", agent_socket, "--json")
    assert json.loads(out)["breakglass"]["active"] is True
    code, out, _ = run(capsys, "breakglass", "status", "--socket", agent_socket, "--json")
    assert code == 0 and 290 < json.loads(out)["remaining_s"] <= 300
    code, out, _ = run(capsys, "breakglass", "end", "--socket", agent_socket)
    assert code == 0 and "not active" in out
    code, out, _ = run(capsys, "breakglass", "end", "--socket", agent_socket, "--json")
    assert code == 1 and json.loads(out)["detail"] == "no break-glass is active"
    # a token over stdin
    other = tmp_path / "other.tok"
    assert run(capsys, "breakglass", "issue", "--host", "elsewhere:" + "0" * 32, "--seconds",
               "60", "--reason", "x", "--key", str(key_files[0]), "-o", str(other))[0] == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(other.read_bytes())))
    code, _, err = run(capsys, "breakglass", "apply", "-", "--socket", agent_socket)
    assert code == 1 and "rejected: wrong-host" in err


def test_parse_time() -> None:
    assert parse_time("1800000000") == 1800000000
    assert parse_time("2027-01-15T12:00:00Z") == parse_time("2027-01-15T12:00:00") == \
        parse_time("2027-01-15T13:00:00+01:00") == 1800014400
