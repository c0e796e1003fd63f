"""Test helpers: a scripted, vLLM-compatible OpenAI server ("mock at the wire")."""

from __future__ import annotations

from typing import Any

__all__ = ["ScriptedServer", "tokenize"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m relay_agents.testing.scripted_server` does not import the
    # module twice (runpy warns when the package already imported it).
    if name in __all__:
        from relay_agents.testing import scripted_server

        return getattr(scripted_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
