"""Glob semantics: one-segment ``*``/``?``, ``**`` across segments, and "a directory covers
everything below it". Tables of (pattern, path, expected)."""

from __future__ import annotations

import re

import pytest

from agent.policy.globs import Glob, GlobError

PATHS = [
    ("/", "/usr/bin/ls", True),
    ("/**", "/usr/bin/ls", True),
    ("/opt/app", "/opt/app", True),
    ("/opt/app", "/opt/app/bin/tool", True),  # a directory covers what is below it
    ("/opt/app/", "/opt/app/bin/tool", True),
    ("/opt/app", "/opt/apple", False),  # ... but not a sibling with a longer name
    ("/opt/*/bin", "/opt/x/bin/tool", True),
    ("/opt/*/bin", "/opt/x/y/bin/tool", False),  # * stays inside one segment
    ("/opt/**/bin", "/opt/x/y/bin/tool", True),
    ("/opt/**/bin", "/opt/bin/tool", True),  # ** may be zero segments
    ("/usr/bin/*.sh", "/usr/bin/run.sh", True),
    ("/usr/bin/*.sh", "/usr/bin/run.shx", False),
    ("/usr/bin/?s", "/usr/bin/ls", True),
    ("/usr/bin/?s", "/usr/bin/lss", False),
    ("/usr/bin/[lp]s", "/usr/bin/ps", True),
    ("/usr/bin/[!lp]s", "/usr/bin/ps", False),
    ("/usr/bin/[!lp]s", "/usr/bin/ks", True),
    ("/usr/bin/*", "/usr/bin/.hidden", True),  # no dotfile exception
    ("/a.b/c+d", "/a.b/c+d", True),  # regex metacharacters are literal
    ("/a.b/c+d", "/aXb/cd", False),
    ("/srv/*", "/srv", False),
    ("/tmp/x", "/tmp/x\n", False),
    ("/a/[+-0]b", "/a/+b", True),
    ("/a/[+-0]b", "/a//b", False),  # a range spanning '/' still stays in its segment
]


@pytest.mark.parametrize(("pattern", "path", "expected"), PATHS)
def test_path_glob(pattern: str, path: str, expected: bool) -> None:
    assert Glob.compile(pattern).matches(path) is expected


MODULES = [
    ("example.com/*", "example.com/app", True),
    ("example.com/*", "example.com/app/v2", True),  # covers nested module paths too
    ("example.com/*", "example.org/app", False),
    ("github.com/acme/**", "github.com/acme/x/y", True),
    ("github.com/acme/tool", "github.com/acme/toolbox", False),
]


@pytest.mark.parametrize(("pattern", "module", "expected"), MODULES)
def test_module_glob(pattern: str, module: str, expected: bool) -> None:
    assert Glob.compile(pattern, absolute=False).matches(module) is expected


@pytest.mark.parametrize(("pattern", "root"), [
    ("/", "/"), ("/**", "/"), ("/opt/app", "/opt/app"), ("/opt/app/", "/opt/app"),
    ("/opt/*/bin", "/opt"), ("/srv/a[bc]/x", "/srv"),
])
def test_root_is_the_fixed_prefix(pattern: str, root: str) -> None:
    assert Glob.compile(pattern).root() == root


@pytest.mark.parametrize(("pattern", "absolute", "problem"), [
    ("", True, "empty pattern"),
    ("opt", True, "not an absolute path glob"),
    ("/x", False, "does not start with '/'"),
    ("/a//b", True, "empty, '.' or '..' segment"),
    ("/a/./b", True, "empty, '.' or '..' segment"),
    ("/a/**x", True, "whole path segment"),
    ("/a/[b", True, "unterminated '['"),
    ("/a/[!]", True, "unterminated '['"),
    ("/a/\x00", True, "NUL byte"),
])
def test_bad_globs(pattern: str, absolute: bool, problem: str) -> None:
    with pytest.raises(GlobError, match=re.escape(problem)):
        Glob.compile(pattern, absolute)
