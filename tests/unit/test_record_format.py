"""auditd record text: encoding agrees with libaudit's, fields are where ausearch looks."""

from __future__ import annotations

import os
import re
from typing import Dict

import audit as libaudit
import pytest

from agent.decision import Enforcement
from agent.errors import Reason
from agent.hostid import record_host
from agent.record.audit_format import (
    AUDIT_ANOM_EXEC,
    AUDIT_SERVICE_START,
    AUDIT_SERVICE_STOP,
    AUDIT_USYS_CONFIG,
    MAX_STRING_BYTES,
    agent_start,
    agent_stop,
    backend_selected,
    denial_message,
    encode_string,
    host_text,
    policy_loaded,
)
from tests.record_fixtures import make_decision

SAMPLES = ["", "a", "bash", "/usr/bin/x", "a b", 'x"y', "é", "\t", "~", "\x7f", "a=b", "\\",
           "/tmp/\udcff", "日本"]


def _decode(value: str) -> str:
    if value.startswith('"'):
        return value[1:-1]
    return bytes.fromhex(value).decode("utf-8", "surrogateescape")


def _body_fields(body: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for part in body.split(" "):
        k, _, v = part.partition("=")
        out.setdefault(k, v)
    return out


@pytest.mark.parametrize("value", SAMPLES)
def test_encoding_matches_libaudit(value: str) -> None:
    raw = value.encode("utf-8", "surrogateescape")
    theirs = libaudit.audit_encode_nv_string("name", raw.decode("latin-1"), 0)
    ours = encode_string("name", value)
    if not raw:
        assert ours == 'name=""'
        return
    # the binding takes str; compare on the hex/quoted form it chose for the same bytes
    assert ours.startswith("name=") and _decode(ours[5:]) == value
    assert ours.startswith('name="') == theirs.startswith('name="')
    if not ours.startswith('name="'):
        assert ours[5:] == raw.hex().upper()


def test_single_quote_is_hex_encoded() -> None:
    # libaudit quotes it; the kernel wraps the body in '...', so execguard hex-encodes it
    assert encode_string("path", "it's") == "path=" + b"it's".hex().upper()
    assert encode_string("path", None) == "path=?"


def test_denial_fields() -> None:
    d = make_decision(5, comm="my tool", path="/srv/a b/x")
    msg = denial_message("0123456789abcdef01234", d, exe="/usr/bin/bash")
    assert msg.type == AUDIT_ANOM_EXEC and msg.success is False
    f = _body_fields(msg.body)
    assert list(f)[:9] == ["op", "decision_id", "opid", "oppid", "ouid", "oauid", "comm", "exe",
                           "path"]
    assert f["op"] == "exec-deny" and f["decision_id"] == "0123456789abcdef01234"
    assert (f["opid"], f["oppid"], f["ouid"], f["oauid"]) == ("4005", "1005", "1000", "1001")
    assert _decode(f["comm"]) == "my tool" and _decode(f["exe"]) == "/usr/bin/bash"
    assert _decode(f["path"]) == _decode(f["cmd"]) == "/srv/a b/x"
    assert f["dev"] == "fe:01" and f["inode"] == "505"
    assert f["sha256"] == f"{5:064x}" and f["reason"] == "no-signature"
    assert f["enforcement"] == "fanotify-deny" and f["policy_version"] == "7"
    text = msg.text("/usr/bin/python3")
    assert text.endswith(' exe="/usr/bin/python3" hostname=? addr=? terminal=? res=failed')


@pytest.mark.parametrize("enf, success", [
    (Enforcement.FANOTIFY_DENY, False), (Enforcement.POST_EXEC_KILL, False),
    (Enforcement.LSM_DENY, False), (Enforcement.MONITOR, True), (Enforcement.AUDIT_ONLY, True)])
def test_result_says_whether_the_exec_was_stopped(enf: Enforcement, success: bool) -> None:
    assert denial_message("x", make_decision(1, enforcement=enf)).success is success


def test_unknown_values_are_question_marks() -> None:
    f = _body_fields(denial_message("x", make_decision(1, full=False)).body)
    assert (f["exe"], f["sha256"], f["rule_id"], f["policy_version"]) == ("?", "?", "?", "?")


def test_long_values_fit_the_kernel_limit() -> None:
    path = "/" + "\u00e9" * 4000
    msg = denial_message("x", make_decision(1, path=path, comm="c" * 16), exe=path)
    assert len(msg.text(path)) < 8560  # the kernel keeps at most this much of msg='...'
    assert len(_body_fields(msg.body)["path"]) == 2 * MAX_STRING_BYTES


def test_agent_events() -> None:
    host = encode_string("host", host_text())
    start = agent_start("0.1.0", "monitor", 42).message()
    assert start.type == AUDIT_SERVICE_START
    assert start.body == ("op=start unit=execguard version=0.1.0 policy_mode=monitor "
                          f"agent_pid=42 {host}")
    stop = agent_stop("SIGTERM").message()
    assert stop.type == AUDIT_SERVICE_STOP and stop.body.endswith(f'info="SIGTERM" {host}')
    be = backend_selected("kill", "post-exec-kill", "fanotify failed: EPERM", ok=False).message()
    assert be.type == AUDIT_USYS_CONFIG and not be.success
    assert "info=" + b"fanotify failed: EPERM".hex().upper() in be.body
    pol = policy_loaded(3, "sha256:ab", "/etc/execguard/policy.toml", "enforce").message()
    assert pol.type == AUDIT_USYS_CONFIG and pol.success
    assert re.search(r'policy_version=3 policy_digest=sha256:ab '
                     r'file="/etc/execguard/policy.toml" policy_mode=enforce info=\? host=',
                     pol.body)
    # every agent event names its host, as every denial does
    assert all(m.body.endswith(host) for m in (start, stop, be, pol))


def test_dev_uses_the_kernel_notation() -> None:
    d = make_decision(1)
    assert os.major(d.event.identity.dev) == 254
    assert "dev=fe:01 " in denial_message("x", d).body


def test_a_denial_names_its_signer_and_the_host() -> None:
    """A wrong signer is why a signed file was denied; collected from many hosts, each record
    says which one (auditd's node= needs name_format set, which hosts often lack)."""
    d = make_decision(1, reason=Reason.IDENTITY_MISMATCH)
    assert d.evidence is not None and d.evidence.identity
    f = _body_fields(denial_message("x", d).body)
    assert f["signer"] == f'"{d.evidence.identity}"'
    host = record_host()
    assert f["host"] == f'"{host["hostname"]}:{host["machine_id"] or "?"}"'
    unsigned = _body_fields(denial_message("x", make_decision(1, full=False)).body)
    assert unsigned["signer"] == "?"
    # a certificate that did not verify proves no signer: its SAN is the attacker's words
    for reason in (Reason.UNTRUSTED_ROOT, Reason.BAD_SIGNATURE, Reason.TLOG_INVALID):
        forged = _body_fields(denial_message("x", make_decision(1, reason=reason)).body)
        assert forged["signer"] == "?", reason
