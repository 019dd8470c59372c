"""`execguard run --backend bpf-lsm` and `--backend fmod-ret` in enforce mode inside the test
VM, under the lockdown mode guest.sh set (none, integrity, confidentiality at runtime,
confidentiality at boot).

One agent per backend and run (a BCC compile takes ~30 s under TCG), scoped to a tmpfs the
test owns, with real auditd and real signed Go binaries built on the host. Every exec has a
deadline. fmod-ret is a tracing program (BPF_MODIFY_RETURN on security_bprm_check), so it
runs here although bpf is an active LSM: it is the fallback where bpf is not in lsm=, and
this proves it loads, attaches and denies under each lockdown mode.

The policy lives in a file (no --mode/--key overrides), so the reload tests at the end can
change the mode and the trusted keys with SIGHUP and see the kernel re-armed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, NamedTuple

import pytest

from tests.agent_fixtures import (
    RunningAgent,
    exec_file,
    running_agent,
    scoped_tmpfs,
    wait_for,
)
from tests.policy_fixtures import Material, copy_signed
from tests.rearm_fixtures import reload, write_policy
from tests.record_fixtures import Auditd, auditd_running, run_tool, wait_in_log

pytestmark = pytest.mark.timeout(300)
EPERM_RC = 126  # exec_file: PermissionError from the exec
DEADLINE_MS = 15000


ENFORCEMENT = {"bpf-lsm": "lsm-deny", "fmod-ret": "fmod-ret-deny"}


class Lsm(NamedTuple):
    agent: RunningAgent
    scope: Path
    auditd: Auditd
    material: Material
    backend: str
    policy: Path

    @property
    def enforcement(self) -> str:
        return ENFORCEMENT[self.backend]

    def write_policy(self, mode: str = "enforce", key: str = "a") -> None:
        # Under TCG one verification of a Go binary takes 1.5-2.2 s (measured): the fanotify
        # fill path needs a deadline to match, or the open is answered first and the hook
        # then denies the still-unknown file as unverified.
        write_policy(self.policy, mode=mode, scopes=[self.scope],
                     keys=[self.material.keys[key]], deadline_ms=DEADLINE_MS)


@pytest.fixture(scope="module", params=sorted(ENFORCEMENT))
def lsm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        vm_material: Material) -> Iterator[Lsm]:
    backend = str(request.param)
    tmp = tmp_path_factory.mktemp(f"{backend}-agent")
    with auditd_running() as auditd, scoped_tmpfs() as scope:
        # present before start: the pre-scan fills the verdict map before their first exec
        copy_signed(vm_material.bins["app"], scope / "ok", vm_material.private["a"])
        copy_signed(vm_material.bins["app"], scope / "bad", None)
        setup = Lsm(None, scope, auditd, vm_material, backend,  # type: ignore[arg-type]
                    tmp / "policy.toml")
        setup.write_policy()
        with running_agent(tmp, "--policy", str(setup.policy), "--backend", backend,
                           ready_timeout=240) as agent:
            # the pre-scan verifies ok/app and bad/app before the tests exec them
            wait_for(lambda: bool(agent.status()["prewarm"]["scan_done"]), timeout=120)
            yield setup._replace(agent=agent)


def sensor(lsm: Lsm) -> Dict[str, Any]:
    stats: Dict[str, Any] = lsm.agent.status()["sensor"]
    return stats


def explain(lsm: Lsm, path: Path) -> str:
    """What the agent knew, for an assertion message."""
    status = lsm.agent.status()
    mine = [d for d in lsm.agent.decisions() if d["event"]["path"] == str(path)]
    return (f"decisions for {path}: {json.dumps(mine)[-3000:]}\nsensor: {status['sensor']}\n"
            f"latency: {status['decisions'].get('latency_us')} prewarm: {status['prewarm']}\n"
            f"agent output: {lsm.agent.output.read_text()[-2000:]}")


def runs(lsm: Lsm, app: Path) -> None:
    ran = exec_file(app)
    assert ran.returncode == 0 and ran.stdout == "app\n", f"{ran}\n{explain(lsm, app)}"


def denied(lsm: Lsm, app: Path) -> None:
    ran = exec_file(app)
    assert ran.returncode == EPERM_RC and "Operation not permitted" in ran.stderr, \
        f"{ran}\n{explain(lsm, app)}"


def fresh_signed(lsm: Lsm, name: str) -> Path:
    """A signed copy deployed into the scope now, signature first (never seen before)."""
    stage = copy_signed(lsm.material.bins["app"], lsm.scope.parent / f"stage-{name}",
                        lsm.material.private["a"])
    where = lsm.scope / name
    where.mkdir()
    shutil.copy(f"{stage}.sig", where / "app.sig")
    shutil.copy(stage, where / "app")
    shutil.rmtree(stage.parent)
    return where / "app"


def test_agent_starts_its_backend_and_passes_its_selftest(lsm: Lsm, lockdown_mode: str) -> None:
    status = lsm.agent.status()
    assert status["backend"] == lsm.backend, status
    assert status["state"] == "ready" and status["enforcement"] == lsm.enforcement
    assert "canary denied with EPERM, then allowed" in status["selftest"]
    assert "kernel identity matches stat()" in status["selftest"]
    assert status["skipped_backends"] == []
    assert status["sensor"]["fanotify"] == "on"  # the synchronous fill path is active


def test_signed_go_binary_runs(lsm: Lsm) -> None:
    runs(lsm, lsm.scope / "ok" / "app")
    record = lsm.agent.wait_decision(str(lsm.scope / "ok" / "app"))[-1]
    assert record["decision"] == "allow"


def test_unsigned_gets_eperm_with_anom_exec_and_lsm_deny(lsm: Lsm) -> None:
    bad = lsm.scope / "bad" / "app"
    denied(lsm, bad)
    record = lsm.agent.wait_decision(str(bad))[-1]
    assert record["decision"] == "deny" and record["enforcement"] == lsm.enforcement
    assert record["reason"] == "no-signature"
    assert record["event"]["backend"] == lsm.backend and record["event"]["path"] == str(bad)
    assert record["event"]["gid"] == os.getgid()  # the real gid, from the kernel's record
    wait_in_log(lsm.auditd.log_file, f'path="{bad}"')
    found = run_tool("ausearch", "-m", "ANOM_EXEC", "-i", "-if", lsm.auditd.log_file)
    assert str(bad) in found and lsm.enforcement in found
    # the kernel said no, not the fanotify answer: the hook counted the denial
    assert sensor(lsm)["sensor"]["denied"] >= 1


def test_first_seen_signed_binary_is_allowed(lsm: Lsm) -> None:
    app = fresh_signed(lsm, "fresh")
    filled = sensor(lsm)["filled_by_fanotify"]
    runs(lsm, app)
    # its open-for-exec went through fanotify, which wrote the verdict before answering
    assert sensor(lsm)["filled_by_fanotify"] > filled
    assert lsm.agent.wait_decision(str(app))[0]["decision"] == "allow"


@pytest.mark.parametrize("how", ["write", "truncate"])
def test_tampering_after_verification_is_denied(lsm: Lsm, how: str) -> None:
    app = fresh_signed(lsm, f"tamper-{how}")
    runs(lsm, app)  # verified, in the kernel map
    dropped = sensor(lsm)["sensor"]["invalidated"]
    if how == "write":
        with open(app, "r+b") as fh:  # same size, one byte changed
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
            fh.seek(-1, os.SEEK_END)
            fh.write(bytes([last[0] ^ 0xFF]))
    else:
        os.truncate(app, app.stat().st_size - 1)
    assert sensor(lsm)["sensor"]["invalidated"] > dropped  # the kernel dropped the verdict
    denied(lsm, app)
    record = lsm.agent.wait_decision(str(app), 2)[-1]
    assert record["decision"] == "deny" and record["enforcement"] == lsm.enforcement
    assert record["reason"] == "bad-signature"


def test_chmod_keeps_the_verdict_and_a_size_setattr_drops_it(lsm: Lsm) -> None:
    """chmod and utimes move the ctime (and the mtime), not the bytes: the kernel keeps its
    verdict (EG_VF_ATTR) and the next exec is a map hit, even though the feeder's fanotify
    ignore mark (which no chmod removes) keeps the fill from being asked. A setattr of the
    size (a truncate, even to the same size) drops it: the fill, asked again (the truncate
    cleared the ignore mark), decides the file again and it runs (on tmpfs a same-size
    truncate keeps the times, so that decision may come from the trusted cache)."""
    app = fresh_signed(lsm, "setattr")
    runs(lsm, app)
    dropped = sensor(lsm)["sensor"]["invalidated"]
    os.chmod(app, 0o750)
    os.utime(app, ns=(1, 1))
    runs(lsm, app)
    assert sensor(lsm)["sensor"]["invalidated"] == dropped
    os.truncate(app, os.stat(app).st_size)
    assert sensor(lsm)["sensor"]["invalidated"] > dropped
    runs(lsm, app)
    assert all(d["decision"] == "allow" for d in lsm.agent.wait_decision(str(app), 2))


def test_nothing_outside_the_scope_is_denied(lsm: Lsm, tmp_path: Path) -> None:
    outside = copy_signed(lsm.material.bins["app"], tmp_path, None)  # unsigned, not in scope
    ran = exec_file(outside)
    assert ran.returncode == 0 and ran.stdout == "app\n"
    assert exec_file(Path("/bin/true")).returncode == 0
    assert not [d for d in lsm.agent.decisions() if d["event"]["path"] == str(outside)]


# --- policy reloads (SIGHUP) re-arm the kernel; these run last: they change the policy ---


def test_reload_drops_kernel_verdicts_and_signed_files_still_run(lsm: Lsm) -> None:
    """After a swap no verdict from the old policy is trusted, yet nothing trusted breaks:
    a file that ran before and a first-seen one both run at once (the fanotify fill decides
    them again at open-for-exec), and the unsigned one stays denied."""
    ok = lsm.scope / "ok" / "app"
    runs(lsm, ok)
    dropped = sensor(lsm)["verdicts_dropped"]
    write_policy(lsm.policy, mode="enforce", scopes=[lsm.scope],
                 keys=[lsm.material.keys["a"]], deadline_ms=DEADLINE_MS + 1)  # a new digest
    status = reload(lsm.agent)
    assert status["sensor"]["verdicts_dropped"] > dropped, status["sensor"]
    runs(lsm, ok)
    runs(lsm, fresh_signed(lsm, "after-reload"))
    denied(lsm, lsm.scope / "bad" / "app")
    assert status["enforcement"] == lsm.enforcement


def test_reload_to_monitor_and_back(lsm: Lsm) -> None:
    bad = lsm.scope / "bad" / "app"
    lsm.write_policy(mode="monitor")
    assert reload(lsm.agent)["enforcement"] == "monitor"
    runs(lsm, bad)  # the kernel hook no longer denies
    lsm.write_policy(mode="enforce")
    reload(lsm.agent)
    denied(lsm, bad)
    runs(lsm, fresh_signed(lsm, "back-to-enforce"))


def test_reload_revoking_the_key_denies_what_ran_before(lsm: Lsm) -> None:
    ok = lsm.scope / "ok" / "app"
    runs(lsm, ok)  # an allow in the kernel map, and an ignore mark in fanotify
    lsm.write_policy(key="b")
    reload(lsm.agent)
    before = len([d for d in lsm.agent.decisions() if d["event"]["path"] == str(ok)])
    denied(lsm, ok)
    record = lsm.agent.wait_decision(str(ok), before + 1)[-1]
    assert record["decision"] == "deny" and record["enforcement"] == lsm.enforcement
