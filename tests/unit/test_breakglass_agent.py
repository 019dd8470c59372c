"""Break-glass in a real Agent object (policy store, trusted cache, hooks, ledger), without a
kernel backend: the clocks are test clocks so that expiry and clock steps are exact. The
whole path with fanotify, auditd and real execs is tests/integration/test_breakglass_agent.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from agent import signing
from agent.breakglass.overlay import BreakGlass, monitor_overlay
from agent.breakglass.token import HostId, Ledger, issue
from agent.cache import TrustedCache, binding_for, default_path
from agent.daemon import Agent, RunOptions, load_snapshot
from agent.decide import Decider
from agent.policy import Mode, PolicySnapshot, PolicyStore, apply_overrides

HOST = HostId("web-1", "0123456789abcdef0123456789abcdef")
T0 = 1_800_000_000.0


class Clocks:
    def __init__(self) -> None:
        self.wall, self.mono = T0, 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture(scope="module")
def key() -> signing.PrivateKey:
    return signing.generate("ecdsa-p256")


def make_agent(tmp: Path, key: signing.PrivateKey) -> Agent:
    keys = tmp / "bg-keys"
    keys.mkdir(exist_ok=True)
    (keys / "ops.pub").write_bytes(signing.public_pem(key.public_key()))
    scope = tmp / "scope"
    scope.mkdir(exist_ok=True)
    opts = RunOptions(mode="enforce", scopes=(str(scope),), state_dir=str(tmp / "state"),
                      log_dir=str(tmp / "log"), quiet=True, breakglass_keys=str(keys))
    agent = Agent(opts)
    (tmp / "state").mkdir(exist_ok=True)
    snap = agent.snapshot
    cache = TrustedCache(default_path(snap.state_dir),
                         binding_for(snap.verdict_digest, snap.trust_digest))
    agent.decider = Decider(PolicyStore(snap), cache)
    return agent


@pytest.fixture
def setup(tmp_path: Path, key: signing.PrivateKey) -> Iterator[Tuple[Agent, BreakGlass, Clocks]]:
    agent = make_agent(tmp_path, key)
    clocks = Clocks()
    bg = BreakGlass(agent, str(tmp_path / "bg-keys"), 3600, host=lambda: HOST,
                    clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    bg.register()
    try:
        yield agent, bg, clocks
    finally:
        agent.console.close()


def token(key: signing.PrivateKey, seconds: int = 60, host: HostId = HOST,
          now: float = T0) -> str:
    return issue(key, host, seconds, "incident 7", now=now)[1].to_bytes().decode()


def mode(agent: Agent) -> Mode:
    return agent.decider.store.current.snapshot.mode


def ask(agent: Agent, cmd: str, **fields: Any) -> Dict[str, Any]:
    return agent.handle({"cmd": cmd, **fields})


def test_apply_switches_to_monitor_and_expiry_reverts(
        setup: Tuple[Agent, BreakGlass, Clocks], key: signing.PrivateKey) -> None:
    agent, bg, clocks = setup
    seen: List[Mode] = []
    agent.policy_hooks.append(lambda snap: seen.append(snap.mode))
    base = agent.base_snapshot
    assert mode(agent) is Mode.ENFORCE
    reply = ask(agent, "breakglass-apply", token=token(key, 60))
    assert reply["ok"] and reply["breakglass"]["active"]
    assert reply["breakglass"]["remaining_s"] == 60 and reply["breakglass"]["base_mode"] == \
        "enforce"
    current = agent.decider.store.current.snapshot
    assert current.mode is Mode.MONITOR and agent.base_snapshot is base
    assert any(o.startswith("break-glass ") for o in current.overrides)
    status = ask(agent, "status")
    assert status["mode"] == "monitor" and status["breakglass"]["active"]

    clocks.advance(59.5)
    bg.tick(clocks.mono)
    assert mode(agent) is Mode.MONITOR
    clocks.advance(0.5)
    bg.tick(clocks.mono)
    assert mode(agent) is Mode.ENFORCE and agent.decider.store.current.snapshot is base
    assert seen == [Mode.MONITOR, Mode.ENFORCE]
    assert not ask(agent, "breakglass-status")["active"]
    events = [(r["event"], r.get("why")) for r in Ledger(base.state_dir).records()]
    assert events == [("applied", None), ("ended", "expired")]


def test_mode_switch_keeps_the_cache_binding(
        setup: Tuple[Agent, BreakGlass, Clocks], key: signing.PrivateKey) -> None:
    agent, _, _ = setup
    base = agent.base_snapshot
    ask(agent, "breakglass-apply", token=token(key))
    overlay = agent.decider.store.current.snapshot
    assert overlay.digest != base.digest  # the decision records name the policy in force
    assert overlay.verdict_digest == base.verdict_digest  # ...but verdicts stay valid
    assert overlay.trust == base.trust and overlay.rules == base.rules
    # any other change of the policy does change the binding
    other = apply_overrides(base, scopes=("/opt/elsewhere",))
    assert other.verdict_digest != base.verdict_digest


def test_overlay_equals_apply_overrides_monitor(tmp_path: Path,
                                                 key: signing.PrivateKey) -> None:
    agent = make_agent(tmp_path, key)
    try:
        base = agent.base_snapshot
        ours = monitor_overlay(base, "note")
        theirs = apply_overrides(base, mode="monitor")
        assert (ours.canonical, ours.digest, ours.mode) == \
            (theirs.canonical, theirs.digest, theirs.mode)
        assert json.loads(ours.canonical)["mode"] == "monitor"
    finally:
        agent.console.close()


def test_policy_swap_during_breakglass_keeps_monitor(
        setup: Tuple[Agent, BreakGlass, Clocks], key: signing.PrivateKey,
        tmp_path: Path) -> None:
    agent, bg, clocks = setup
    ask(agent, "breakglass-apply", token=token(key, 60))
    # a reload or a bundle apply installs a new enforce base meanwhile
    new_base = apply_overrides(load_snapshot(agent.opts), scopes=(str(tmp_path),))
    assert new_base.mode is Mode.ENFORCE
    agent.install_policy(new_base)
    assert mode(agent) is Mode.MONITOR and agent.base_snapshot is new_base
    clocks.advance(60)
    bg.tick(clocks.mono)
    assert agent.decider.store.current.snapshot is new_base  # the new one, not the old


def test_wall_clock_steps_never_extend_it(
        setup: Tuple[Agent, BreakGlass, Clocks], key: signing.PrivateKey) -> None:
    agent, bg, clocks = setup
    ask(agent, "breakglass-apply", token=token(key, 60))
    clocks.wall -= 3600  # someone sets the clock back an hour
    clocks.mono += 60
    bg.tick(clocks.mono)
    assert mode(agent) is Mode.ENFORCE
    clocks.wall += 3600
    ask(agent, "breakglass-apply", token=token(key, 60, now=clocks.wall))
    clocks.wall += 60  # and forward: not_after passed, whatever the monotonic clock says
    bg.tick(clocks.mono)
    assert mode(agent) is Mode.ENFORCE


def test_replay_is_rejected_also_after_a_restart(
        setup: Tuple[Agent, BreakGlass, Clocks], key: signing.PrivateKey,
        tmp_path: Path) -> None:
    agent, _, clocks = setup
    text = token(key, 600)
    assert ask(agent, "breakglass-apply", token=text)["ok"]
    replay = ask(agent, "breakglass-apply", token=text)
    assert replay["rejected"] == "replayed" and mode(agent) is Mode.MONITOR
    # the agent dies while it is active; a new one starts on the same state directory
    agent2 = make_agent(tmp_path, key)
    try:
        bg2 = BreakGlass(agent2, str(tmp_path / "bg-keys"), 3600, host=lambda: HOST,
                         clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
        bg2.register()
        assert mode(agent2) is Mode.ENFORCE  # a restart ends break-glass
        again = ask(agent2, "breakglass-apply", token=text)
        assert again["rejected"] == "replayed" and mode(agent2) is Mode.ENFORCE
    finally:
        agent2.console.close()
    records = list(Ledger(agent.base_snapshot.state_dir).records())
    assert [(r["event"], r.get("why")) for r in records] == [
        ("applied", None), ("rejected", "replayed"), ("ended", "agent-restarted"),
        ("rejected", "replayed")]


def test_rejections_leave_enforcement_alone(
        setup: Tuple[Agent, BreakGlass, Clocks], key: signing.PrivateKey) -> None:
    agent, _, _ = setup
    other = signing.generate("ecdsa-p256")
    cases = {
        "wrong-host": token(key, host=HostId("web-2", HOST.machine_id)),
        "untrusted-key": token(other),
        "expired": token(key, 60, now=T0 - 120),
        "too-long": token(key, 7200),
        "malformed": "{}",
    }
    for code, text in cases.items():
        reply = ask(agent, "breakglass-apply", token=text)
        assert reply.get("rejected") == code, (code, reply)
        assert mode(agent) is Mode.ENFORCE
    assert ask(agent, "breakglass-apply")["error"].startswith("breakglass-apply: the request")
    assert Ledger(agent.base_snapshot.state_dir).spent() == set()  # nothing was spent


def test_end_early_and_supersede(
        setup: Tuple[Agent, BreakGlass, Clocks], key: signing.PrivateKey) -> None:
    agent, _, _ = setup
    assert ask(agent, "breakglass-end")["ok"] is False  # nothing to end
    first = ask(agent, "breakglass-apply", token=token(key, 60))["breakglass"]["token"]
    second = ask(agent, "breakglass-apply", token=token(key, 600))["breakglass"]
    assert second["token"] != first and second["remaining_s"] == 600
    assert mode(agent) is Mode.MONITOR
    ended = ask(agent, "breakglass-end", why="fixed")
    assert ended["ok"] and not ended["breakglass"]["active"] and mode(agent) is Mode.ENFORCE
    events = [(r["event"], r.get("why"), r.get("detail")) for r in
              Ledger(agent.base_snapshot.state_dir).records()]
    assert events[2] == ("ended", "superseded", f"superseded by {second['token'][:12]}")
    assert events[3] == ("ended", "revoked", "fixed") and len(events) == 4


def test_monitor_policy_stays_as_it_is(tmp_path: Path, key: signing.PrivateKey) -> None:
    agent = make_agent(tmp_path, key)
    try:
        base: PolicySnapshot = apply_overrides(agent.base_snapshot, mode="monitor")
        bg = BreakGlass(agent, str(tmp_path / "bg-keys"), 3600, host=lambda: HOST,
                        clock=lambda: T0, monotonic=lambda: 0.0)
        assert bg.overlay(base) is base
    finally:
        agent.console.close()
