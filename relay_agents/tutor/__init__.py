"""The math-tutor demo: a student-led tutor graph, its chat page and its terminal mode.

``build_tutor_graph`` is the LangGraph graph (``graphs/tutor.py``); ``service.Tutor`` keeps
the conversations and budgets that ``web.create_tutor_app`` (the page) and
``terminal.run_terminal`` (``relay-agents tutor --cli``) show; those need the ``tutor`` extra.
"""

from relay_agents.tutor.graph import (
    DEFAULT_BUDGET,
    TUTOR_SYSTEM_PROMPT,
    build_tutor_graph,
    recent_messages,
    tutor_config,
)

__all__ = [
    "DEFAULT_BUDGET",
    "TUTOR_SYSTEM_PROMPT",
    "build_tutor_graph",
    "recent_messages",
    "tutor_config",
]
