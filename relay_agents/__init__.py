"""relay-agents: relay decoding (a small student calls a large teacher for hard steps) for agents.

The public names load on first use (PEP 562): ``import relay_agents.cli`` or
``relay_agents.config`` then costs no LangGraph, LangChain or OpenAI import (1.3 s of the
command line's 1.8 s start before).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each public name is defined.
_SOURCES = {
    "relay_agents.api": (
        "BudgetState",
        "RelayDelta",
        "RelayEvent",
        "RelayResult",
        "RelayStream",
        "RelayUsage",
        "Span",
        "arelay",
        "astream_relay",
        "relay",
        "stream_relay",
    ),
    "relay_agents.chat_model": ("ChatRelay",),
    "relay_agents.config": ("ConfigError", "load_config"),
    "relay_agents.core.config": ("Budget", "Endpoint", "RelayConfig"),
    "relay_agents.core.tools": ("ToolChoiceUnmet",),
    "relay_agents.graph": ("build_relay_graph",),
    "relay_agents.core.policies": (
        "CommandPolicy",
        "ConfidencePolicy",
        "IntervalPolicy",
        "RandomPolicy",
        "TeacherFreePolicy",
        "TeacherOnlyPolicy",
    ),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

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
    "ToolChoiceUnmet",
    "arelay",
    "astream_relay",
    "build_relay_graph",
    "load_config",
    "relay",
    "stream_relay",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
