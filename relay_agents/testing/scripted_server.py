"""A scripted, vLLM-compatible OpenAI server for wire-level tests ("mock at the wire").

The server (a Starlette app run by uvicorn in a subprocess) answers ``/v1/completions`` and
``/v1/chat/completions`` like vLLM does, but the text each model "would" generate comes from
scripts registered through admin endpoints under ``/_scripted/``. Stop strings, ``max_tokens``,
``include_stop_str_in_output``, streaming, usage, token log-probabilities (``logprobs`` /
``top_logprobs``, from per-token probabilities in the script) and call suppression
(``bad_words`` / ``logit_bias``) are applied to the scripted text the way vLLM applies them to a real model's
output. Faults (HTTP errors, hangs, dropped connections, malformed bodies) can be queued.

Run directly with ``python -m relay_agents.testing.scripted_server --host 127.0.0.1 --port P``
or, from tests, through :class:`ScriptedServer`.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ScriptedServer", "create_app", "generate", "render_chat", "tokenize"]

# --------------------------------------------------------------------------------------------
# Tokenizer, chat template and generation (pure functions)
# --------------------------------------------------------------------------------------------

# The " ?" prefix of the punctuation branch must not swallow the "<" of a special token, so
# that "<call>" is one token even after a space (" <call>" -> " ", "<call>").
_SPECIAL = r"</?call>|<\|[a-z_]+\|>"
_TOKEN_RE = re.compile(rf"{_SPECIAL}| ?[A-Za-z]+| ?\d| ?(?!{_SPECIAL})[^\sA-Za-z\d]|\s+")
_CALL_RE = re.compile(r"<call>.*?(?:</call>|$)", re.S)
_SPECIAL_TOKENS = ("<|endoftext|>", "<call>", "</call>", "<|im_start|>", "<|im_end|>")
CALL_TOKEN = "<call>"


def tokenize(text: str) -> list[str]:
    """Split ``text`` into tokens; lossless (``"".join(tokenize(t)) == t``)."""
    return _TOKEN_RE.findall(text)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError("only text content parts are supported")
            parts.append(str(part.get("text", "")))
        return "\n".join(parts)
    raise ValueError("message content must be a string or a list of text parts")


def render_chat(
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """Render ``messages`` with ChatML, as the server's chat template does."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("each message must be an object with a role")
        text = f"<|im_start|>{message['role']}\n{_content_text(message.get('content'))}"
        is_last = i == len(messages) - 1
        out.append(text if continue_final_message and is_last else text + "<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


@dataclass
class Generation:
    """What the emulated model emitted: ``pieces`` are the non-empty text deltas (one per
    token, the last possibly cut by a stop string)."""

    pieces: list[str]
    completion_tokens: int
    finish_reason: str
    stop_reason: str | None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def generate(
    text: str,
    *,
    stop: list[str] | None = None,
    include_stop_str_in_output: bool = False,
    max_tokens: int | None = None,
) -> Generation:
    """Emit ``text`` token by token (then EOS) under vLLM's stop / max_tokens rules.

    Stop strings are searched incrementally: each step only looks at the new token plus the
    previous ``len(longest stop) - 1`` characters, so the work is linear in the output.
    """
    stops = [s for s in stop or [] if s]
    longest = max(map(len, stops), default=0)
    pieces: list[str] = []
    total = 0  # characters in pieces
    tail = ""  # last (longest - 1) characters of the output
    n = 0
    for tok in tokenize(text):
        if max_tokens is not None and n >= max_tokens:
            return Generation(pieces, n, "length", None)
        n += 1
        pieces.append(tok)
        if stops:
            window = tail + tok
            hits = [(i, s) for s in stops if (i := window.find(s)) >= 0]
            if hits:
                i, s = min(hits)
                keep = total - len(tail) + i + (len(s) if include_stop_str_in_output else 0)
                _truncate(pieces, total + len(tok), keep)
                return Generation(pieces, n, "stop", s)
            tail = window[-(longest - 1) :] if longest > 1 else ""
        total += len(tok)
    if max_tokens is not None and n >= max_tokens:
        return Generation(pieces, n, "length", None)  # no room left for EOS
    return Generation(pieces, n, "stop", None)


def _truncate(pieces: list[str], total: int, keep: int) -> None:
    while pieces and total - len(pieces[-1]) >= keep:
        total -= len(pieces.pop())
    if total > keep:
        pieces[-1] = pieces[-1][: len(pieces[-1]) - (total - keep)]


# --------------------------------------------------------------------------------------------
# Log-probabilities (deterministic, from the script's per-token probabilities)
# --------------------------------------------------------------------------------------------

#: The log-probability given to alternatives with no probability left (JSON has no -inf).
_FLOOR_LOGPROB = -30.0


def _logprob(p: float) -> float:
    return math.log(p) if p > 0 else _FLOOR_LOGPROB


def token_logprobs(piece: str, prob: float | None, k: int) -> tuple[float, list[tuple[str, float]]]:
    """The sampled token's log-probability and its top-``k`` list: the token itself first, then
    ``k - 1`` alternatives ``<alt1>``, ... sharing what probability is left equally."""
    p = 1.0 if prob is None else float(prob)
    top = [(piece, _logprob(p))]
    if k > 1:
        rest = (1.0 - p) / (k - 1)
        top += [(f"<alt{i}>", _logprob(rest)) for i in range(1, k)]
    return _logprob(p), top[: max(k, 1)]


def logprobs_payload(
    pieces: list[str], probs: list[float | None], k: int, *, chat: bool, offset: int = 0
) -> dict:
    """The ``logprobs`` object of a choice (or of one streamed chunk) in vLLM's format."""
    rows = [token_logprobs(piece, probs[i] if i < len(probs) else None, k) for i, piece in enumerate(pieces)]
    if chat:
        return {
            "content": [
                {
                    "token": piece,
                    "logprob": lp,
                    "bytes": list(piece.encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top],
                }
                for piece, (lp, top) in zip(pieces, rows, strict=True)
            ]
        }
    offsets, at = [], offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": list(pieces),
        "token_logprobs": [lp for lp, _ in rows],
        "top_logprobs": [dict(top) for _, top in rows],
        "text_offset": offsets,
    }


#: The end-of-sequence token, as vLLM reports it in log-probabilities (never in the text).
EOS_TOKEN = "<|im_end|>"


def _with_eos(gen: Generation) -> list[str]:
    """The tokens that log-probabilities list: vLLM lists the EOS token of a reply that ended on
    it (its text is not in the reply's text), so a reply's token texts need not spell its text."""
    ended_on_eos = gen.finish_reason == "stop" and gen.stop_reason is None
    return [*gen.pieces, EOS_TOKEN] if ended_on_eos else list(gen.pieces)


def _requested_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Top-k asked for (completions ``logprobs: k``; chat ``logprobs: true, top_logprobs: k``)."""
    if chat:
        if not body.get("logprobs"):
            return None
        k = body.get("top_logprobs") or 0
    else:
        k = body.get("logprobs")
        if k is None or k is False:
            return None
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 20:
        raise _BadRequest("logprobs / top_logprobs must be an integer between 0 and 20")
    return k


# --------------------------------------------------------------------------------------------
# Server state
# --------------------------------------------------------------------------------------------

_DEFAULT_CONFIG: dict[str, Any] = {
    "latency_s": 0.0,
    "ttft_s": 0.0,
    "token_interval_s": 0.0,
    "default_response": "I am a scripted model.",
    "max_model_len": 32768,
}
_FAULTS = {"hang", "drop", "malformed"}


def _check_fault(fault: Any) -> str:
    fault = str(fault)
    if fault in _FAULTS or (fault.isdigit() and 400 <= int(fault) <= 599):
        return fault
    raise ValueError(f"unknown fault {fault!r}: use an HTTP status 4xx/5xx, hang, drop, malformed")


def _check_item(item: Any) -> Any:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "probs" in item:
        probs = item["probs"]
        if not isinstance(probs, list) or not all(p is None or 0 < float(p) <= 1 for p in probs):
            raise ValueError(f"probs must be a list of probabilities in (0, 1] or null: {probs!r}")
    if isinstance(item, dict) and "fault" in item:
        return {**item, "fault": _check_fault(item["fault"])}
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item
    raise ValueError(f"a response must be a string, {{'text': ...}} or {{'fault': ...}}: {item!r}")


@dataclass
class _Script:
    model: str
    match: str
    responses: list[Any]
    cursor: int = 0
    repeat: bool = False  # start over after the last response (for repeated runs of one question)


@dataclass
class _State:
    vocab: dict[str, int] = field(default_factory=lambda: {t: i for i, t in enumerate(_SPECIAL_TOKENS)})
    id_to_token: list[str] = field(default_factory=lambda: list(_SPECIAL_TOKENS))
    scripts: list[_Script] = field(default_factory=list)
    faults: dict[str, deque[str]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, None] = field(default_factory=dict)  # ordered set
    config: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_CONFIG))

    def reset(self) -> None:
        """Clear everything except the vocabulary (token ids stay stable)."""
        self.scripts.clear()
        self.faults.clear()
        self.requests.clear()
        self.models.clear()
        self.config = dict(_DEFAULT_CONFIG)

    def token_id(self, token: str) -> int:
        if token not in self.vocab:
            self.vocab[token] = len(self.id_to_token)
            self.id_to_token.append(token)
        return self.vocab[token]

    def take(self, model: str, prompt: str) -> tuple[str | None, str, list[float | None]]:
        """Consume the next answer for a request: ``(fault or None, text, per-token
        probabilities)``. For a fault the text is what a dropped stream shows before dying (the
        next scripted text). Tokens without a scripted probability have probability 1."""
        script = next((s for s in reversed(self.scripts) if s.model == model and s.match in prompt), None)
        queued = self.faults.get(model)
        if queued:
            return queued.popleft(), self._peek_text(script), []
        if script is not None and script.repeat and script.responses:
            script.cursor %= len(script.responses)
        if script is None or script.cursor >= len(script.responses):
            return None, self.config["default_response"], []
        item = script.responses[script.cursor]
        script.cursor += 1
        if isinstance(item, str):
            return None, item, []
        if "fault" in item:
            return item["fault"], item.get("text") or self._peek_text(script), []
        return None, item["text"], list(item.get("probs") or [])

    def _peek_text(self, script: _Script | None) -> str:
        if script is not None and script.cursor < len(script.responses):
            item = script.responses[script.cursor]
            if isinstance(item, str):
                return item
            if isinstance(item.get("text"), str):
                return item["text"]
        return self.config["default_response"]


# --------------------------------------------------------------------------------------------
# The ASGI app
# --------------------------------------------------------------------------------------------

_TRANSPORT_KEY = "scripted.transport"
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}


class _BadRequest(Exception):
    pass


def _error(message: str, status: int = 400):
    from starlette.responses import JSONResponse

    etype = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "APIError")
    body = {"error": {"message": message, "type": etype, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


def _stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise _BadRequest("stop must be a string or a list of strings")


def _int_field(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise _BadRequest(f"{name} must be an integer")
            return value
    return None


class _TransportMiddleware:
    """Outermost ASGI wrapper: remembers the connection's transport so that the "drop" fault
    can close it for real (uvicorn's send callable is a bound method of its request cycle)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope[_TRANSPORT_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        await self.app(scope, receive, send)


async def _drop_connection(scope: dict[str, Any]) -> None:
    transport = scope.get(_TRANSPORT_KEY)
    if transport is None:
        raise RuntimeError("scripted drop: no transport to close")  # uvicorn then aborts/500s
    transport.close()
    for _ in range(3):  # let uvicorn see connection_lost, so later sends are no-ops
        await asyncio.sleep(0)


def create_app(state: _State | None = None) -> Any:
    """Build the ASGI app (wrapped so faults can drop connections)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    state = state or _State()

    async def read_json(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise _BadRequest(f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        return body

    def render_prompt(body: dict[str, Any], chat: bool) -> str:
        if not chat:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return detokenize_ids(prompt)
            if not isinstance(prompt, str):
                raise _BadRequest("prompt must be a string (or one string, or a list of ids)")
            return prompt
        add_gen = body.get("add_generation_prompt", True)
        cont = body.get("continue_final_message", False)
        if add_gen and cont:
            raise _BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        try:
            return render_chat(
                body.get("messages"), add_generation_prompt=add_gen, continue_final_message=cont
            )
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None

    def detokenize_ids(ids: list[Any]) -> str:
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < len(state.id_to_token)]
        if bad:
            raise _BadRequest(f"token ids {bad} are out of vocabulary")
        return "".join(state.id_to_token[i] for i in ids)

    def calls_banned(body: dict[str, Any]) -> bool:
        banned = {str(w).strip() for w in body.get("bad_words") or []}
        for key, bias in (body.get("logit_bias") or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise _BadRequest(f"logit_bias key {key!r} is not a token id") from None
            token = detokenize_ids([token_id])
            if bias <= -100:
                banned.add(token)
        return CALL_TOKEN in banned

    async def generation(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        try:
            body = await read_json(request)
            model = str(body.get("model") or "")
            prompt = render_prompt(body, chat)
        except _BadRequest as exc:
            return _error(str(exc))
        state.models.setdefault(model)
        record = {"path": request.url.path, "model": model, "body": body, "prompt": prompt}
        record["authorization"] = request.headers.get("authorization")
        record["disconnected"] = False  # set when the client is seen leaving before the end
        state.requests.append(record)
        try:
            return await respond(request, body, model, prompt, chat, record)
        except _BadRequest as exc:
            return _error(str(exc))

    async def respond(
        request: Request, body: dict[str, Any], model: str, prompt: str, chat: bool, record: dict[str, Any]
    ) -> Response:
        if body.get("n", 1) != 1:
            raise _BadRequest("n must be 1 on the scripted server")
        stream = bool(body.get("stream", False))
        if body.get("stream_options") is not None and not stream:
            raise _BadRequest("Stream options can only be defined when `stream=True`.")
        stop = _stop_list(body.get("stop"))
        prompt_tokens = len(tokenize(prompt))
        names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        max_tokens = _int_field(body, *names)
        max_len = state.config["max_model_len"]
        if max_tokens is not None and max_tokens < 1:
            raise _BadRequest(f"max_tokens must be at least 1, got {max_tokens}.")
        if prompt_tokens + (max_tokens or 1) > max_len:
            raise _BadRequest(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {prompt_tokens + (max_tokens or 0)} tokens ({prompt_tokens} in the "
                f"messages, {max_tokens or 0} in the completion). Please reduce the length of "
                "the messages or completion."
            )
        if max_tokens is None:
            max_tokens = max_len - prompt_tokens
        suppress_calls = calls_banned(body)

        top_k = _requested_logprobs(body, chat)
        fault, text, probs = state.take(model, prompt)
        if fault is not None and fault.isdigit():
            return _error(f"scripted fault {fault}", int(fault))
        if fault == "hang":
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            record["disconnected"] = True
            return Response(status_code=499)  # never reaches the (gone) client
        if fault == "malformed":
            if stream:
                return StreamingResponse(
                    iter(['data: {"id": "cmpl-malformed", "choi\n\n', "data: [DONE]\n\n"]),
                    media_type="text/event-stream",
                )
            return Response(b'{"id": "cmpl-malformed", "choices": [', media_type="application/json")
        if fault == "drop" and not stream:
            await _drop_connection(request.scope)
            return Response(status_code=499)

        if suppress_calls:
            text = _CALL_RE.sub("", text)
            probs = []  # the scripted tokens moved
        gen = generate(
            text,
            stop=stop,
            include_stop_str_in_output=bool(body.get("include_stop_str_in_output", False)),
            max_tokens=max_tokens,
        )
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + gen.completion_tokens,
            "completion_tokens": gen.completion_tokens,
            "prompt_tokens_details": None,
        }
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if stream:
            opts = body.get("stream_options") or {}
            return StreamingResponse(
                stream_events(
                    request,
                    gen,
                    usage if opts.get("include_usage") else None,
                    logprobs=None if top_k is None else (probs, top_k),
                    chat=chat,
                    rid=rid,
                    created=created,
                    model=model,
                    drop=fault == "drop",
                    record=record,
                ),
                media_type="text/event-stream",
            )
        if state.config["latency_s"] > 0:
            await asyncio.sleep(state.config["latency_s"])
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": gen.text, "tool_calls": []}
        else:
            choice["text"] = gen.text
        logprobs = None if top_k is None else logprobs_payload(_with_eos(gen), probs, top_k, chat=chat)
        choice |= {"logprobs": logprobs, "finish_reason": gen.finish_reason}
        choice["stop_reason"] = gen.stop_reason
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        )

    async def stream_events(
        request: Request,
        gen: Generation,
        usage: dict[str, Any] | None,
        *,
        logprobs: tuple[list[float | None], int] | None,
        chat: bool,
        rid: str,
        created: int,
        model: str,
        drop: bool,
        record: dict[str, Any],
    ) -> AsyncIterator[str]:
        try:
            async for event in _stream_events(
                request,
                gen,
                usage,
                logprobs=logprobs,
                chat=chat,
                head=head(chat, rid, created, model),
                drop=drop,
            ):
                yield event
        except asyncio.CancelledError:  # Starlette cancels the stream when the client disconnects
            record["disconnected"] = True
            raise

    def head(chat: bool, rid: str, created: int, model: str) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }

    async def _stream_events(
        request: Request,
        gen: Generation,
        usage: dict[str, Any] | None,
        *,
        logprobs: tuple[list[float | None], int] | None,
        chat: bool,
        head: dict[str, Any],
        drop: bool,
    ) -> AsyncIterator[str]:
        offset = 0

        def event(
            delta: str | None, finish: str | None = None, stop: str | None = None, index: int = -1
        ) -> str:
            choice: dict[str, Any] = {"index": 0}
            if chat:
                choice["delta"] = {} if delta is None else {"content": delta}
            else:
                choice["text"] = delta or ""
            lp = None
            if logprobs is not None and delta is not None and index >= 0:
                probs, k = logprobs
                lp = logprobs_payload([delta], probs[index : index + 1], k, chat=chat, offset=offset)
            choice |= {"logprobs": lp, "finish_reason": finish, "stop_reason": stop}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        config = state.config
        if config["ttft_s"] > 0:
            await asyncio.sleep(config["ttft_s"])
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            yield f"data: {json.dumps({**head, 'choices': [{**role, 'finish_reason': None}]})}\n\n"
        for k, piece in enumerate(gen.pieces):
            if drop and k == 2:
                break
            if k and config["token_interval_s"] > 0:
                await asyncio.sleep(config["token_interval_s"])
            yield event(piece, index=k)
            offset += len(piece)
        if drop:
            await _drop_connection(request.scope)
            return
        if logprobs is not None and len(_with_eos(gen)) > len(gen.pieces):
            # vLLM's last chunk of a reply that ended on EOS: no text, the EOS token's logprobs
            probs, k = logprobs
            eos = probs[len(gen.pieces) : len(gen.pieces) + 1]
            choice: dict[str, Any] = {"index": 0}
            choice |= {"delta": {"content": ""}} if chat else {"text": ""}
            choice |= {
                "logprobs": logprobs_payload([EOS_TOKEN], eos, k, chat=chat, offset=offset),
                "finish_reason": gen.finish_reason,
                "stop_reason": gen.stop_reason,
            }
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        else:
            yield event(None, gen.finish_reason, gen.stop_reason)
        if usage is not None:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def tokenize_endpoint(request: Request) -> Response:
        try:
            body = await read_json(request)
            chat = "messages" in body
            prompt = render_prompt(body, chat)
        except _BadRequest as exc:
            return _error(str(exc))
        tokens = tokenize(prompt)
        return JSONResponse(
            {
                "count": len(tokens),
                "max_model_len": state.config["max_model_len"],
                "tokens": [state.token_id(t) for t in tokens],
                "token_strs": tokens if body.get("return_token_strs") else None,
            }
        )

    async def detokenize_endpoint(request: Request) -> Response:
        try:
            body = await read_json(request)
            ids = body.get("tokens")
            if not isinstance(ids, list):
                raise _BadRequest("tokens must be a list of token ids")
            return JSONResponse({"prompt": detokenize_ids(ids)})
        except _BadRequest as exc:
            return _error(str(exc))

    async def models_endpoint(request: Request) -> Response:
        names = dict.fromkeys([*(s.model for s in state.scripts), *state.models])
        now = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": name,
                "parent": None,
                "max_model_len": state.config["max_model_len"],
                "permission": [],
            }
            for name in names
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    # ---- admin ------------------------------------------------------------------------------

    async def admin_script(request: Request) -> Response:
        try:
            body = await read_json(request)
            responses = body.get("responses")
            if not isinstance(responses, list):
                raise _BadRequest("responses must be a list")
            script = _Script(
                model=str(body["model"]),
                match=str(body.get("match", "")),
                responses=[_check_item(r) for r in responses],
                repeat=bool(body.get("repeat", False)),
            )
        except (_BadRequest, ValueError, KeyError) as exc:
            return _error(f"bad script: {exc}")
        state.scripts.append(script)
        state.models.setdefault(script.model)
        return JSONResponse({"ok": True})

    async def admin_faults(request: Request) -> Response:
        try:
            body = await read_json(request)
            faults = [_check_fault(f) for f in body.get("faults") or []]
            model = str(body["model"])
        except (_BadRequest, ValueError, KeyError) as exc:
            return _error(f"bad faults: {exc}")
        state.faults.setdefault(model, deque()).extend(faults)
        return JSONResponse({"ok": True})

    async def admin_configure(request: Request) -> Response:
        try:
            body = await read_json(request)
        except _BadRequest as exc:
            return _error(str(exc))
        unknown = set(body) - set(_DEFAULT_CONFIG)
        if unknown:
            return _error(f"unknown config keys {sorted(unknown)}; known: {sorted(_DEFAULT_CONFIG)}")
        for key, value in body.items():
            default = _DEFAULT_CONFIG[key]
            if not isinstance(value, type(default) if isinstance(default, str) else (int, float)):
                return _error(f"config {key} must be a {type(default).__name__}")
            state.config[key] = type(default)(value)
        return JSONResponse({"ok": True, "config": state.config})

    async def admin_requests(request: Request) -> Response:
        return JSONResponse({"requests": state.requests})

    async def admin_reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    routes = [
        Route("/v1/completions", generation, methods=["POST"]),
        Route("/v1/chat/completions", generation, methods=["POST"]),
        Route("/tokenize", tokenize_endpoint, methods=["POST"]),
        Route("/detokenize", detokenize_endpoint, methods=["POST"]),
        Route("/v1/models", models_endpoint, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/_scripted/script", admin_script, methods=["POST"]),
        Route("/_scripted/faults", admin_faults, methods=["POST"]),
        Route("/_scripted/configure", admin_configure, methods=["POST"]),
        Route("/_scripted/requests", admin_requests, methods=["GET"]),
        Route("/_scripted/reset", admin_reset, methods=["POST"]),
    ]
    return _TransportMiddleware(Starlette(routes=routes))


# --------------------------------------------------------------------------------------------
# Controller (runs in the test process)
# --------------------------------------------------------------------------------------------

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ScriptedServer:
    """Starts the scripted server in a subprocess and drives its admin endpoints.

    Usable as a context manager or through :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, *, startup_timeout: float = 30.0
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        """Root URL (``/health``, ``/tokenize``, ``/_scripted/...`` live here)."""
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> ScriptedServer:
        if self.running:
            return self
        fixed_port = self.port
        for _attempt in range(3):  # a free port can be taken between probe and bind: retry
            self.port = fixed_port or _free_port(self.host)
            self._spawn()
            if self._wait_healthy():
                atexit.register(self.stop)
                return self
            if fixed_port is not None:
                break
        log = self._log_tail()
        self.stop()
        raise RuntimeError(f"scripted server did not start on {self.url}:\n{log}")

    def stop(self) -> None:
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self) -> None:
        if self._log is None:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "relay_agents.testing.scripted_server", "--host", self.host]
        cmd += ["--port", str(self.port), "--parent-pid", str(os.getpid())]
        self._proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    # ---- admin API ------------------------------------------------------------------------

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{method} {path} failed: {exc.read().decode()}") from None

    def script(
        self, model: str, match: str, responses: list[str | dict[str, Any]], *, repeat: bool = False
    ) -> None:
        """Requests for ``model`` whose prompt contains ``match`` get ``responses`` in order
        (over and over with ``repeat``). The latest script that matches a prompt answers it.

        A response is a string, ``{"text": ...}`` (with ``"probs"``: the probability of each of
        its tokens, reported as log-probabilities when a request asks for them; missing or
        ``None``: 1) or ``{"fault": ...}``."""
        body = {"model": model, "match": match, "responses": responses, "repeat": repeat}
        self._call("POST", "/_scripted/script", body)

    def faults(self, model: str, faults: list[str]) -> None:
        """Queue faults ("429", "500", "503", "hang", "drop", "malformed") for ``model``."""
        self._call("POST", "/_scripted/faults", {"model": model, "faults": list(faults)})

    def configure(self, **config: Any) -> dict[str, Any]:
        """Set ``latency_s``, ``ttft_s``, ``token_interval_s``, ``default_response``,
        ``max_model_len``; returns the full config."""
        return self._call("POST", "/_scripted/configure", config)["config"]

    def requests(self) -> list[dict[str, Any]]:
        """Generation requests so far, in order: ``{"path", "model", "body", "prompt", "disconnected"}``
        (``disconnected``: the client was seen leaving a hanging request or an unfinished stream)."""
        return self._call("GET", "/_scripted/requests")["requests"]

    def reset(self) -> None:
        """Clear scripts, faults, recorded requests and config (token ids are kept)."""
        self._call("POST", "/_scripted/reset", {})


# --------------------------------------------------------------------------------------------
# Subprocess entry point
# --------------------------------------------------------------------------------------------


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this parent dies")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(
            create_app(),
            host=args.host,
            port=args.port,
            http="h11",
            lifespan="off",
            log_level=args.log_level,
            access_log=False,
            backlog=2048,
            timeout_graceful_shutdown=1,
        )


if __name__ == "__main__":
    main()
