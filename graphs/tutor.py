"""The math tutor for LangGraph Server and ``langgraph dev`` (see ``langgraph.json``).

A student-led tutor that explains step by step and relays hard steps to the teacher;
configured like the rest of relay-agents (``RELAY_CONFIG`` and/or ``RELAY_*``). The server
supplies persistence, and each thread is a conversation with its own teacher budget.
"""

from relay_agents import load_config
from relay_agents.tutor import build_tutor_graph, tutor_config

graph = build_tutor_graph(tutor_config(load_config()))
