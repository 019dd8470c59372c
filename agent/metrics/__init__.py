"""Prometheus metrics for the agent: counters kept cheaply on the exec path (``tally``),
rendered at scrape time (``exposition``), served on loopback (``listener``) or written for
node_exporter's textfile collector (``textfile``); ``service`` wires them into the daemon.

Only ``tally`` is imported by the exec path; it depends on nothing but the standard library.
"""
