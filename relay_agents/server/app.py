"""The OpenAI-compatible relay server: routes, authentication, request checks and metrics.

``create_app(config, settings)`` returns a FastAPI app. Every generation request is checked
(content type, size, JSON, fields, model, limits) before any model is asked; failures are
OpenAI error objects with a 4xx status and never affect other requests. Whole answers use
``arelay``; streams use ``astream_relay``. Either way the relay runs in its own task and is
cancelled, with its upstream requests, when the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from relay_agents.api import RelayDelta, RelayResult, arelay, astream_relay
from relay_agents.budgets import close_budget_stores, open_budget_store
from relay_agents.core.config import Budget, RelayConfig
from relay_agents.core.tools import ToolAnswer, ToolChoiceUnmet
from relay_agents.server.answers import StreamRenderer, chat_completion, text_completion
from relay_agents.server.errors import APIError, failure, invalid_request
from relay_agents.server.limits import FailureLimiter
from relay_agents.server.metrics import Metrics
from relay_agents.server.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
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
SCHEMA_REF = "#/components/schemas/{model}"
#: One server-sent event of a stream: ``data`` is a chunk, an error object or ``[DONE]``.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
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
        self.auth_failures = FailureLimiter(
            burst=settings.auth_failure_burst,
            per_s=settings.auth_failures_per_s,
            max_clients=settings.auth_limiter_clients,
        )

    # -- checks ---------------------------------------------------------------------------

    def authorize(self, request: Request) -> str | None:
        """The budget pool of the request's key (None when the server has no keys), else 401;
        429 for a client address that failed too often lately (see :mod:`.limits`)."""
        if not self.settings.api_keys:
            return None
        address = request.client.host if request.client else ""
        wait = self.auth_failures.retry_after(address)
        if wait:
            raise APIError(
                429,
                f"too many failed authentications from this address; try again in {wait} s",
                code="rate_limit_exceeded",
                type="rate_limit_error",
                headers={"retry-after": str(wait)},
            )
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            self.auth_failures.failed(address)
            raise APIError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        pool = self.settings.key_pool(key.strip())
        if pool is None:
            self.auth_failures.failed(address)
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
        deadline = self.settings.body_timeout_s
        try:
            async with asyncio.timeout(deadline):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise APIError(
                            413, f"the request body is larger than {limit} bytes", code="request_too_large"
                        )
                    chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(499, "the client left while sending its request") from None
        except TimeoutError:
            raise APIError(
                408,
                f"the request body did not arrive within {deadline:g} s",
                code="request_timeout",
                headers={"connection": "close"},  # the rest of the body is not read
            ) from None
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
        """The conversation key: the ``X-Relay-Conversation`` header, else the ``user`` field.

        The header is read as UTF-8, as the JSON body is, so one id names one budget either way
        (ASGI servers hand headers over as bytes; Starlette would decode them as Latin-1).
        """
        raw = request.headers.get(CONVERSATION_HEADER)
        if raw is not None:
            try:
                header = raw.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                raise APIError(400, f"the {CONVERSATION_HEADER} header must be UTF-8") from None
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
            keys: dict[str, Any] = _relay_keys(self.conversation(request, req), pool)
            tools = None
            if isinstance(req, ChatCompletionRequest) and (tools := req.tool_answer(self.config.tool_parser)):
                keys["tools"] = req.wire_tools()
            rid, created = f"{kind.id_prefix}relay-{uuid.uuid4().hex}", int(time.time())
            if req.stream:
                response = await self._stream(request, kind, req, run_args, keys, rid, created, obs, tools)
                if isinstance(response, RelayStreamResponse):
                    return response  # it records the observation when the stream ends
            else:
                response = await self._whole(request, kind, run_args, keys, rid, created, tools)
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
        keys: dict[str, Any],
        rid: str,
        created: int,
        tools: ToolAnswer | None,
    ) -> Response:
        paid = _TeacherPaid()
        try:
            gone, result = await until_disconnect(request.receive, arelay(*run_args, **keys, on_delta=paid))
        except Exception as exc:
            raise paid.failure(exc) from exc
        if gone:
            return Response(status_code=499)
        assert isinstance(result, RelayResult)
        self.metrics.answered(result)
        model = self.settings.model
        if kind.chat:
            try:
                body: Any = chat_completion(result, rid=rid, created=created, model=model, tools=tools)
            except ToolChoiceUnmet as exc:
                raise paid.failure(exc) from exc
        else:
            body = text_completion(result, rid=rid, created=created, model=model)
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(
        self,
        request: Request,
        kind: _Kind,
        req: ChatCompletionRequest | CompletionRequest,
        run_args: tuple[Any, RelayConfig],
        keys: dict[str, Any],
        rid: str,
        created: int,
        obs: _Observation,
        tools: ToolAnswer | None,
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
            raise failure(first[0].error)  # no text yet: the teacher has not written either
        encoder = ChunkEncoder(
            chat=kind.chat,
            rid=rid,
            created=created,
            model=self.settings.model,
            include_usage=req.include_usage,
        )
        renderer = StreamRenderer(encoder, on_result=self.metrics.answered, on_error=failure, tools=tools)

        def on_close(gone: bool) -> None:
            if run.first_text_at is not None:
                self.metrics.first_token.labels(kind.endpoint).observe(run.first_text_at - run.started)
            obs.close(499 if gone else renderer.error.status if renderer.error else 200)

        return RelayStreamResponse(run, watcher, first, renderer, on_close)


class _TeacherPaid:
    """Sees an answer's deltas; a failure after the teacher wrote (and was paid for) text is
    not to be retried blindly: the retry would pay the teacher again."""

    __slots__ = ("paid",)

    def __init__(self) -> None:
        self.paid = False

    def __call__(self, delta: RelayDelta) -> None:
        if delta.source == "teacher":
            self.paid = True

    def failure(self, exc: BaseException) -> APIError:
        err = failure(exc)
        if self.paid and err.retry:
            err.retry = False
            err.message += "; the teacher was already paid for part of this answer, so a retry pays it again"
        return err


def _relay_keys(conversation: str | None, pool: str | None) -> dict[str, str]:
    """Keyword arguments of ``arelay``/``astream_relay`` naming whose budgets an answer spends:
    the conversation's (without a conversation id, each request is a conversation of its own)
    and the API key's pool. With keys, a conversation id lives inside its key's namespace
    (``<pool>/<id>``; the pool's name has a fixed length, so two keys never share one), so a
    key that sends another tenant's id starts a conversation of its own."""
    if conversation is not None and pool is not None:
        conversation = f"{pool}/{conversation}"
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


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def _generation_doc(request: type[ChatCompletionRequest | CompletionRequest], answer: type) -> dict[str, Any]:
    """The OpenAPI description of a generation route, whose handler reads its body itself (so
    FastAPI does not see it): the request model, the answer or a stream, the error objects."""
    return {
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": SCHEMA_REF.format(model=request.__name__)}}
                },
            }
        },
        "responses": {
            200: {"model": answer, "content": {"text/event-stream": {"schema": SSE_EVENT}}},
            **_errors(400, 401, 404, 408, 413, 415, 429, 502, 503),
        },
    }


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the request models the generation routes read themselves."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _, defs = models_json_schema(
            [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
            ref_template=SCHEMA_REF,
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(config: RelayConfig, settings: ServerSettings | None = None) -> FastAPI:
    """The OpenAI-compatible relay server for one relay configuration.

    With API keys, the OpenAPI schema needs a key too and the documentation pages are off (a
    browser opening them sends no key).
    """
    server = RelayServer(config, settings or ServerSettings())
    if any(_limited(b) for b in (config.budget, config.user_budget)):
        open_budget_store(config.budget_store)  # a bad store fails now, not at the first call
    keyed = bool(server.settings.api_keys)
    app = FastAPI(
        title="relay-agents",
        summary="OpenAI-compatible relay decoding server",
        lifespan=_lifespan,
        openapi_url=None if keyed else "/openapi.json",
        docs_url=None if keyed else "/docs",
        redoc_url=None if keyed else "/redoc",
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.relay = server

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.post("/v1/chat/completions", **_generation_doc(ChatCompletionRequest, ChatCompletion))
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, CHAT)

    @app.post("/v1/completions", **_generation_doc(CompletionRequest, Completion))
    async def completions(request: Request) -> Response:
        return await server.generate(request, TEXT)

    def card() -> ModelCard:
        return ModelCard(id=server.settings.model, created=server.created)

    @app.get("/v1/models", responses={200: {"model": ModelList}, **_errors(401, 429)})
    async def models(request: Request) -> Response:
        server.authorize(request)
        return Response(ModelList(data=[card()]).model_dump_json(), media_type="application/json")

    @app.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}, **_errors(401, 404, 429)})
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

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    if keyed:

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request) -> Response:
            server.authorize(request)
            return JSONResponse(app.openapi())

    return app
