"""One exit-code table for every verb: scripts and fleet tooling read the same number the same
way whichever verb they ran (README, "Exit codes"; appended to every verb's ``--help``)."""

from __future__ import annotations

EXIT_OK = 0  # done; the answer is yes (trusted, applied, found, is Go, an enforcing backend)
EXIT_NO = 1  # done; the answer is no: the verb's description says which "no" it gives
EXIT_ERROR = 2  # not done: usage, unreadable input, internal error; `run` could not start
EXIT_NO_AGENT = 3  # no agent answers on the control socket (not running, or stalled)
EXIT_PARTIAL = 4  # goinfo only: Go known from its runtime alone, no build info

TABLE = ("Exit codes (the same for every verb): 0 done, the answer is yes; 1 done, the answer "
         "is no (untrusted, rejected, not Go, no match, changed, newly denied, audit-only: "
         "see the verb); 2 usage, input or internal error, or the agent could not start; "
         "3 no agent answers on the control socket; 4 goinfo: Go by its runtime alone.")


def with_table(epilog: str | None) -> str:
    """A verb's own epilog, then the table."""
    return f"{epilog} {TABLE}" if epilog else TABLE
