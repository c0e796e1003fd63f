"""The OpenAI-compatible relay server: routes, authentication, request checks and metrics.

``create_app(config, settings)`` returns a FastAPI app. Every generation request is checked
(content type, size, JSON, fields, model, limits) before any model is asked; failures are
OpenAI error objects with a 4xx status and never affect other requests. Whole answers use
``arelay``; streams use ``astream_relay``. Either way the relay runs in its own task and is
cancelled, with its upstream requests, when the client disconnects.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay_agents.api import RelayResult, arelay, astream_relay
from relay_agents.budgets import close_budget_stores, open_budget_store
from relay_agents.core.config import Budget, RelayConfig
from relay_agents.server.answers import StreamRenderer, chat_completion, text_completion
from relay_agents.server.errors import APIError, failure, invalid_request
from relay_agents.server.metrics import Metrics
from relay_agents.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from relay_agents.server.settings import ServerSettings
from relay_agents.server.sse import ChunkEncoder
from relay_agents.server.streaming import (
    GONE,
    DisconnectWatcher,
    End,
    RelayRun,
    RelayStreamResponse,
    until_disconnect,
)

CONVERSATION_HEADER = "x-relay-conversation"
#: Distinct per-request answer caps (``max_tokens``) whose configs are kept.
MAX_CACHED_CAPS = 32


@dataclass(frozen=True, slots=True)
class _Kind:
    endpoint: str
    schema: type[ChatCompletionRequest] | type[CompletionRequest]
    chat: bool
    id_prefix: str


CHAT = _Kind("chat.completions", ChatCompletionRequest, True, "chatcmpl-")
TEXT = _Kind("completions", CompletionRequest, False, "cmpl-")


class _Observation:
    """The metrics of one generation request, recorded once when it ends."""

    __slots__ = ("endpoint", "metrics", "started", "stream")

    def __init__(self, metrics: Metrics, endpoint: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.stream = False
        self.started = time.perf_counter()
        metrics.in_flight.inc()

    def close(self, status: int) -> None:
        m, stream = self.metrics, "true" if self.stream else "false"
        m.in_flight.dec()
        m.requests.labels(self.endpoint, stream).inc()
        if status == 499:
            m.cancelled.labels(self.endpoint).inc()
        elif status >= 400:
            m.errors.labels(self.endpoint, str(status)).inc()
        m.latency.labels(self.endpoint, stream).observe(time.perf_counter() - self.started)


class RelayServer:
    """What the routes share: the relay config, the server settings, the metrics."""

    def __init__(self, config: RelayConfig, settings: ServerSettings) -> None:
        self.config = config
        self.settings = settings
        self.metrics = Metrics()
        self.created = int(time.time())
        self._configs: dict[int, RelayConfig] = {}

    # -- checks ---------------------------------------------------------------------------

    def authorize(self, request: Request) -> str | None:
        """The budget pool of the request's key (None when the server has no keys), else 401."""
        if not self.settings.api_keys:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        pool = self.settings.key_pool(key.strip())
        if pool is None:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
        return pool

    async def read_body(self, request: Request) -> bytes:
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(
                415,
                f"unsupported content type {media or 'none'!r}: send application/json",
                code="unsupported_media_type",
            )
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(
                    413, f"the request body is larger than {limit} bytes", code="request_too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(self, body: bytes, kind: _Kind) -> ChatCompletionRequest | CompletionRequest:
        try:
            req = kind.schema.model_validate_json(body)
        except ValidationError as exc:
            raise invalid_request(exc) from None
        settings = self.settings
        if req.model != settings.model:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist; this server serves {settings.model!r}",
                param="model",
                code="model_not_found",
            )
        cap = req.answer_cap
        if cap is not None and cap > self.config.max_answer_tokens:
            raise APIError(
                400,
                f"max_tokens is {cap}, more than this relay's answer cap of "
                f"{self.config.max_answer_tokens} tokens",
                param="max_tokens",
                code="invalid_value",
            )
        chars = req.prompt_chars()
        if chars > settings.max_prompt_chars:
            raise APIError(
                400,
                f"the prompt has {chars} characters, more than this server's limit of "
                f"{settings.max_prompt_chars}",
                param="messages" if kind.chat else "prompt",
                code="context_length_exceeded",
            )
        if isinstance(req, ChatCompletionRequest) and len(req.messages) > settings.max_messages:
            raise APIError(
                400,
                f"{len(req.messages)} messages, more than this server's limit of {settings.max_messages}",
                param="messages",
                code="invalid_value",
            )
        return req

    def config_for(self, cap: int | None) -> RelayConfig:
        """The relay config with the request's answer cap (a few distinct caps are kept)."""
        if cap is None or cap == self.config.max_answer_tokens:
            return self.config
        config = self._configs.get(cap)
        if config is None:
            if len(self._configs) >= MAX_CACHED_CAPS:
                self._configs.clear()
            config = self._configs[cap] = self.config.model_copy(update={"max_answer_tokens": cap})
        return config

    @staticmethod
    def conversation(request: Request, req: ChatCompletionRequest | CompletionRequest) -> str | None:
        """The conversation key: the ``X-Relay-Conversation`` header, else the ``user`` field."""
        header = request.headers.get(CONVERSATION_HEADER)
        if header is not None:
            if not header.strip() or len(header) > 256:
                raise APIError(400, f"the {CONVERSATION_HEADER} header must be 1 to 256 characters")
            return header
        return req.user or None

    # -- generation -----------------------------------------------------------------------

    async def generate(self, request: Request, kind: _Kind) -> Response:
        obs = _Observation(self.metrics, kind.endpoint)
        try:
            pool = self.authorize(request)
            req = self.parse(await self.read_body(request), kind)
            obs.stream = bool(req.stream)
            run_args = (req.wire_messages(), self.config_for(req.answer_cap))
            keys = _relay_keys(self.conversation(request, req), pool)
            rid, created = f"{kind.id_prefix}relay-{uuid.uuid4().hex}", int(time.time())
            if req.stream:
                response = await self._stream(request, kind, req, run_args, keys, rid, created, obs)
                if isinstance(response, RelayStreamResponse):
                    return response  # it records the observation when the stream ends
            else:
                response = await self._whole(request, kind, run_args, keys, rid, created)
        except APIError as err:
            response = err.response()
        except Exception as exc:
            response = failure(exc).response()
        except BaseException:
            obs.close(499)
            raise
        obs.close(response.status_code)
        return response

    async def _whole(
        self,
        request: Request,
        kind: _Kind,
        run_args: tuple[Any, RelayConfig],
        keys: dict[str, str],
        rid: str,
        created: int,
    ) -> Response:
        try:
            gone, result = await until_disconnect(request.receive, arelay(*run_args, **keys))
        except Exception as exc:
            raise failure(exc) from exc
        if gone:
            return Response(status_code=499)
        assert isinstance(result, RelayResult)
        self.metrics.answered(result)
        build = chat_completion if kind.chat else text_completion
        body = build(result, rid=rid, created=created, model=self.settings.model)
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(
        self,
        request: Request,
        kind: _Kind,
        req: ChatCompletionRequest | CompletionRequest,
        run_args: tuple[Any, RelayConfig],
        keys: dict[str, str],
        rid: str,
        created: int,
        obs: _Observation,
    ) -> Response:
        run = RelayRun(astream_relay(*run_args, **keys))
        watcher = DisconnectWatcher(request.receive, run.abandon)
        try:
            first = await run.get()  # headers wait for the first text, so early failures get a status
        except BaseException:
            watcher.stop()
            run.abandon()
            raise
        if any(item is GONE for item in first):
            watcher.stop()
            return Response(status_code=499)
        if isinstance(first[0], End) and first[0].error is not None:
            watcher.stop()
            raise failure(first[0].error)
        encoder = ChunkEncoder(
            chat=kind.chat,
            rid=rid,
            created=created,
            model=self.settings.model,
            include_usage=req.include_usage,
        )
        renderer = StreamRenderer(encoder, on_result=self.metrics.answered, on_error=failure)

        def on_close(gone: bool) -> None:
            if run.first_text_at is not None:
                self.metrics.first_token.labels(kind.endpoint).observe(run.first_text_at - run.started)
            obs.close(499 if gone else renderer.error.status if renderer.error else 200)

        return RelayStreamResponse(run, watcher, first, renderer, on_close)


def _relay_keys(conversation: str | None, pool: str | None) -> dict[str, str]:
    """Keyword arguments of ``arelay``/``astream_relay`` naming whose budgets an answer spends:
    the conversation's (without a key, each request is a conversation of its own) and the API
    key's pool."""
    keys = {"conversation_id": conversation, "user": pool}
    return {name: value for name, value in keys.items() if value is not None}


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """On shutdown the budget stores are closed (SQLite checkpoints its write-ahead log)."""
    yield
    app.state.relay.metrics.close()
    close_budget_stores()


def _limited(budget: Budget) -> bool:
    return any(
        v is not None for v in (budget.max_teacher_tokens, budget.max_teacher_calls, budget.max_cost_usd)
    )


def create_app(config: RelayConfig, settings: ServerSettings | None = None) -> FastAPI:
    """The OpenAI-compatible relay server for one relay configuration."""
    server = RelayServer(config, settings or ServerSettings())
    if any(_limited(b) for b in (config.budget, config.user_budget)):
        open_budget_store(config.budget_store)  # a bad store fails now, not at the first call
    app = FastAPI(title="relay-agents", summary="OpenAI-compatible relay decoding server", lifespan=_lifespan)
    app.state.relay = server

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(request, TEXT)

    def card() -> ModelCard:
        return ModelCard(id=server.settings.model, created=server.created)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        server.authorize(request)
        return Response(ModelList(data=[card()]).model_dump_json(), media_type="application/json")

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        server.authorize(request)
        if model_id != server.settings.model:
            raise APIError(
                404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
            )
        return Response(card().model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    return app
