"""One backend table (agent/registry.py): doctor's choice, the agent's start-up order and
the runners all follow it, so a backend cannot be added to one and missed by another."""

from __future__ import annotations

import argparse

from agent import registry
from agent.backends import PREFERENCE, RUNNERS
from agent.cli import run_cmd
from agent.sensors import probe


def test_every_backend_has_runners_and_probes_in_one_order() -> None:
    assert registry.NAMES == PREFERENCE == probe.BACKEND_NAMES
    assert list(RUNNERS) == list(registry.NAMES)
    assert [b[0] for b in probe.BACKENDS] == list(registry.NAMES)
    assert registry.NAMES[-1] == registry.AUDIT_ONLY == probe.AUDIT_ONLY


def test_downgrade_chain_starts_at_the_named_backend() -> None:
    assert registry.below("kill") == ("kill", "audit-only")
    assert registry.below("bpf-lsm") == registry.NAMES


def test_run_accepts_every_backend() -> None:
    parser = argparse.ArgumentParser()
    run_cmd.add_parser(parser.add_subparsers())
    for name in registry.NAMES:
        assert parser.parse_args(["run", "--backend", name]).backend == name
