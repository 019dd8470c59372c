"""Wires metrics into a running Agent: the listener, the textfile ticker, a ``metrics``
control verb and a policy hook (for the policy's load time). Called from ``Agent.start``
only when ``--metrics-listen`` or ``--metrics-textfile`` was given.

A listener that cannot bind (the port is taken) is a warning in ``execguard status``, not a
reason to stop enforcing; a malformed or non-loopback address is refused before the agent
starts (``check_config``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from agent.metrics.config import MetricsConfig, check_config
from agent.metrics.exposition import CONTENT_TYPE, Readings, make_registry, render
from agent.metrics.listener import MetricsListener
from agent.metrics.textfile import TextfileWriter
from agent.policy import PolicySnapshot

if TYPE_CHECKING:
    from agent.daemon import Agent


class MetricsService:
    def __init__(self, agent: Agent, cfg: MetricsConfig) -> None:
        self.agent = agent
        self.cfg = cfg
        self.address = check_config(cfg)
        self.policy_loaded_at = agent.status_state.started_at
        self.registry = make_registry(self.read)
        self.listener: Optional[MetricsListener] = None
        self.textfile: Optional[TextfileWriter] = None
        self.listen_error: Optional[str] = None
        self._up = True

    def read(self) -> Readings:
        a = self.agent
        # through the control verb: features decorate it (policy_bundle, breakglass)
        return Readings(status=a.handle({"cmd": "status"}), histograms=a.decider.histograms(),
                        decisions=a.decision_tally.snapshot(),
                        policy_loaded_at=self.policy_loaded_at, up=self._up,
                        started_at=a.status_state.started_at)

    def render(self) -> bytes:
        return render(self.registry)

    def start(self) -> None:
        a = self.agent
        a.commands["metrics"] = self.control
        a.status_sections.append(lambda out: out.update(metrics=self.summary()))
        a.policy_hooks.append(self.policy_installed)
        if self.cfg.textfile:
            self.textfile = TextfileWriter(self.cfg.textfile, self.render, self.cfg.interval_s)
            self.textfile.start()
            a.tickers.append(self.textfile.tick)
        if self.address is not None:
            try:
                self.listener = MetricsListener(self.address, self.render, CONTENT_TYPE)
            except OSError as exc:
                self.listen_error = f"metrics listener on {self.address} unavailable: {exc}"
                a.status_state.warnings.append(self.listen_error)
                a.say(f"WARNING: {self.listen_error}")
            else:
                self.listener.start()
                a.say(f"metrics on http://{self.listener.address}/metrics")

    def policy_installed(self, snapshot: PolicySnapshot) -> None:
        self.policy_loaded_at = time.time()

    def summary(self) -> Dict[str, Any]:
        """The ``metrics`` section of ``execguard status``: where to find them."""
        return {"listen": str(self.listener.address) if self.listener is not None else None,
                "listen_error": self.listen_error,
                "textfile": self.textfile.path if self.textfile is not None else None}

    def control(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """The ``metrics`` control verb: where metrics go, their counters; ``"text": true``
        adds the exposition itself."""
        out: Dict[str, Any] = {
            "listen": self.listener.stats() if self.listener is not None else None,
            "listen_error": self.listen_error,
            "textfile": self.textfile.stats() if self.textfile is not None else None,
        }
        if request.get("text") is True:
            out["text"] = self.render().decode("utf-8")
        return out

    def close(self) -> None:
        """Stop listening; the textfile's last version says ``execguard_up 0``."""
        if self.listener is not None:
            self.listener.close()
        if self.textfile is not None:
            self._up = False
            self.textfile.close(final=self.render)


def start_metrics(agent: Agent, cfg: MetricsConfig) -> Optional[MetricsService]:
    if not cfg.enabled:
        return None
    service = MetricsService(agent, cfg)
    service.start()
    return service
