"""``python -m relay_agents.cli``: the ``relay-agents`` command."""

from relay_agents.cli import app

app(prog_name="relay-agents")
