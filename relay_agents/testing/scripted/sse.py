"""Streamed answers as vLLM sends them: server-sent events, one chunk per token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .generation import Generation
from .logprobs import logprobs_payload
from .tokens import EOS_TOKEN
from .wire import GenerationRequest, usage

#: How many tokens a dropped stream sends before its connection goes.
DROP_AFTER_TOKENS = 2


Tamper = Callable[[dict[str, Any]], dict[str, Any]]


def _event(payload: dict[str, Any], tamper: Tamper | None = None) -> str:
    return f"data: {json.dumps(payload if tamper is None else tamper(payload))}\n\n"


def _chunk(
    head: dict[str, Any],
    chat: bool,
    delta: str | None,
    logprobs: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    stop_reason: str | None = None,
    tamper: Tamper | None = None,
) -> str:
    """One chunk of one choice; ``delta`` ``None``: a chat chunk without content."""
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["delta"] = {} if delta is None else {"content": delta}
    else:
        choice["text"] = delta or ""
    choice |= {"logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}
    return _event({**head, "choices": [choice]}, tamper)


async def stream_events(
    req: GenerationRequest,
    gen: Generation,
    probs: list[float | None],
    *,
    ttft_s: float,
    token_interval_s: float,
    drop: Callable[[], Awaitable[None]] | None = None,
    tamper: Tamper | None = None,
) -> AsyncIterator[str]:
    """The events of ``gen``: (chat: the role), the tokens, the finish, (the usage), ``[DONE]``.
    With ``drop``, the first tokens, then ``drop()`` closes the connection; ``tamper`` changes
    each chunk before it is sent (a fault)."""
    chat = req.chat
    head = {
        "id": req.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": req.created,
        "model": req.model,
    }
    k = req.top_logprobs
    if ttft_s > 0:
        await asyncio.sleep(ttft_s)
    if chat:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        yield _event({**head, "choices": [{**role, "finish_reason": None}]}, tamper)
    offset = 0
    for i, piece in enumerate(gen.pieces):
        if drop is not None and i == DROP_AFTER_TOKENS:
            break
        if i and token_interval_s > 0:
            await asyncio.sleep(token_interval_s)
        lp = None if k is None else logprobs_payload([piece], probs[i : i + 1], k, chat=chat, offset=offset)
        yield _chunk(head, chat, piece, lp, tamper=tamper)
        offset += len(piece)
    if drop is not None:
        await drop()
        return
    if k is not None and gen.ended_on_eos:
        # vLLM's last chunk of a reply that ended on EOS: no text, the EOS token's logprobs
        eos = probs[len(gen.pieces) : len(gen.pieces) + 1]
        lp = logprobs_payload([EOS_TOKEN], eos, k, chat=chat, offset=offset)
        yield _chunk(head, chat, "", lp, gen.finish_reason, gen.stop_reason, tamper)
    else:
        yield _chunk(head, chat, None, None, gen.finish_reason, gen.stop_reason, tamper)
    if req.include_usage:
        yield _event({**head, "choices": [], "usage": usage(req, gen)}, tamper)
    yield "data: [DONE]\n\n"
