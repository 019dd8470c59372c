"""Build a policy ``Subject`` from an opened file: the policy's reading of the build info.

Kept apart from ``evaluate`` because it reads the file. The interpretation is policy:
no build info means "not Go"; build info that is present but malformed (a truncated or
tampered Go binary) means "Go, with nothing provable", so Go rules apply and fail closed.
"""

from __future__ import annotations

from agent.digest import Artifact
from agent.errors import MalformedInput, NotGoBinary
from agent.goinfo import read_buildinfo
from agent.policy.model import Subject


def subject_of(artifact: Artifact, uid: int, path: str | None = None) -> Subject:
    """The subject for ``artifact`` exec'd by ``uid``; ``path`` defaults to the artifact's.

    Raises ``InputError`` when the file cannot be read at all.
    """
    name = path if path is not None else artifact.path
    try:
        info = read_buildinfo(artifact)
    except NotGoBinary:
        return Subject(name, uid, go=False)
    except MalformedInput:
        return Subject(name, uid, go=True)
    return Subject(name, uid, go=True, buildinfo=info)
