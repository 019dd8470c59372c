"""What ``execguard run --metrics-*`` asked for, checked before the agent starts anything.

Standard library only: the daemon imports this whether or not metrics are on, and imports
prometheus_client (through ``agent.metrics.service``) only when they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from agent.metrics.listener import ListenAddress, parse_listen
from agent.metrics.textfile import MIN_INTERVAL_S, TextfileError, check_path

DEFAULT_INTERVAL_S = 15.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: Optional[str] = None  # HOST:PORT
    allow_remote: bool = False  # listen on a non-loopback address
    textfile: Optional[str] = None  # node_exporter textfile collector target (*.prom)
    interval_s: float = DEFAULT_INTERVAL_S  # textfile rewrite period

    @property
    def enabled(self) -> bool:
        return bool(self.listen or self.textfile)


def check_config(cfg: MetricsConfig) -> Optional[ListenAddress]:
    """Raise ListenError/TextfileError (ExecguardError) for values that cannot work; returns
    the parsed listen address, if any."""
    address = parse_listen(cfg.listen, cfg.allow_remote) if cfg.listen else None
    if cfg.textfile:
        check_path(cfg.textfile)
        if not cfg.interval_s >= MIN_INTERVAL_S:
            raise TextfileError(f"--metrics-interval {cfg.interval_s}: at least "
                                f"{MIN_INTERVAL_S:g} s")
    return address


def add_arguments(parser: Any) -> None:
    """The ``--metrics-*`` flags of ``execguard run``."""
    g = parser.add_argument_group(
        "metrics", "Prometheus metrics (docs/metrics.md); off unless one of these is given. "
        "Neither ever delays a decision.")
    g.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve /metrics over HTTP on this address, e.g. 127.0.0.1:9464 "
                   "(IP literals; loopback only unless --metrics-allow-remote)")
    g.add_argument("--metrics-allow-remote", action="store_true",
                   help="allow --metrics-listen on a non-loopback address (the metrics name "
                   "the policy digest and backend; put a firewall in front)")
    g.add_argument("--metrics-textfile", metavar="FILE",
                   help="also write the metrics to FILE (*.prom) for node_exporter's textfile "
                   "collector, e.g. /var/lib/node_exporter/textfile_collector/execguard.prom; "
                   "replaced atomically; says execguard_up 0 after a clean stop")
    g.add_argument("--metrics-interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S",
                   help=f"rewrite the textfile every S seconds (default {DEFAULT_INTERVAL_S:g})")


def from_arguments(args: Any) -> MetricsConfig:
    return MetricsConfig(listen=args.metrics_listen, allow_remote=args.metrics_allow_remote,
                         textfile=args.metrics_textfile, interval_s=args.metrics_interval)
