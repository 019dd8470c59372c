"""The pure parts of tamper resistance (agent/backends/tamper.py, agent/sensors/bpf/pins.py):
the policy setting, what the agent guards, how a tamper record reads, and how pin
directories of dead agents are told from live ones. The kernel side runs in the test VM
(tests/vm/test_tamper_vm.py): this host refuses BPF LSM programs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import agent
from agent.backends.tamper import ATTEMPTS, describe_attempt, guarded_paths
from agent.errors import MalformedInput
from agent.policy import parse_policy
from agent.sensors.bpf import pins
from agent.sensors.bpf.sensor import VERDICT_STAT_NAMES


def policy(**top: Any) -> Any:
    doc = {"version": 1, "mode": "enforce", "scopes": ["/opt/**"], **top}
    return parse_policy(json.dumps(doc).encode(), "/etc/execguard/test.json")


def test_keep_enforcing_is_a_policy_choice_that_only_enforce_mode_makes_real() -> None:
    assert policy().on_agent_exit == "fail-open" and not policy().keeps_enforcing
    assert policy(on_agent_exit="keep-enforcing").keeps_enforcing
    assert not policy(on_agent_exit="keep-enforcing", mode="monitor").keeps_enforcing
    # unset and the default spelled out are one policy (one digest)
    assert policy().digest == policy(on_agent_exit="fail-open").digest
    with pytest.raises(MalformedInput, match="on_agent_exit"):
        policy(on_agent_exit="keep-going")


def test_the_agent_guards_its_code_state_logs_config_keys_and_policy(tmp_path: Path) -> None:
    keys, state, logs = tmp_path / "keys", tmp_path / "state", tmp_path / "log"
    for d in (keys, state, logs):
        d.mkdir()
    snap = policy(state_dir=str(state), log_dir=str(logs),
                  trust={"keys": [str(keys)]}, on_agent_exit="keep-enforcing")
    got = guarded_paths(snap)
    assert os.path.dirname(os.path.realpath(agent.__file__)) in got
    assert {str(keys), str(state), str(logs)} <= set(got)
    assert "/etc/execguard/test.json" not in got  # a policy file that does not exist


def event(size: int = 0, ino: int = 0, path: str = "") -> Any:
    return SimpleNamespace(identity=SimpleNamespace(size=size, ino=ino, dev=7), path=path)


@pytest.mark.parametrize("kind", sorted(ATTEMPTS))
def test_every_tamper_record_reads_as_a_sentence(kind: int) -> None:
    name, text = describe_attempt(kind << 16 | 9, event(size=1234, ino=42, path="/x"))
    assert name == ATTEMPTS[kind] and text and "kind" not in text


def test_a_signal_record_names_the_signal_and_the_agent() -> None:
    assert describe_attempt(1 << 16 | 9, event(size=321)) == (
        "signal", "signal 9 to the agent (pid 321)")
    assert describe_attempt(99 << 16, event())[0] == "kind-99"


def test_pin_directories_of_dead_agents_are_orphans(tmp_path: Path) -> None:
    me = os.getpid()
    (tmp_path / f"bpf-lsm_{me}_{pins.start_ticks(me)}").mkdir()  # alive: this process
    (tmp_path / f"bpf-lsm_{me}_{pins.start_ticks(me) + 1}").mkdir()  # a pid reused
    gone = tmp_path / "bpf-lsm_999999999_5"
    gone.mkdir()
    (gone / "link_lsm__bprm_check_security").write_text("")
    (tmp_path / "not-ours").mkdir()
    found = pins.orphans(VERDICT_STAT_NAMES, root=str(tmp_path))
    assert sorted((o.pid, o.links) for o in found) == [(me, 0), (999999999, 1)]
    assert all(o.counters == {} for o in found)  # not bpffs: no counters to read


def test_start_ticks_order_processes_by_when_they_started() -> None:
    assert pins.start_ticks(os.getpid()) > 0
    assert pins.start_ticks(1) <= pins.start_ticks(os.getpid())


def test_status_says_what_stopping_the_agent_would_do() -> None:
    from agent.cli.status_cmd import render

    plain = render({"state": "ready", "backend": "fanotify-exec", "sensor": {}})
    assert "on agent exit: fail-open" in plain
    kept = render({"state": "ready", "backend": "bpf-lsm", "sensor": {"tamper": {
        "keep_enforcing": True, "protected": True, "pin_directory": "/sys/fs/bpf/execguard/x"}}})
    assert "keep-enforcing" in kept and "self-protected" in kept and "/sys/fs/bpf" in kept
    fmod = render({"state": "ready", "backend": "fmod-ret", "sensor": {"tamper": {
        "keep_enforcing": True, "protected": False, "pin_directory": "/p"}}})
    assert "not self-protected" in fmod


def test_the_command_line_can_ask_to_keep_enforcing() -> None:
    from agent.policy.load import apply_overrides

    snap = apply_overrides(policy(), on_agent_exit="keep-enforcing")
    assert snap.keeps_enforcing and "--on-agent-exit keep-enforcing" in snap.overrides
    with pytest.raises(MalformedInput, match="--on-agent-exit"):
        apply_overrides(policy(), on_agent_exit="maybe")


def test_a_guarded_file_held_open_for_write_is_reported(tmp_path: Path) -> None:
    from agent.backends.tamper import held_for_write

    key, policy_file = tmp_path / "a.pub", tmp_path / "policy.toml"
    key.write_text("k")
    policy_file.write_text("p")
    with policy_file.open("a"):  # a descriptor taken before protection keeps writing
        assert held_for_write([str(key), str(policy_file), str(tmp_path)]) == [str(policy_file)]
    assert held_for_write([str(key), str(policy_file)]) == []
