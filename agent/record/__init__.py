"""Records of what the agent decided: auditd and the JSON-lines decision log (docs/records.md).

The daemon holds one ``Recorder``; nothing on the decision path waits for either sink.
"""

from agent.record.audit_format import (
    AgentEvent,
    AgentEventKind,
    agent_start,
    agent_stop,
    backend_selected,
    policy_loaded,
)
from agent.record.decision_log import (
    LogFormatError,
    LoggedDecision,
    from_json,
    to_json,
)
from agent.record.recorder import Recorder, RecorderConfig

__all__ = [
    "AgentEvent",
    "AgentEventKind",
    "LogFormatError",
    "LoggedDecision",
    "Recorder",
    "RecorderConfig",
    "agent_start",
    "agent_stop",
    "backend_selected",
    "from_json",
    "policy_loaded",
    "to_json",
]
