"""``execguard policy build|sign|verify|diff|apply``: outputs and exit codes (0 ok, 1 rejected
or different, 2 error), with real keys and files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from agent import signing
from agent.cli import main

Run = Tuple[int, str, str]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def setup(tmp_path: Path) -> Dict[str, Path]:
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    files: Dict[str, Path] = {"pinned": pinned}
    for name in ("r1", "r2", "r3", "x"):
        key = signing.generate()
        files[name] = tmp_path / f"{name}.key"
        files[name].write_bytes(signing.plain_private_pem(key))
        if name != "x":
            (pinned / f"{name}.pub").write_bytes(signing.public_pem(key.public_key()))
    release = tmp_path / "release.pub"
    release.write_bytes(signing.public_pem(signing.generate().public_key()))
    files["release"] = release
    files["policy"] = policy(tmp_path / "p.toml", 3, release, ["deny-tmp", "go-signed"])
    return files


def policy(path: Path, version: int, key: Path, rules: List[str], mode: str = "enforce"
           ) -> Path:
    blocks = {
        "deny-tmp": ('[[rules]]\nid = "deny-tmp"\naction = "deny"\n'
                     'match = { paths = ["/tmp/**"] }\n'),
        "go-signed": ('[[rules]]\nid = "go-signed"\naction = "require-signature"\n'
                      'match = { go = true }\n'),
        "go-signed-opt": ('[[rules]]\nid = "go-signed"\naction = "require-signature"\n'
                          'match = { go = true, paths = ["/opt/**"] }\n'),
        "scripts": '[[rules]]\nid = "scripts"\naction = "allow"\nmatch = { go = false }\n',
    }
    path.write_text(f'version = {version}\nmode = "{mode}"\nscopes = ["/opt"]\n'
                    f'[trust]\nkeys = ["{key}"]\n' + "".join(blocks[r] for r in rules))
    return path


def build(capsys: pytest.CaptureFixture[str], src: Path, out: Path, *extra: str) -> Run:
    return run(capsys, "policy", "build", str(src), "-o", str(out), *extra)


def test_build_sign_verify_exit_codes(capsys: pytest.CaptureFixture[str],
                                      setup: Dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "b.bundle"
    code, out, _ = build(capsys, setup["policy"], bundle, "--expires", "30d", "--json")
    assert code == 0
    built = json.loads(out)
    assert built["version"] == 3 and built["digest"].startswith("sha256:")
    assert len(built["keys"]) == 1
    verify = ("policy", "verify", str(bundle), "--keys", str(setup["pinned"]), "--threshold",
              "2", "--json")
    code, out, _ = run(capsys, *verify)
    assert code == 1 and json.loads(out)["reason"] == "threshold"
    for signer in ("r1", "x", "r2"):
        assert run(capsys, "policy", "sign", str(bundle), "--key", str(setup[signer]))[0] == 0
    code, out, _ = run(capsys, *verify)
    result = json.loads(out)
    assert code == 0 and result["verdict"] == "accept" and result["reason"] == "ok"
    assert result["version"] == 3 and result["digest"] == built["digest"]
    assert len(result["signers"]["valid"]) == 2 and len(result["signers"]["unknown"]) == 1
    assert result["expires"] and result["issued_at"]
    # re-signing with the same key replaces its signature
    before = len(json.loads(bundle.read_text())["signatures"])
    assert run(capsys, "policy", "sign", str(bundle), "--key", str(setup["r1"]))[0] == 0
    assert len(json.loads(bundle.read_text())["signatures"]) == before == 3
    # --min-version and the plain text form
    code, out, _ = run(capsys, "policy", "verify", str(bundle), "--keys", str(setup["pinned"]),
                       "--threshold", "2", "--min-version", "4")
    assert code == 1 and "REJECTED (rollback)" in out
    code, out, _ = run(capsys, "policy", "verify", str(bundle), "--keys", str(setup["pinned"]),
                       "--at", "2099-01-01")
    assert code == 1 and "REJECTED (expired)" in out


def test_verify_errors_exit_2(capsys: pytest.CaptureFixture[str], setup: Dict[str, Path],
                              tmp_path: Path) -> None:
    bundle = tmp_path / "b.bundle"
    assert build(capsys, setup["policy"], bundle)[0] == 0
    cases = [
        ("--keys", str(tmp_path / "nowhere")),
        ("--keys", str(setup["pinned"]), "--threshold", "4"),  # only 3 pinned
    ]
    for extra in cases:
        code, out, _ = run(capsys, "policy", "verify", str(bundle), *extra, "--json")
        assert code == 2 and "error" in json.loads(out), extra
    code, _, err = run(capsys, "policy", "verify", str(tmp_path / "missing.bundle"),
                       "--keys", str(setup["pinned"]))
    assert code == 2 and "missing.bundle" in err
    garbage = tmp_path / "garbage.bundle"
    garbage.write_text("not json")
    code, out, _ = run(capsys, "policy", "verify", str(garbage), "--keys", str(setup["pinned"]),
                       "--json")
    assert code == 1 and json.loads(out)["reason"] == "malformed"


def test_build_errors_name_the_file(capsys: pytest.CaptureFixture[str], setup: Dict[str, Path],
                                    tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\nmode = "lenient"\n')
    code, _, err = build(capsys, bad, tmp_path / "o.bundle")
    assert code == 2 and "bad.toml" in err and "mode" in err
    missing_key = policy(tmp_path / "k.toml", 1, tmp_path / "gone.pub", ["go-signed"])
    code, _, err = build(capsys, missing_key, tmp_path / "o.bundle")
    assert code == 2 and "gone.pub" in err
    code, _, err = build(capsys, setup["policy"], tmp_path / "o.bundle", "--expires", "soon")
    assert code == 2 and "soon" in err
    out = tmp_path / "exists.bundle"
    out.write_text("keep")
    assert build(capsys, setup["policy"], out)[0] == 2 and out.read_text() == "keep"
    assert build(capsys, setup["policy"], out, "--force")[0] == 0


def test_sign_with_an_encrypted_key_and_bad_inputs(capsys: pytest.CaptureFixture[str],
                                                   setup: Dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "b.bundle"
    assert build(capsys, setup["policy"], bundle)[0] == 0
    enc = tmp_path / "enc.key"
    enc.write_bytes(signing.encrypt_private_key(signing.generate(), b"s3cret"))
    monkeypatch.setenv("POLICY_PW", "s3cret")
    code, out, _ = run(capsys, "policy", "sign", str(bundle), "--key", str(enc),
                       "--password-env", "POLICY_PW", "--json")
    assert code == 0 and len(json.loads(out)["signatures"]) == 1
    monkeypatch.setenv("POLICY_PW", "wrong")
    code, _, err = run(capsys, "policy", "sign", str(bundle), "--key", str(enc),
                       "--password-env", "POLICY_PW")
    assert code == 2 and "enc.key" in err
    code, _, err = run(capsys, "policy", "sign", str(setup["policy"]), "--key", str(setup["r1"]))
    assert code == 2 and "p.toml" in err  # not a bundle
    code, _, err = run(capsys, "policy", "sign", str(bundle), "--key", str(tmp_path / "no.key"))
    assert code == 2 and "no.key" in err


def test_diff_rules_fields_and_bundles(capsys: pytest.CaptureFixture[str],
                                      setup: Dict[str, Path], tmp_path: Path) -> None:
    a = setup["policy"]
    b = policy(tmp_path / "b.toml", 4, setup["release"], ["go-signed-opt", "scripts"],
               mode="monitor")
    assert run(capsys, "policy", "diff", str(a), str(a))[0] == 0
    code, out, _ = run(capsys, "policy", "diff", str(a), str(b), "--json")
    assert code == 1
    d: Dict[str, Any] = json.loads(out)
    assert d["changed"] and d["version"] == {"a": 3, "b": 4}
    assert [r["id"] for r in d["rules"]["added"]] == ["scripts"]
    assert [r["id"] for r in d["rules"]["removed"]] == ["deny-tmp"]
    changed = d["rules"]["changed"]
    assert changed[0]["id"] == "go-signed"
    assert changed[0]["changes"][0] == {"field": "match.paths", "a": ["/**"], "b": ["/opt/**"]}
    assert {"field": "mode", "a": "enforce", "b": "monitor"} in d["fields"]
    code, text, _ = run(capsys, "policy", "diff", str(a), str(b))
    assert code == 1
    for line in ("version: 3 -> 4", "+ rule scripts (allow)", "- rule deny-tmp (deny)",
                 '~ mode: "enforce" -> "monitor"', '~ rule go-signed match.paths'):
        assert line in text, text
    # bundle against bundle: validity and embedded keys too
    ba, bb = tmp_path / "a.bundle", tmp_path / "b.bundle"
    assert build(capsys, a, ba, "--issued-at", "2026-11-01T00:00:00Z")[0] == 0
    other = tmp_path / "other.pub"
    other.write_bytes(signing.public_pem(signing.generate().public_key()))
    assert build(capsys, policy(tmp_path / "c.toml", 5, other, ["go-signed"]), bb,
                 "--issued-at", "2026-11-02T00:00:00Z", "--expires", "10d")[0] == 0
    code, out, _ = run(capsys, "policy", "diff", str(ba), str(bb), "--json")
    d = json.loads(out)
    assert code == 1 and d["bundle"]["expires"] == {"a": "2027-01-30T00:00:00Z",
                                                    "b": "2026-11-12T00:00:00Z"}
    assert len(d["bundle"]["keys_added"]) == 1 and len(d["bundle"]["keys_removed"]) == 1
    assert {"field": "trust.keys", "a": [str(setup["release"])], "b": [str(other)]} in d["fields"]
    # a bundle and the policy it was built from differ only in what the bundle adds
    code, out, _ = run(capsys, "policy", "diff", str(a), str(ba), "--json")
    d = json.loads(out)
    assert not d["fields"] and not d["rules"]["changed"] and d["version"] == {"a": 3, "b": 3}
    garbage = tmp_path / "g.toml"
    garbage.write_text("version = [")
    assert run(capsys, "policy", "diff", str(a), str(garbage))[0] == 2


def test_apply_without_an_agent_is_exit_3_and_a_missing_bundle_is_2(
        capsys: pytest.CaptureFixture[str], setup: Dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "b.bundle"
    assert build(capsys, setup["policy"], bundle)[0] == 0
    code, out, _ = run(capsys, "policy", "apply", str(bundle), "--state-dir",
                       str(tmp_path / "no-agent"), "--json")
    assert code == 3 and "no agent" in json.loads(out)["error"]
    code, _, err = run(capsys, "policy", "apply", str(tmp_path / "none.bundle"))
    assert code == 2 and "none.bundle" in err


def test_run_flags_reach_run_options() -> None:
    from agent.cli import build_parser
    from agent.cli.policy_cmd import run_options

    args = build_parser().parse_args(["run", "--policy-keys", "/k", "--policy-threshold", "2",
                                      "--policy-drop-dir", "/d", "--policy-expiry-warning",
                                      "2d"])
    assert run_options(args) == {"policy_keys": "/k", "policy_threshold": 2,
                                 "policy_drop_dir": "/d", "policy_expiry_warning": 172800.0}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--policy-threshold", "0"])
