"""Test helpers: a scripted, vLLM-compatible OpenAI server ("mock at the wire")."""

from __future__ import annotations

from relay_agents.testing.scripted import ScriptedServer, render_chat, tokenize

__all__ = ["ScriptedServer", "render_chat", "tokenize"]
