"""docs/policy.md stays true: its example parses, and its copy of the default policy means
what the embedded default means."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List

from agent.policy import Action, Mode, default_policy, parse_policy
from agent.verify.keys import load_public_key
from tests.policy_fixtures import Material, material_fixture  # noqa: F401

DOC = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


def toml_blocks() -> List[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)


def test_example_parses(material: Material, tmp_path: Path) -> None:
    example = next(b for b in toml_blocks() if b.startswith("version = 12"))
    keys, root = tmp_path / "keys", tmp_path / "trusted_root.json"
    keys.mkdir()
    root.write_text(json.dumps({"mediaType": "application/vnd.dev.sigstore.trustedroot+json"}))
    fp = load_public_key(str(material.keys["a"])).fingerprint
    text = (example.replace("/etc/execguard/keys/", f"{keys}/")
            .replace("/opt/app/release.pub", str(material.keys["a"]))
            .replace("/etc/execguard/trusted_root.json", str(root))
            .replace("sha256:4f0c…(64 hex digits)", fp))
    snap = parse_policy(text.encode(), "example.toml")
    assert snap.mode is Mode.ENFORCE and [r.rule_id for r in snap.rules] == [
        "no-tmp", "trial-tools", "acme-go", "scripts-by-ops"]
    assert snap.rules[1].mode is Mode.MONITOR and snap.rules[1].match.owner_uids == (1000,)
    acme = snap.rules[2]
    assert len(acme.module_pins) == 2 and acme.predicate is not None
    assert "-trimpath=true" in acme.predicate.describe()
    assert acme.module_pins[1].signers.identities[0].templated
    assert snap.trust.identities[0].extensions_regex
    assert snap.rules[3].match.gids == (998,)
    # the enforce example requires a signature on every executable in scope
    assert not [w for w in snap.warnings if "without a signature" in w], snap.warnings


def test_identity_example_parses() -> None:
    block = next(b for b in toml_blocks() if b.startswith("[[trust.identities]]"))
    snap = parse_policy(f"version = 1\n[trust]\nkeys = []\n{block}".encode(), "ids.toml")
    rule = snap.trust.identities[0]
    assert len(rule.extensions) == 2 and len(rule.extensions_regex) == 1


def test_documented_default_matches_the_embedded_one() -> None:
    documented = next(b for b in toml_blocks() if 'id = "go-signed"' in b)
    doc_snap, real = parse_policy(documented.encode(), "doc.toml"), default_policy()
    doc_canon, real_canon = json.loads(doc_snap.canonical), json.loads(real.canonical)
    for canon in (doc_canon, real_canon):  # descriptions are prose, the rest is meaning
        canon.pop("description")
        for rule in canon["rules"]:
            rule.pop("description")
    assert doc_canon == real_canon
    assert real.fallthrough is Action.ALLOW
