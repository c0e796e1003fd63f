"""A scripted, vLLM-compatible OpenAI server for wire-level tests ("mock at the wire").

The server (a Starlette app run by uvicorn in a subprocess) answers ``/v1/completions`` and
``/v1/chat/completions`` like vLLM does, but the text each model "would" generate comes from
scripts registered through admin endpoints under ``/_scripted/``. Stop strings, ``max_tokens``,
``include_stop_str_in_output``, streaming, usage, token log-probabilities (``logprobs`` /
``top_logprobs``, from per-token probabilities in the script) and call suppression
(``bad_words`` / ``logit_bias``) are applied to the scripted text the way vLLM applies them to a
real model's output. Faults (HTTP errors, hangs, dropped connections, malformed bodies) can be
queued.

* :mod:`.tokens` — the emulated model's tokenizer, vocabulary and chat template;
* :mod:`.generation` — the emitted tokens under vLLM's stop / ``max_tokens`` rules;
* :mod:`.logprobs` — token log-probabilities in vLLM's format;
* :mod:`.script` — the script store (scripts and queued faults);
* :mod:`.wire` — requests, errors and bodies of the OpenAI wire format; :mod:`.sse` — streams;
* :mod:`.faults` — fault injection;
* :mod:`.app` — the ASGI app, its state and route handlers (needs the ``testing`` extra);
* :mod:`.server` — :class:`ScriptedServer`, the handle that starts it in a subprocess.

Run directly with ``python -m relay_agents.testing.scripted --host 127.0.0.1 --port P``
or, from tests, through :class:`ScriptedServer`.
"""

from __future__ import annotations

from .generation import Generation, generate
from .server import ScriptedServer
from .tokens import render_chat, tokenize

__all__ = ["Generation", "ScriptedServer", "generate", "render_chat", "tokenize"]
