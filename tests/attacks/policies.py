"""The policies the ways run under, all in enforce mode, scoped to the test's own tmpfs and
trusting the test key only.

- ``ALL_SIGNED`` (most ways): every file in the scope needs a signature by the test key.
- ``GO_DEFAULT``: the embedded default policy (Go binaries need a signature, everything else
  runs) with ``mode = "enforce"``: what an operator gets from ``--mode enforce`` alone.
- ``PATH_RULE``: ``ALL_SIGNED`` behind one path rule that allows ``<scope>/dir-rename/*/allowed``
  unsigned (a verdict earned by path, which a directory rename must not carry along).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

ALL_SIGNED = "all-signed"
GO_DEFAULT = "go-default"
PATH_RULE = "path-rule"
KINDS: Tuple[str, ...] = (ALL_SIGNED, GO_DEFAULT, PATH_RULE)
PATH_RULE_DIR = "dir-rename"  # <scope>/dir-rename/<user>/allowed is allowed by path


def _q(text: str) -> str:
    return json.dumps(text)  # a TOML basic string is a JSON string for these paths


def _all_signed(scope: Path, key: Path, deadline_ms: int, path_rule: bool) -> str:
    rule = ""
    if path_rule:
        rule = ('[[rules]]\nid = "path-allowed"\naction = "allow"\n'
                f"match = {{ paths = [{_q(f'{scope}/{PATH_RULE_DIR}/*/allowed')}] }}\n\n")
    return f"""# execguard attack suite ({PATH_RULE if path_rule else ALL_SIGNED})
version = 1
mode = "enforce"
scopes = [{_q(str(scope))}]
on_timeout = "deny"
fallthrough = "deny"

[limits]
decision_deadline_ms = {deadline_ms}

[trust]
keys = [{_q(str(key))}]

{rule}[[rules]]
id = "all-signed"
description = "every file in the scope needs a signature by the test key"
action = "require-signature"
"""


def policy_text(kind: str, scope: Path, key: Path, deadline_ms: int) -> str:
    if kind == GO_DEFAULT:
        from tests.rearm_fixtures import DEFAULT  # the embedded default, as shipped

        text = DEFAULT.read_text()
        for old, new in (('mode = "monitor"', 'mode = "enforce"'),
                         ('scopes = ["/"]', f"scopes = [{_q(str(scope))}]"),
                         ('keys = ["/etc/execguard/keys/"]', f"keys = [{_q(str(key))}]"),
                         ("decision_deadline_ms = 500", f"decision_deadline_ms = {deadline_ms}")):
            if old not in text:
                raise RuntimeError(f"{DEFAULT} no longer has {old!r}")
            text = text.replace(old, new)
        return text
    if kind not in (ALL_SIGNED, PATH_RULE):
        raise ValueError(f"unknown policy kind {kind!r}")
    return _all_signed(scope, key, deadline_ms, kind == PATH_RULE)


def write_policy(path: Path, kind: str, scope: Path, key: Path, deadline_ms: int) -> Path:
    path.write_text(policy_text(kind, scope, key, deadline_ms))
    return path
