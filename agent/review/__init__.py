"""Denial review for security teams: ``execguard denials`` (docs/review.md).

Reads the decision log only through ``sources.read_records`` (``from_line``): filter
(``query``), show (``output``), tail across rotation (``follow``), and explain one record
with the commands that re-check it (``explain``, ``reproduce``). ``locate`` finds the log
of the configured agent.
"""

from agent.review.explain import ausearch_command, explain_json, explain_text, find_record
from agent.review.follow import Follower
from agent.review.locate import Located, locate_log_dir
from agent.review.query import FilterError, Query, build_query, verdict_label
from agent.review.reproduce import Candidate, Reproduction, load_candidates, reproduce

__all__ = [
    "Candidate",
    "FilterError",
    "Follower",
    "Located",
    "Query",
    "Reproduction",
    "ausearch_command",
    "build_query",
    "explain_json",
    "explain_text",
    "find_record",
    "load_candidates",
    "locate_log_dir",
    "reproduce",
    "verdict_label",
]
