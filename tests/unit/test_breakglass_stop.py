"""The stop grant: tokens that grant ``stop``, ``wrong-grant`` both ways, and the agent's
``stop`` verb in a real Agent object (real keys, real ledger, a real control socket; no
kernel backend). The whole path with a running agent is
tests/integration/test_authorized_stop.py."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from agent import signing
from agent.breakglass.overlay import BreakGlass
from agent.breakglass.stop import AuthorizedStop, stop_reason
from agent.breakglass.stop import register as register_stop
from agent.breakglass.token import (
    GRANT_STOP,
    PAYLOAD_TYPE,
    HostId,
    Ledger,
    Rejected,
    Token,
    canonical,
    issue,
    verify,
)
from agent.control import ControlServer, after_reply, request
from agent.daemon import Agent
from agent.envelope import Envelope, parse_envelope
from agent.policy import Mode
from agent.verify.keys import key_fingerprint, parse_public_key
from agent.verify.model import TrustedKey
from tests.agent_fixtures import wait_for
from tests.unit.test_breakglass_agent import HOST, T0, Clocks, make_agent

NOW = T0


@pytest.fixture(scope="module")
def key() -> signing.PrivateKey:
    return signing.generate("ecdsa-p256")


def pinned_of(key: signing.PrivateKey) -> Dict[str, TrustedKey]:
    tk = parse_public_key(signing.public_pem(key.public_key()), "test.pub")
    return {tk.fingerprint: tk}


def token_text(key: signing.PrivateKey, grant: str, seconds: int = 600,
               host: HostId = HOST, now: float = NOW, reason: str = "decommission") -> str:
    return issue(key, host, seconds, reason, now=now, grant=grant)[1].to_bytes().decode()


def rejected_code(data: bytes, pinned: Dict[str, TrustedKey], grant: str) -> str:
    with pytest.raises(Rejected) as info:
        verify(data, "t", pinned, HOST, NOW + 1, grant=grant)
    return info.value.code


# -- the token ------------------------------------------------------------------------------

def test_issue_default_grant_is_monitor_and_stop_round_trips(key: signing.PrivateKey) -> None:
    monitor, _ = issue(key, HOST, 60, "r", now=NOW)
    assert monitor.grant == "monitor"
    token, env = issue(key, HOST, 60, "r", now=NOW, grant="stop")
    assert token.grant == "stop" and json.loads(env.payload)["grant"] == "stop"
    assert env.payload_type == PAYLOAD_TYPE  # the same document type: one key set, one ledger
    assert verify(env.to_bytes(), "t", pinned_of(key), HOST, NOW + 1, grant="stop") == token
    with pytest.raises(Exception, match="grant 'reboot' is unknown"):
        issue(key, HOST, 60, "r", now=NOW, grant="reboot")


def test_wrong_grant_both_ways(key: signing.PrivateKey) -> None:
    pinned = pinned_of(key)
    stop = token_text(key, "stop").encode()
    monitor = token_text(key, "monitor").encode()
    assert rejected_code(stop, pinned, "monitor") == "wrong-grant"  # breakglass apply
    assert rejected_code(monitor, pinned, "stop") == "wrong-grant"  # execguard stop
    assert verify(stop, "t", pinned, HOST, NOW + 1, grant="stop").grant == "stop"
    assert verify(monitor, "t", pinned, HOST, NOW + 1).grant == "monitor"  # the default
    with pytest.raises(Rejected, match="execguard stop"):
        verify(stop, "t", pinned, HOST, NOW + 1)


def test_the_grant_is_signed_and_unknown_grants_are_malformed(key: signing.PrivateKey) -> None:
    pinned = pinned_of(key)
    good = Token(HOST, "a" * 32, int(NOW), int(NOW), int(NOW) + 60, "r",
                 next(iter(pinned)), "stop").to_json()
    unknown = Envelope(PAYLOAD_TYPE, canonical(dict(good, grant="disable"))).signed_by(key)
    assert rejected_code(unknown.to_bytes(), pinned, "stop") == "malformed"
    # a monitor token relabelled "stop" after signing no longer verifies
    env = Envelope(PAYLOAD_TYPE, canonical(dict(good, grant="monitor"))).signed_by(key)
    doc = json.loads(env.to_bytes())
    doc["payload"] = Envelope(PAYLOAD_TYPE, canonical(good)).to_json()["payload"]
    assert rejected_code(json.dumps(doc).encode(), pinned, "stop") == "bad-signature"


def test_a_stop_record_spends_the_nonce(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path))
    ledger.append({"event": "stop", "nonce": "a" * 32})
    ledger.append({"event": "rejected", "nonce": "b" * 32, "why": "wrong-grant"})
    assert ledger.spent() == {"a" * 32}
    assert ledger.open_applies() == []  # a stop is not a break-glass left open


def test_stop_reason() -> None:
    token = Token(HOST, "a" * 32, 1, 1, 2, "decommission", "sha256:x", "stop")
    assert stop_reason(token, None) == "decommission"
    assert stop_reason(token, "decommission") == "decommission"
    assert stop_reason(token, "host retired") == "host retired (token reason: decommission)"


# -- the agent's verb -------------------------------------------------------------------------

Setup = Tuple[Agent, BreakGlass, Clocks]


@pytest.fixture
def setup(tmp_path: Path, key: signing.PrivateKey) -> Iterator[Setup]:
    agent = make_agent(tmp_path, key)
    clocks = Clocks()
    bg = BreakGlass(agent, str(tmp_path / "bg-keys"), 3600, host=lambda: HOST,
                    clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    bg.register()
    register_stop(agent, bg)
    try:
        yield agent, bg, clocks
    finally:
        agent.console.close()


def ledger_events(agent: Agent) -> List[Tuple[Any, ...]]:
    return [(r["event"], r.get("why"), r.get("verb"))
            for r in Ledger(agent.base_snapshot.state_dir).records()]


def test_stop_with_a_stop_token_spends_it_and_requests_a_releasing_stop(
        setup: Setup, key: signing.PrivateKey) -> None:
    agent, _, _ = setup
    text = token_text(key, "stop")
    reply = agent.handle({"cmd": "stop", "token": text, "why": "host retired"})
    assert reply["ok"] and reply["stopping"] and reply["release"] is False  # no runner
    nonce = json.loads(parse_envelope(text.encode(), "t", PAYLOAD_TYPE).payload)["nonce"]
    assert reply["token"] == nonce
    assert agent.stopping  # no socket here: after_reply ran at once
    assert agent._stop_why == ("authorized stop by token " + reply["token"][:12] +
                               ": host retired (token reason: decommission)")
    assert agent._stop_release is True
    records = list(Ledger(agent.base_snapshot.state_dir).records())
    assert records[-1]["event"] == "stop" and records[-1]["detail"] == "host retired"
    assert records[-1]["token"]["grant"] == "stop"


def test_refused_stops_are_recorded_and_the_agent_runs_on(
        setup: Setup, key: signing.PrivateKey) -> None:
    agent, _, _ = setup
    cases = {
        "wrong-grant": token_text(key, "monitor"),
        "wrong-host": token_text(key, GRANT_STOP, host=HostId("web-2", HOST.machine_id)),
        "expired": token_text(key, GRANT_STOP, seconds=60, now=NOW - 3600),
        "untrusted-key": token_text(signing.generate("ecdsa-p256"), GRANT_STOP),
        "malformed": "",
    }
    for code, text in cases.items():
        reply = agent.handle({"cmd": "stop", "token": text})
        assert reply.get("rejected") == code, (code, reply)
        assert not agent.stopping
    assert agent.handle({"cmd": "stop"})["rejected"] == "malformed"  # no token at all
    assert agent.handle({"cmd": "stop", "token": "x", "why": "a\nb"})["error"].startswith(
        "stop: 'why'")
    assert not agent.stopping
    assert ledger_events(agent) == [("rejected", code, "stop") for code in cases] + [
        ("rejected", "malformed", "stop")]


def test_a_stop_token_is_refused_by_apply_and_single_use(
        setup: Setup, key: signing.PrivateKey, tmp_path: Path) -> None:
    agent, _, clocks = setup
    text = token_text(key, GRANT_STOP)
    applied = agent.handle({"cmd": "breakglass-apply", "token": text})
    assert applied["rejected"] == "wrong-grant"
    assert agent.decider.store.current.snapshot.mode is Mode.ENFORCE
    assert agent.handle({"cmd": "stop", "token": text})["ok"]  # the refusal spent nothing
    # a second agent on the same state directory: the ledger remembers it
    agent2 = make_agent(tmp_path, key)
    try:
        bg2 = BreakGlass(agent2, str(tmp_path / "bg-keys"), 3600, host=lambda: HOST,
                         clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
        bg2.register()
        register_stop(agent2, bg2)
        assert agent2.handle({"cmd": "stop", "token": text})["rejected"] == "replayed"
        assert not agent2.stopping
    finally:
        agent2.console.close()
    assert ledger_events(agent) == [("rejected", "wrong-grant", None), ("stop", None, None),
                                    ("rejected", "replayed", "stop")]


def test_already_stopping_spends_nothing(setup: Setup, key: signing.PrivateKey) -> None:
    agent, _, _ = setup
    agent.request_stop("stopped by signal", release=False)
    reply = agent.handle({"cmd": "stop", "token": token_text(key, GRANT_STOP)})
    assert reply == {"error": "the agent is already stopping"}
    assert ledger_events(agent) == []


def test_stop_over_the_socket_answers_before_the_agent_stops(
        setup: Setup, key: signing.PrivateKey, tmp_path: Path) -> None:
    agent, bg, _ = setup
    stopping_in_handler: List[bool] = []
    verb = AuthorizedStop(agent, bg)

    def handler(req: Dict[str, Any]) -> Dict[str, Any]:
        reply = verb.handle(req)
        stopping_in_handler.append(agent.stopping)
        return reply

    agent.commands["stop"] = handler
    path = str(tmp_path / "control.sock")
    server = ControlServer(path, agent.handle)
    server.start()
    try:
        reply = request(path, "stop", timeout=5, token=token_text(key, GRANT_STOP))
    finally:
        server.close()
    assert reply["ok"] and reply["stopping"]
    assert stopping_in_handler == [False]  # the stop waits for the answer to go out
    assert agent._stop.wait(5)


def test_after_reply_runs_once_the_answer_is_out(tmp_path: Path) -> None:
    received = threading.Event()
    order: List[str] = []

    def handler(_req: Dict[str, Any]) -> Dict[str, Any]:
        # blocks until the client has the answer: it would time out if it ran first
        after_reply(lambda: order.append(f"after:{received.wait(5)}"))
        after_reply(lambda: print(1 / 0))  # a failing action does not stop the server
        order.append("handler")
        return {"ok": True}

    path = str(tmp_path / "c.sock")
    server = ControlServer(path, handler)
    server.start()
    try:
        assert request(path, "x", timeout=5) == {"ok": True}
        received.set()
        assert request(path, "x", timeout=5) == {"ok": True}  # still serving
        wait_for(lambda: len(order) == 4, timeout=5)
    finally:
        server.close()
    assert order == ["handler", "after:True", "handler", "after:True"]
    ran: List[int] = []
    after_reply(lambda: ran.append(1))  # outside a request: at once
    assert ran == [1]


class RecordingRunner:
    """A runner that outlives the agent has ``release``; it must come before ``stop``."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: List[str] = []

    def release(self) -> None:
        self.calls.append("release")

    def stop(self) -> None:
        self.calls.append("stop")


@pytest.mark.parametrize("release", [True, False])
def test_agent_stop_releases_before_stopping_only_when_asked(
        tmp_path: Path, key: signing.PrivateKey, release: bool) -> None:
    agent = make_agent(tmp_path, key)
    runner = RecordingRunner()
    agent.runner = runner  # type: ignore[assignment]
    agent.request_stop("authorized stop by token abc: r", release=release)
    agent.stop("stopped by signal")
    assert runner.calls == (["release", "stop"] if release else ["stop"])


def test_agent_stop_without_release_method_just_stops(tmp_path: Path,
                                                      key: signing.PrivateKey) -> None:
    agent = make_agent(tmp_path, key)

    class Plain:
        name = "plain"
        stopped = False

        def stop(self) -> None:
            self.stopped = True

    runner = Plain()
    agent.runner = runner  # type: ignore[assignment]
    agent.request_stop("authorized stop", release=True)
    agent.stop("authorized stop")
    assert runner.stopped


# -- stops signed by the policy root keys (M-of-N) -------------------------------------------

def policy_roots(where: Path, n: int) -> List[signing.PrivateKey]:
    """``n`` policy root keys pinned in ``where`` (their .pub files), as bundles use them."""
    where.mkdir()
    roots = [signing.generate("ecdsa-p256") for _ in range(n)]
    for i, root in enumerate(roots):
        (where / f"root{i}.pub").write_bytes(signing.public_pem(root.public_key()))
    return roots


def test_m_of_n_policy_root_keys_authorize_a_stop_and_nothing_else(
        setup: Setup, tmp_path: Path) -> None:
    """The agent runs with --policy-keys (3 pinned) and --policy-threshold 2: a stop token
    signed by two of them stops it, by one is refused, and a monitor token signed by the
    policy keys is no break-glass (apply takes the break-glass keys only)."""
    agent, _, _ = setup
    roots = policy_roots(tmp_path / "policy-keys", 3)
    agent.opts = dataclasses.replace(agent.opts, policy_keys=str(tmp_path / "policy-keys"),
                                     policy_threshold=2)

    def text(keys: List[signing.PrivateKey], grant: str = GRANT_STOP) -> str:
        return issue(keys, HOST, 600, "decommission", now=NOW,
                     grant=grant)[1].to_bytes().decode()

    one = agent.handle({"cmd": "stop", "token": text(roots[:1])})
    assert one["rejected"] == "untrusted-key", one
    assert "1 signature(s) by pinned break-glass keys needed" in one["error"], one
    assert "2 signature(s) by pinned policy keys needed" in one["error"], one
    applied = agent.handle({"cmd": "breakglass-apply", "token": text(roots[:2], "monitor")})
    assert applied["rejected"] == "untrusted-key", applied
    assert not agent.stopping
    assert agent.decider.store.current.snapshot.mode is Mode.ENFORCE

    reply = agent.handle({"cmd": "stop", "token": text([roots[2], roots[0]])})
    signed_by = sorted(key_fingerprint(r.public_key()) for r in (roots[0], roots[2]))
    assert reply["ok"] and reply["issuer"] == key_fingerprint(roots[2].public_key()), reply
    assert reply["authority"] == {"keys": "policy", "threshold": 2, "pinned": 3,
                                  "signers": signed_by}, reply
    assert agent.stopping
    last = list(Ledger(agent.base_snapshot.state_dir).records())[-1]
    assert (last["event"], last["authority"]) == ("stop", reply["authority"])


def test_a_stop_signed_by_a_break_glass_key_names_that_authority(
        setup: Setup, key: signing.PrivateKey) -> None:
    agent, _, _ = setup
    reply = agent.handle({"cmd": "stop", "token": token_text(key, GRANT_STOP)})
    assert reply["authority"] == {"keys": "breakglass", "threshold": 1, "pinned": 1,
                                  "signers": [key_fingerprint(key.public_key())]}, reply
