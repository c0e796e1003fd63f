"""relay-agents: relay decoding (a small student calls a large teacher for hard steps) for agents."""

from relay_agents.api import (
    BudgetState,
    RelayDelta,
    RelayEvent,
    RelayResult,
    RelayStream,
    RelayUsage,
    Span,
    arelay,
    astream_relay,
    relay,
    stream_relay,
)
from relay_agents.chat_model import ChatRelay
from relay_agents.config import ConfigError, load_config
from relay_agents.core.config import Budget, Endpoint, RelayConfig
from relay_agents.core.policies import (
    CommandPolicy,
    ConfidencePolicy,
    IntervalPolicy,
    RandomPolicy,
    TeacherFreePolicy,
    TeacherOnlyPolicy,
)
from relay_agents.graph import build_relay_graph

__all__ = [
    "Budget",
    "BudgetState",
    "ChatRelay",
    "CommandPolicy",
    "ConfidencePolicy",
    "ConfigError",
    "Endpoint",
    "IntervalPolicy",
    "RandomPolicy",
    "RelayConfig",
    "RelayDelta",
    "RelayEvent",
    "RelayResult",
    "RelayStream",
    "RelayUsage",
    "Span",
    "TeacherFreePolicy",
    "TeacherOnlyPolicy",
    "arelay",
    "astream_relay",
    "build_relay_graph",
    "load_config",
    "relay",
    "stream_relay",
]
