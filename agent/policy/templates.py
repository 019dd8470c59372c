"""``{module_repo}``: the source repository a Go main module path names, for binding a
module to the workflow that may sign it.

The derivation is deliberately narrow: only ``github.com/OWNER/REPO[/...]`` module paths
give a repository, ``github.com/OWNER/REPO``. Anything else (another host, a vanity import
path, a malformed segment) gives None, and a signer template then matches nobody.
"""

from __future__ import annotations

import re
from typing import Optional

_OWNER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})")  # GitHub user/organization names
_REPO = re.compile(r"[A-Za-z0-9._-]{1,100}")


def module_repo(module: Optional[str]) -> Optional[str]:
    """``github.com/acme/app`` for ``github.com/acme/app/v2/cmd``; None when not derivable."""
    if module is None:
        return None
    parts = module.split("/")
    if len(parts) < 3 or parts[0] != "github.com":
        return None
    owner, repo = parts[1], parts[2]
    if not _OWNER.fullmatch(owner) or not _REPO.fullmatch(repo):
        return None
    if repo in (".", "..") or repo.lower().endswith(".git"):
        return None
    return f"github.com/{owner}/{repo}"
