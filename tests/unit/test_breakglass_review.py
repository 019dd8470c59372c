"""Break-glass and control-socket inputs found in review: deeply nested JSON (RecursionError,
not ValueError), a ledger others may write, and issuing with a NaN duration."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from agent import signing
from agent.breakglass.overlay import BreakGlass
from agent.breakglass.token import PAYLOAD_TYPE, Ledger, Rejected, verify
from agent.cli import main
from agent.control import ControlServer, request
from agent.daemon import Agent
from agent.envelope import parse_envelope
from agent.errors import InputError, MalformedInput
from agent.policy import Mode
from agent.verify.model import TrustedKey
from tests.unit.test_breakglass import HOST as TOKEN_HOST
from tests.unit.test_breakglass import NOW
from tests.unit.test_breakglass_agent import Clocks, ask, mode, setup, token  # noqa: F401

NESTED = "[" * 3000  # under MAX_TOKEN_BYTES; json.loads raises RecursionError on it


def test_a_deeply_nested_token_is_rejected_as_malformed(key: signing.PrivateKey) -> None:
    with pytest.raises(MalformedInput, match="not a JSON signed envelope"):
        parse_envelope(NESTED.encode(), "token", PAYLOAD_TYPE)
    pinned: Dict[str, TrustedKey] = {}  # the envelope is refused before any key is looked at
    with pytest.raises(Rejected) as exc:
        verify(NESTED.encode(), "token", pinned, TOKEN_HOST, NOW)
    assert exc.value.code == "malformed"


def test_agent_rejects_and_records_a_deeply_nested_token(
        setup: Tuple[Agent, BreakGlass, Clocks]) -> None:  # noqa: F811
    agent, bg, _clocks = setup
    reply = ask(agent, "breakglass-apply", token=NESTED)
    assert reply.get("rejected") == "malformed", reply
    assert mode(agent) is Mode.ENFORCE
    assert [r["event"] for r in bg.ledger.records()] == ["rejected"]


def test_control_socket_survives_a_deeply_nested_request(tmp_path: Path) -> None:
    seen: List[Dict[str, Any]] = []

    def handler(req: Dict[str, Any]) -> Dict[str, Any]:
        seen.append(req)
        return {"ok": True}

    path = str(tmp_path / "control.sock")
    server = ControlServer(path, handler)
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"[" * 4000 + b"\n")
            answer = json.loads(s.makefile("rb").readline())
        assert "bad request" in answer["error"]
        # the server thread is still there for the next client
        assert request(path, "status", timeout=5) == {"ok": True}
        assert seen == [{"cmd": "status"}]
    finally:
        server.close()


def test_control_socket_survives_a_handler_that_raises(tmp_path: Path) -> None:
    def handler(req: Dict[str, Any]) -> Dict[str, Any]:
        if req.get("cmd") == "boom":
            raise KeyError("bug")
        return {"ok": True}

    path = str(tmp_path / "control.sock")
    server = ControlServer(path, handler)
    server.start()
    try:
        reply = request(path, "boom", timeout=5)
        assert "internal error" in reply["error"] and "KeyError" in reply["error"]
        assert request(path, "status", timeout=5) == {"ok": True}
    finally:
        server.close()


@pytest.mark.parametrize("how", ["group-writable", "world-writable"])
def test_a_ledger_others_can_write_refuses_every_apply(
        setup: Tuple[Agent, BreakGlass, Clocks], key: signing.PrivateKey,  # noqa: F811
        how: str) -> None:
    agent, bg, _clocks = setup
    first = token(key, 60)
    assert ask(agent, "breakglass-apply", token=first)["ok"]
    ask(agent, "breakglass-end")
    # someone who may write the ledger may erase the "applied" line and replay the token
    os.chmod(bg.ledger.path, 0o620 if how == "group-writable" else 0o602)
    reply = ask(agent, "breakglass-apply", token=token(key, 60))
    assert reply.get("rejected") == "ledger-error", reply
    assert "writable" in reply["error"]
    assert mode(agent) is Mode.ENFORCE


def test_a_ledger_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path))
    ledger.append({"event": "applied", "nonce": "a" * 32})
    os.chown(ledger.path, 1000, 1000)  # the tests run as root (preamble)
    with pytest.raises(InputError, match="owned by uid 1000"):
        ledger.spent()


@pytest.mark.parametrize("flag,value", [("--minutes", "nan"), ("--minutes", "inf"),
                                        ("--max-minutes", "nan")])
def test_issue_with_a_nan_or_infinite_duration_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, key: signing.PrivateKey,
        flag: str, value: str) -> None:
    keyfile = tmp_path / "plain.key"
    keyfile.write_bytes(signing.plain_private_pem(key))
    args = ["breakglass", "issue", "--host", TOKEN_HOST.text(), "--reason", "r",
            "--key", str(keyfile)]
    args += [flag, value] if flag == "--minutes" else ["--minutes", "5", flag, value]
    with pytest.raises(SystemExit) as exc:  # argparse's usage error
        main(args)
    _out, err = capsys.readouterr()
    assert exc.value.code == 2, err
    assert "Traceback" not in err and "minutes" in err


@pytest.fixture(scope="module")
def key() -> signing.PrivateKey:
    return signing.generate("ecdsa-p256")


def test_a_symlink_at_the_ledger_path_refuses_every_apply(
        setup: Tuple[Agent, BreakGlass, Clocks], key: signing.PrivateKey,  # noqa: F811
        tmp_path: Path) -> None:
    agent, bg, _clocks = setup
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("")
    os.symlink(elsewhere, bg.ledger.path)
    reply = ask(agent, "breakglass-apply", token=token(key, 60))
    assert reply.get("rejected") == "ledger-error", reply
    assert mode(agent) is Mode.ENFORCE and elsewhere.read_text() == ""


def test_the_cli_passes_a_deeply_nested_token_file_on_for_the_agent_to_refuse(
        tmp_path: Path) -> None:
    from agent.cli.breakglass_cmd import _read_token

    path = tmp_path / "nested.token"
    path.write_text(NESTED)
    assert _read_token(str(path)) == NESTED  # no RecursionError traceback in the CLI
