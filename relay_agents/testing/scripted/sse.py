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
    *,
    index: int = 0,
    usage_so_far: dict[str, Any] | None = None,
) -> str:
    """One chunk of one choice; ``delta`` ``None``: a chat chunk without content.
    ``usage_so_far``: the choice's own usage until now (``continuous_usage_stats``)."""
    choice: dict[str, Any] = {"index": index}
    if chat:
        choice["delta"] = {} if delta is None else {"content": delta}
    else:
        choice["text"] = delta or ""
    choice |= {"logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}
    payload = {**head, "choices": [choice]}
    if usage_so_far is not None:
        payload["usage"] = usage_so_far
    return _event(payload, tamper)


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
        usage_now = _usage_so_far(req, i + 1) if req.continuous_usage else None
        yield _chunk(head, chat, piece, lp, tamper=tamper, usage_so_far=usage_now)
        offset += len(piece)
    if drop is not None:
        await drop()
        return
    usage_now = _usage_so_far(req, gen.completion_tokens) if req.continuous_usage else None
    if k is not None and gen.ended_on_eos:
        # vLLM's last chunk of a reply that ended on EOS: no text, the EOS token's logprobs
        eos = probs[len(gen.pieces) : len(gen.pieces) + 1]
        lp = logprobs_payload([EOS_TOKEN], eos, k, chat=chat, offset=offset)
        yield _chunk(head, chat, "", lp, gen.finish_reason, gen.stop_reason, tamper, usage_so_far=usage_now)
    else:
        yield _chunk(
            head, chat, None, None, gen.finish_reason, gen.stop_reason, tamper, usage_so_far=usage_now
        )
    if req.include_usage:
        yield _event({**head, "choices": [], "usage": usage(req, gen)}, tamper)
    yield "data: [DONE]\n\n"


def _usage_so_far(req: GenerationRequest, tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": tokens,
        "total_tokens": req.prompt_tokens + tokens,
    }


async def batch_stream_events(
    reqs: list[GenerationRequest], gens: list[Generation], probs: list[list[float | None]], *, ttft_s: float
) -> AsyncIterator[str]:
    """The events of a completions request with a list of prompts, as vLLM interleaves them:
    each choice's chunks under its index, a token of each live choice in turn (so the replies
    end at different moments), each choice's usage in its chunks when
    ``continuous_usage_stats`` asks, then the summed usage and ``[DONE]``."""
    first = reqs[0]
    head = {"id": first.id, "object": "text_completion", "created": first.created, "model": first.model}
    if ttft_s > 0:
        await asyncio.sleep(ttft_s)
    offsets = [0] * len(reqs)
    for step in range(max(len(g.pieces) for g in gens) + 1):
        for i, (req, gen) in enumerate(zip(reqs, gens, strict=True)):
            k, pieces = req.top_logprobs, gen.pieces
            if step < len(pieces):
                piece = pieces[step]
                lp = None
                if k is not None:
                    lp = logprobs_payload(
                        [piece], probs[i][step : step + 1], k, chat=False, offset=offsets[i]
                    )
                usage_now = _usage_so_far(req, step + 1) if req.continuous_usage else None
                yield _chunk(head, False, piece, lp, index=i, usage_so_far=usage_now)
                offsets[i] += len(piece)
            elif step == len(pieces):
                usage_now = _usage_so_far(req, gen.completion_tokens) if req.continuous_usage else None
                lp = None
                if k is not None and gen.ended_on_eos:
                    eos = probs[i][len(pieces) : len(pieces) + 1]
                    lp = logprobs_payload([EOS_TOKEN], eos, k, chat=False, offset=offsets[i])
                yield _chunk(
                    head, False, "", lp, gen.finish_reason, gen.stop_reason, index=i, usage_so_far=usage_now
                )
    if first.include_usage:
        prompt = sum(r.prompt_tokens for r in reqs)
        completion = sum(g.completion_tokens for g in gens)
        total = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        yield _event({**head, "choices": [], "usage": total})
    yield "data: [DONE]\n\n"
