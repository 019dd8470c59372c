"""Where an enforce policy lets executables run without a signature: load-time warnings.

Enforce mode promises that nothing unsigned runs in scope. An allow rule that is not
limited to Go files (``match.go`` false or absent), or ``fallthrough = "allow"``, breaks
that promise for the files it lets through, and "not Go" is only what static inspection of
the file can establish: a packed, self-decrypting or heavily rewritten Go program shows no
Go tables at all (docs/goinfo.md). Such a policy stays valid (deliberate exceptions exist,
and monitor mode blocks nothing anyway), but every load names each such rule: the agent
prints the warnings at start and reports them in ``execguard status``; ``execguard policy
lint``, ``build`` and ``verify`` print them too.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Set

from agent.policy.model import Action, Match, Mode, Rule

HINT = ("require a signature for them, or keep the exception knowingly "
        "(docs/policy.md, \"Enforce mode\")")


def _unconditional(match: Match) -> bool:
    """Every path and every caller (``match.go`` aside)."""
    return (match.module is None
            and all(ids is None for ids in (match.uids, match.gids, match.owner_uids,
                                             match.owner_gids))
            and all(g.pattern.rstrip("/") in ("", "/**") for g in match.paths))


def _what(match: Match) -> str:
    narrowed = any(v is not None for v in (match.uids, match.gids, match.owner_uids,
                                            match.owner_gids)) or not all(
        g.pattern.rstrip("/") in ("", "/**") for g in match.paths)
    where = " that it matches" if narrowed else ""
    if match.go is False:
        return f"executables that are not Go{where}"
    return f"every executable{where}, Go or not,"


def unsigned_paths(mode: Mode, rules: Sequence[Rule], fallthrough: Action,
                   lines: Sequence[Optional[int]] = ()) -> List[str]:
    """One warning per way an enforce policy lets an executable run unsigned; none in
    monitor mode. ``lines[i]`` is rule i's source line."""
    if mode is not Mode.ENFORCE:
        return []
    out: List[str] = []
    # the match.go values (None: both) whose every file an earlier rule already catches
    covered: Set[Optional[bool]] = set()
    for i, rule in enumerate(rules):
        line = lines[i] if i < len(lines) else None
        at = f"line {line}: " if line is not None else ""
        if rule.action is Action.ALLOW and rule.match.go is not True:
            out.append(f"{at}rules[{i}] (id {rule.rule_id}): enforce mode, but this allow "
                       f"rule lets {_what(rule.match)} run without a signature; {HINT}")
        if _unconditional(rule.match):
            covered.add(rule.match.go)
        if None in covered or covered >= {True, False}:
            return out  # later rules and the fallthrough are never reached
    if fallthrough is Action.ALLOW:
        out.append('fallthrough = "allow": enforce mode, but an executable in scope that no '
                   f"rule matches runs without a signature; {HINT}")
    return out
