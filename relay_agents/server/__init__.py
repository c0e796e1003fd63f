"""An OpenAI-compatible HTTP server in front of the relay (``relay-agents serve``).

Needs the ``server`` extra (FastAPI, uvicorn, prometheus-client). The public names load on
first use (PEP 562): a ``serve --workers`` process imports :mod:`relay_agents.server.listen`
while unpickling its uvicorn config, before it answers its supervisor's health checks (5 s),
which the app's imports (pydantic, FastAPI, LangGraph) overran on a busy machine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay_agents.server.app import create_app
    from relay_agents.server.settings import ServerSettings

_MODULE_OF = {"create_app": "relay_agents.server.app", "ServerSettings": "relay_agents.server.settings"}

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
