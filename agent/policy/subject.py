"""Build a policy ``Subject`` from an opened file: the policy's reading of the build info.

Kept apart from ``evaluate`` because it reads the file. The interpretation is policy:
no build info means "not Go"; build info that is present but malformed (a truncated or
tampered Go binary) means "Go, with nothing provable", so Go rules apply and fail closed.
"""

from __future__ import annotations

import dataclasses
import os

from agent.digest import Artifact
from agent.errors import InputError, MalformedInput, NotGoBinary
from agent.goinfo import read_buildinfo
from agent.policy.model import Subject


def subject_of(artifact: Artifact, uid: int, path: str | None = None,
               gid: int | None = None) -> Subject:
    """The subject for ``artifact`` exec'd by ``uid`` (and ``gid``, None when the sensor
    does not know it); ``path`` defaults to the artifact's.

    The file's owner comes from fstat of the artifact's own fd: the file that is exec'd,
    not whatever the path names by now. Raises ``InputError`` when the file cannot be read.
    """
    name = path if path is not None else artifact.path
    try:
        st = os.fstat(artifact.fd)
    except OSError as exc:
        raise InputError(name, f"fstat failed: {exc.strerror or exc}") from None
    base = Subject(name, uid, gid=gid, owner_uid=st.st_uid, owner_gid=st.st_gid)
    try:
        info = read_buildinfo(artifact)
    except NotGoBinary:
        return base
    except MalformedInput:
        return dataclasses.replace(base, go=True)
    return dataclasses.replace(base, go=True, buildinfo=info)
