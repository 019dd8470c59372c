"""Break-glass: offline signed, host-bound, single-use tokens (``token``) and the agent's
monitor-mode overlay that applies and reverts them (``overlay``); docs/breakglass.md."""
