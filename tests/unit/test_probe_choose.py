"""choose_backend is pure: every combination of probe outcomes gives the documented order."""

from __future__ import annotations

import itertools
from typing import Dict, Iterable

import pytest

from agent.sensors.probe import BACKEND_NAMES, BACKENDS, ProbeResult, choose_backend

# Every probe name any backend depends on.
NEEDED = sorted({p for _, needs, _ in BACKENDS for p in needs})


def host(ok: Iterable[str], *, fail_detail: str = "nope") -> Dict[str, ProbeResult]:
    good = set(ok)
    return {
        n: ProbeResult(n, n in good, "fine" if n in good else fail_detail, None) for n in NEEDED
    }


def expected(ok: set[str]) -> str:
    for name, needs, _ in BACKENDS:
        if all(n in ok for n in needs):
            return name
    raise AssertionError("audit-only needs nothing")


def test_order_is_the_architecture_order() -> None:
    assert BACKEND_NAMES == (
        "bpf-lsm",
        "fmod-ret",
        "fanotify-exec",
        "fanotify-open",
        "kill",
        "audit-only",
    )


@pytest.mark.parametrize("bits", list(itertools.product((False, True), repeat=len(NEEDED))))
def test_every_combination_picks_the_first_available(bits: tuple[bool, ...]) -> None:
    ok = {n for n, b in zip(NEEDED, bits) if b}
    choice = choose_backend(host(ok), None)
    assert choice.backend == expected(ok)
    assert choice.enforcing == (choice.backend != "audit-only")
    # one reason per backend, in order, exactly one chosen
    assert [r.backend for r in choice.reasons] == list(BACKEND_NAMES)
    assert [r.status for r in choice.reasons].count("chosen") == 1
    for r in choice.reasons:
        assert r.status in ("chosen", "skipped")
        assert r.why


def test_reasons_say_why_each_backend_was_skipped() -> None:
    probes = host({"btf", "bpf-programs", "lsm", "fanotify-exec", "fanotify-open", "send-signal"})
    probes["bpf-lsm"] = ProbeResult("bpf-lsm", False, "load failed: EPERM", "hint")
    probes["fmod-ret"] = ProbeResult("fmod-ret", False, "load failed: EPERM", None)
    choice = choose_backend(probes)
    why = {r.backend: (r.status, r.why) for r in choice.reasons}
    assert choice.backend == "fanotify-exec"
    assert why["bpf-lsm"] == ("skipped", "unavailable: bpf-lsm: load failed: EPERM")
    assert why["fmod-ret"][1] == "unavailable: fmod-ret: load failed: EPERM"
    assert why["fanotify-exec"][0] == "chosen"
    assert why["fanotify-open"][1] == "available, but fanotify-exec is preferred"
    assert why["kill"][1] == "available, but fanotify-exec is preferred"
    assert why["audit-only"][1] == "available, but fanotify-exec is preferred"


def test_bpf_lsm_needs_bpf_in_the_lsm_list_even_if_the_program_attached() -> None:
    probes = host({"btf", "bpf-programs", "bpf-lsm", "fmod-ret"})
    probes["lsm"] = ProbeResult("lsm", False, "bpf is NOT active", "lsm=...,bpf")
    choice = choose_backend(probes)
    assert choice.backend == "fmod-ret"
    assert "lsm: bpf is NOT active" in choice.reasons[0].why


def test_missing_probes_count_as_not_probed() -> None:
    choice = choose_backend({}, None)
    assert choice.backend == "audit-only"
    assert not choice.enforcing
    assert "bpf-lsm: not probed" in choice.reasons[0].why
    assert "btf: not probed" in choice.reasons[0].why


def test_no_compile_style_results_fall_through_to_fanotify() -> None:
    probes = host({"btf", "bpf-programs", "lsm", "fanotify-exec", "fanotify-open"})
    for n in ("bpf-lsm", "fmod-ret", "send-signal"):
        probes[n] = ProbeResult(n, False, "not probed (--no-compile)", None)
    assert choose_backend(probes).backend == "fanotify-exec"


@pytest.mark.parametrize("requested", BACKEND_NAMES)
def test_requested_backend_is_chosen_when_available(requested: str) -> None:
    choice = choose_backend(host(NEEDED), requested)
    assert choice.backend == requested
    assert choice.requested == requested
    for r in choice.reasons:
        if r.backend != requested:
            assert r.status == "skipped"
            assert r.why == f"available, but {requested} was requested"


def test_requested_but_unavailable_gives_no_backend() -> None:
    choice = choose_backend(host({"fanotify-exec"}), "bpf-lsm")
    assert choice.backend is None
    assert not choice.enforcing
    assert all(r.status == "skipped" for r in choice.reasons)
    assert choice.reasons[0].why.startswith("unavailable: ")


def test_auto_is_the_same_as_none() -> None:
    probes = host({"fanotify-open"})
    assert choose_backend(probes, "auto").backend == choose_backend(probes, None).backend
    assert choose_backend(probes, "auto").backend == "fanotify-open"


def test_unknown_backend_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend({}, "selinux")


def test_choose_backend_does_not_mutate_its_input() -> None:
    probes = host({"btf", "bpf-programs"})
    before = dict(probes)
    choose_backend(probes, None)
    assert probes == before
