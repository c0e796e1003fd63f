"""An OpenAI-compatible HTTP server in front of the relay (``relay-agents serve``).

Needs the ``server`` extra (FastAPI, uvicorn, prometheus-client).
"""

from relay_agents.server.app import create_app
from relay_agents.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
