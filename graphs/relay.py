"""The relay graph for LangGraph Server and ``langgraph dev`` (see ``langgraph.json``).

Configured like the rest of relay-agents: a TOML file named by ``RELAY_CONFIG`` and/or the
``RELAY_*`` variables. The server supplies persistence, so no checkpointer is set here.
"""

from relay_agents import build_relay_graph, load_config

graph = build_relay_graph(load_config())
