"""The scripted server's ASGI app: vLLM's endpoints, and admin endpoints under ``/_scripted/``
that load scripts, queue faults, configure timing and read back the requests.

Each route handler is a small function of the server's :class:`ServerState` and the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .faults import (
    LONE_SURROGATE,
    TransportMiddleware,
    check_fault,
    drop_connection,
    fault_response,
    parse_fault,
    tamper,
    whole_body,
)
from .generation import Generation, generate, without_calls
from .script import Replies, Script, check_item
from .sse import batch_stream_events, stream_events
from .tokens import EOS_TOKEN, Vocabulary, tokenize
from .wire import (
    BadRequest,
    GenerationRequest,
    batch_prompts,
    completion_body,
    detokenize,
    error_response,
    parse_generation,
    read_json,
    render_prompt,
    sampled_body,
)

DEFAULT_CONFIG: dict[str, Any] = {
    "latency_s": 0.0,
    "ttft_s": 0.0,
    "token_interval_s": 0.0,
    "default_response": "I am a scripted model.",
    "max_model_len": 32768,
    # As vLLM: a model that is not scripted is answered 404 "does not exist" (else any is served).
    "strict_models": False,
    # As vLLM: usage counts the EOS token of a reply that ended on one (its text does not hold it).
    "usage_counts_eos": False,
}


@dataclass
class ServerState:
    """Everything the server knows; all but the vocabulary is cleared by ``reset``."""

    vocabulary: Vocabulary = field(default_factory=Vocabulary)
    replies: Replies = field(default_factory=Replies)
    requests: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, None] = field(default_factory=dict)  # ordered set
    config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CONFIG))
    context_windows: dict[str, int] = field(default_factory=dict)  # per model, over max_model_len

    def reset(self) -> None:
        """Clear everything except the vocabulary (token ids stay stable)."""
        self.replies.clear()
        self.requests.clear()
        self.models.clear()
        self.config = dict(DEFAULT_CONFIG)
        self.context_windows.clear()

    def configure(self, changes: dict[str, Any]) -> None:
        """Set config values; ValueError for an unknown key or a value of the wrong type."""
        unknown = set(changes) - set(DEFAULT_CONFIG)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
        for key, value in changes.items():
            default = DEFAULT_CONFIG[key]
            if not isinstance(value, type(default) if isinstance(default, str) else (int, float)):
                raise ValueError(f"config {key} must be a {type(default).__name__}")
        for key, value in changes.items():
            self.config[key] = type(DEFAULT_CONFIG[key])(value)


# ---- vLLM's endpoints ----------------------------------------------------------------------


async def generation(state: ServerState, request: Request) -> Response:
    """``/v1/completions`` and ``/v1/chat/completions``."""
    chat = request.url.path.endswith("/chat/completions")
    try:
        body = await read_json(request)
        model = str(body.get("model") or "")
        prompts = None if chat else batch_prompts(body)
        if prompts is not None:
            return await batch_generation(state, request, body, model, prompts)
        prompt = render_prompt(body, chat=chat, vocabulary=state.vocabulary)
    except BadRequest as exc:
        return error_response(str(exc))
    record = {"path": request.url.path, "model": model, "body": body, "prompt": prompt}
    record["authorization"] = request.headers.get("authorization")
    record["disconnected"] = False  # set when the client is seen leaving before the end
    state.requests.append(record)
    if state.config["strict_models"] and model not in state.models:
        return error_response(f"The model `{model}` does not exist.", 404)  # vLLM's words
    state.models.setdefault(model)
    try:
        req = parse_generation(
            body,
            chat=chat,
            model=model,
            prompt=prompt,
            vocabulary=state.vocabulary,
            max_model_len=max_model_len(state, model),
        )
    except BadRequest as exc:
        return error_response(str(exc), param=exc.param)
    return await answer(state, request, req, prompt, record)


async def answer(
    state: ServerState, request: Request, req: GenerationRequest, prompt: str, record: dict[str, Any]
) -> Response:
    """The scripted reply to a checked request: a fault, a stream or one body."""
    reply = state.replies.take(req.model, prompt, state.config["default_response"])
    fault = None if reply.fault is None else parse_fault(reply.fault)
    if fault is not None:
        response = await fault_response(fault, request, stream=req.stream, record=record)
        if response is not None:
            return response
    text, probs = reply.text, reply.probs
    if req.suppress_calls:
        text, probs = without_calls(text), []  # the scripted tokens moved
    name = None if fault is None else fault.name
    gen = _generated(state, req, text, overrun=name == "overrun")
    if name == "surrogate" and gen.pieces:
        gen.pieces[0] += LONE_SURROGATE
    if req.stream:
        drop = partial(drop_connection, request.scope) if name == "drop" else None
        events = stream_events(
            req,
            gen,
            probs,
            ttft_s=state.config["ttft_s"],
            token_interval_s=fault.interval_s if name == "drip" else state.config["token_interval_s"],
            drop=drop,
            tamper=tamper(fault),
        )
        return StreamingResponse(noting_disconnect(events, record), media_type="text/event-stream")
    if state.config["latency_s"] > 0:
        await asyncio.sleep(state.config["latency_s"])
    body = completion_body(req, gen, probs)
    if req.return_token_ids:
        with_token_ids(state.vocabulary, body["choices"][0], prompt, gen)
    if req.n > 1:
        body = sampled_body([body, *(_next_body(state, req, prompt) for _ in range(req.n - 1))])
    return whole_body(tamper(fault)(body), fault, record)


def _generated(state: ServerState, req: GenerationRequest, text: str, *, overrun: bool = False) -> Generation:
    return generate(
        text,
        stop=req.stop,
        include_stop_str_in_output=req.include_stop_str_in_output,
        max_tokens=None if overrun else req.max_tokens,
        count_eos=state.config["usage_counts_eos"],
    )


def _next_body(state: ServerState, req: GenerationRequest, prompt: str) -> dict[str, Any]:
    """One more of a request's ``n`` replies: the next scripted answer (faults apply to the first)."""
    reply = state.replies.take(req.model, prompt, state.config["default_response"])
    text, probs = reply.text, reply.probs
    if req.suppress_calls:
        text, probs = without_calls(text), []
    return completion_body(req, _generated(state, req, text), probs)


async def batch_generation(
    state: ServerState, request: Request, body: dict[str, Any], model: str, prompts: list[Any]
) -> Response:
    """A completions request with a list of prompts: one choice per prompt (``index``), each
    answered as a request of its own would be; a whole reply sums the usage. A fault queued for
    the model answers the whole request."""
    texts = [render_prompt({**body, "prompt": p}, chat=False, vocabulary=state.vocabulary) for p in prompts]
    record = {"path": request.url.path, "model": model, "body": body, "prompt": texts}
    record["authorization"] = request.headers.get("authorization")
    record["disconnected"] = False
    state.requests.append(record)
    state.models.setdefault(model)
    try:
        reqs = [
            parse_generation(
                body,
                chat=False,
                model=model,
                prompt=text,
                vocabulary=state.vocabulary,
                max_model_len=max_model_len(state, model),
            )
            for text in texts
        ]
    except BadRequest as exc:
        return error_response(str(exc), param=exc.param)
    replies = state.replies.take_batch(model, texts, state.config["default_response"])
    fault = next((parse_fault(r.fault) for r in replies if r.fault is not None), None)
    if fault is not None:
        response = await fault_response(fault, request, stream=reqs[0].stream, record=record)
        if response is not None:
            return response
    gens, probs = [], []
    for req, reply in zip(reqs, replies, strict=True):
        text, p = (without_calls(reply.text), []) if req.suppress_calls else (reply.text, reply.probs)
        gens.append(
            generate(
                text,
                stop=req.stop,
                include_stop_str_in_output=req.include_stop_str_in_output,
                max_tokens=req.max_tokens,
                count_eos=state.config["usage_counts_eos"],
            )
        )
        probs.append(p)
    if reqs[0].stream:
        events = batch_stream_events(reqs, gens, probs, ttft_s=state.config["ttft_s"])
        return StreamingResponse(noting_disconnect(events, record), media_type="text/event-stream")
    if state.config["latency_s"] > 0:
        await asyncio.sleep(state.config["latency_s"])
    bodies = [completion_body(req, gen, p) for req, gen, p in zip(reqs, gens, probs, strict=True)]
    choices = [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)]
    if reqs[0].return_token_ids:
        for choice, text, gen in zip(choices, texts, gens, strict=True):
            with_token_ids(state.vocabulary, choice, text, gen)
    usage = {
        key: sum(b["usage"][key] for b in bodies)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    return JSONResponse({**bodies[0], "choices": choices, "usage": usage})


def with_token_ids(vocabulary: Vocabulary, choice: dict[str, Any], prompt: str, gen: Generation) -> None:
    """vLLM's ``return_token_ids``: the choice's prompt ids and its reply's, one per counted
    token (an EOS the usage counts too)."""
    ids = [vocabulary.token_id(piece) for piece in gen.pieces][: gen.completion_tokens]
    choice["prompt_token_ids"] = [vocabulary.token_id(t) for t in tokenize(prompt)]
    choice["token_ids"] = ids + [vocabulary.token_id(EOS_TOKEN)] * (gen.completion_tokens - len(ids))


async def noting_disconnect(events: AsyncIterator[str], record: dict[str, Any]) -> AsyncIterator[str]:
    """``events``, marking the request's record when the client leaves mid-stream."""
    try:
        async for event in events:
            yield event
    except asyncio.CancelledError:  # Starlette cancels the stream when the client disconnects
        record["disconnected"] = True
        raise


async def tokenize_endpoint(state: ServerState, request: Request) -> Response:
    """vLLM's ``/tokenize``: a prompt's or messages' ``count`` and ``tokens``. The emulated
    tokenizer adds no special tokens to a text (as Qwen's adds no BOS), so
    ``add_special_tokens`` changes nothing, and a reply's text never counts its EOS."""
    try:
        body = await read_json(request)
        if not isinstance(body.get("add_special_tokens", True), bool):
            raise BadRequest("add_special_tokens must be a boolean")
        prompt = render_prompt(body, chat="messages" in body, vocabulary=state.vocabulary)
    except BadRequest as exc:
        return error_response(str(exc))
    tokens = tokenize(prompt)
    return JSONResponse(
        {
            "count": len(tokens),
            "max_model_len": max_model_len(state, str(body.get("model") or "")),
            "tokens": [state.vocabulary.token_id(t) for t in tokens],
            "token_strs": tokens if body.get("return_token_strs") else None,
        }
    )


async def detokenize_endpoint(state: ServerState, request: Request) -> Response:
    try:
        body = await read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list):
            raise BadRequest("tokens must be a list of token ids")
        return JSONResponse({"prompt": detokenize(state.vocabulary, ids)})
    except BadRequest as exc:
        return error_response(str(exc))


async def models_endpoint(state: ServerState, request: Request) -> Response:
    names = dict.fromkeys([*(s.model for s in state.replies.scripts), *state.models])
    now = int(time.time())
    data = [
        {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": max_model_len(state, name),
            "permission": [],
        }
        for name in names
    ]
    return JSONResponse({"object": "list", "data": data})


async def health(state: ServerState, request: Request) -> Response:
    return Response(status_code=200)


# ---- context windows: per model, else the configured max_model_len ---------------------------


def max_model_len(state: ServerState, model: str) -> int:
    return state.context_windows.get(model, state.config["max_model_len"])


async def admin_context_window(state: ServerState, request: Request) -> Response:
    """``{"model", "max_model_len"}``: the model's context window, listed and enforced."""
    try:
        body = await read_json(request)
        tokens = body["max_model_len"]
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise BadRequest("max_model_len must be a positive integer")
        state.context_windows[str(body["model"])] = tokens
        state.models.setdefault(str(body["model"]))
    except (BadRequest, KeyError) as exc:
        return error_response(f"bad context window: {exc}")
    return JSONResponse({"ok": True})


# ---- admin endpoints -----------------------------------------------------------------------


async def admin_script(state: ServerState, request: Request) -> Response:
    try:
        body = await read_json(request)
        responses = body.get("responses")
        if not isinstance(responses, list):
            raise BadRequest("responses must be a list")
        script = Script(
            model=str(body["model"]),
            match=str(body.get("match", "")),
            responses=[check_item(r) for r in responses],
            repeat=bool(body.get("repeat", False)),
        )
    except (BadRequest, ValueError, KeyError) as exc:
        return error_response(f"bad script: {exc}")
    state.replies.add_script(script)
    state.models.setdefault(script.model)
    return JSONResponse({"ok": True})


async def admin_faults(state: ServerState, request: Request) -> Response:
    try:
        body = await read_json(request)
        faults = [check_fault(f) for f in body.get("faults") or []]
        model = str(body["model"])
    except (BadRequest, ValueError, KeyError) as exc:
        return error_response(f"bad faults: {exc}")
    state.replies.queue_faults(model, faults)
    return JSONResponse({"ok": True})


async def admin_configure(state: ServerState, request: Request) -> Response:
    try:
        state.configure(await read_json(request))
    except (BadRequest, ValueError) as exc:
        return error_response(str(exc))
    return JSONResponse({"ok": True, "config": state.config})


async def admin_requests(state: ServerState, request: Request) -> Response:
    return JSONResponse({"requests": state.requests})


async def admin_reset(state: ServerState, request: Request) -> Response:
    state.reset()
    return JSONResponse({"ok": True})


_ROUTES = [
    ("/v1/completions", generation, "POST"),
    ("/v1/chat/completions", generation, "POST"),
    ("/tokenize", tokenize_endpoint, "POST"),
    ("/detokenize", detokenize_endpoint, "POST"),
    ("/v1/models", models_endpoint, "GET"),
    ("/health", health, "GET"),
    ("/_scripted/script", admin_script, "POST"),
    ("/_scripted/faults", admin_faults, "POST"),
    ("/_scripted/configure", admin_configure, "POST"),
    ("/_scripted/context_window", admin_context_window, "POST"),
    ("/_scripted/requests", admin_requests, "GET"),
    ("/_scripted/reset", admin_reset, "POST"),
]


def create_app(state: ServerState | None = None) -> TransportMiddleware:
    """The ASGI app over ``state`` (wrapped so that faults can drop connections)."""
    state = state or ServerState()
    routes = [Route(path, partial(handler, state), methods=[method]) for path, handler, method in _ROUTES]
    return TransportMiddleware(Starlette(routes=routes))
