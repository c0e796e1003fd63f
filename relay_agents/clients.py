"""The I/O edge: one pooled client per endpoint, generations with retries.

Both paths post through :mod:`relay_agents.transport` (pooled httpx2 for sync, aiohttp for
async; the SDK's error types), and the async one costs a quarter of the SDK's CPU per request. A
generation is retried with tenacity only until its first chunk arrives: a stream is never
retried after its first token, because tokens would be emitted twice. The SDK's own retries
are off.

A failure leaves a client as the exception it was (``except openai.NotFoundError`` still
works, the server maps it to its status), its message rewritten to name the endpoint's role and
URL and, for the common mistakes, what to do.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import openai
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from relay_agents.core.config import Endpoint, digest
from relay_agents.core.protocol import CALL_CLOSE, CALL_OPEN
from relay_agents.core.result import Source
from relay_agents.core.types import Generation, Request, TokenLogprob
from relay_agents.prompts import ChatTemplate, instruct_messages
from relay_agents.transport import AsyncTransport, SyncTransport

OnText = Callable[[str], None]
#: Called with what a call had received when it is interrupted (cancelled, or its text's
#: consumer raised), so that its caller can charge the tokens that did arrive.
OnInterrupt = Callable[[Generation], None]
#: Called with each generated token (its index in the reply, its log-probabilities); True
#: cuts the reply just before that token and stops reading it.
Watch = Callable[[int, TokenLogprob], bool]
#: Both tags are banned when calls are blocked: a student that may not open a command
#: must not close one either.
CALL_TAGS = (CALL_OPEN, CALL_CLOSE)
#: Prompts rendered by the server (``/tokenize`` + ``/detokenize``) kept per client.
SERVER_PROMPT_CACHE_SIZE = 1024

#: What a broken or garbled stream raises: the SDK's errors (both transports raise them), bad JSON.
STREAM_ERRORS: tuple[type[Exception], ...] = (openai.APIError, ValueError)


def is_transient(exc: BaseException) -> bool:
    """429, 5xx, timeouts and connection errors are worth another try; nothing else is."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return False


class StreamError(ValueError):
    """The server sent an error event or garbage in the middle of a stream."""


# -- failures that say what to do ---------------------------------------------------------


def model_missing(exc: BaseException) -> bool:
    """Whether ``exc`` is a 404 saying the model does not exist (vLLM's and OpenAI's words)."""
    if not isinstance(exc, openai.NotFoundError) or not isinstance(exc.body, dict):
        return False
    message = str(exc.body.get("message", "")).lower()
    return exc.body.get("code") == "model_not_found" or ("model" in message and "not exist" in message)


def failure_hint(
    exc: BaseException, endpoint: Endpoint, role: Source, served: list[str] | None
) -> str | None:
    """What to do about ``exc`` from ``endpoint`` for the common mistakes; None when none fits.

    ``served`` is the model ids the server lists, read when :func:`model_missing`.
    """
    base, var = endpoint.base_url, f"RELAY_{role.upper()}"
    if isinstance(exc, openai.APITimeoutError):
        return (
            f"no answer within {endpoint.timeout:g} s: a busy server needs a longer timeout "
            f"({role}.timeout, {var}_TIMEOUT)"
        )
    if isinstance(exc, openai.APIConnectionError):
        if "refused the connection" in exc.message:
            return f"nothing listens there: start the model server, or fix {role}.base_url ({var}_BASE_URL)"
        return None
    if isinstance(exc, openai.APIStatusError):
        path = urlsplit(str(exc.request.url)).path
        if model_missing(exc):
            listed = ", ".join(repr(m) for m in served) if served else "none it would list"
            return (
                f"the server does not serve {endpoint.model!r}; it serves {listed} "
                f"({role}.model, {var}_MODEL)"
            )
        if exc.status_code in (401, 403):
            return f"the server refused the API key ({role}.api_key, {var}_API_KEY)"
        if exc.status_code == 404 and path.endswith(("/tokenize", "/detokenize")):
            return (
                f"the server has no vLLM {path} to render the prompt: set {role}.tokenizer_path or "
                f'{role}.chat_template, or {role}.api = "chat"'
            )
        if exc.status_code == 404 and not urlsplit(base).path.rstrip("/").endswith("/v1"):
            return f"OpenAI-compatible servers answer under /v1: try {base.rstrip('/')}/v1 ({var}_BASE_URL)"
        if exc.status_code in (404, 405, 501) or not isinstance(exc.body, dict):
            return (
                f"this is not an OpenAI-compatible API (HTTP {exc.status_code}, {_body_kind(exc.body)}): "
                f"{role}.base_url must be the API root of a server such as vLLM (http://host:8000/v1)"
            )
        return None
    if isinstance(exc, json.JSONDecodeError):
        return f"the answer is not JSON: {role}.base_url must be the API root of an OpenAI-compatible server"
    return None


def _body_kind(body: object) -> str:
    return "an OpenAI error object" if isinstance(body, dict) else "an answer that is not JSON"


def explain_failure(exc: BaseException, endpoint: Endpoint, role: Source, served: list[str] | None) -> None:
    """Rewrite ``exc``'s message in place to name the role, the URL and a hint: the exception
    keeps its class and attributes (status, body, request), which callers branch on."""
    original = str(exc.message if isinstance(exc, openai.APIError) else exc).rstrip(". ")
    message = f"{role} endpoint {endpoint.base_url} (model {endpoint.model!r}): {original}"
    hint = failure_hint(exc, endpoint, role, served)
    if hint is not None:
        message += f". Hint: {hint}"
    exc.args = (message,)
    if isinstance(exc, openai.APIError):
        exc.message = message


def served_ids(models: Any) -> list[str]:
    """The model ids of a ``/models`` answer."""
    data = models.get("data") if isinstance(models, dict) else None
    return [str(m["id"]) for m in data or () if isinstance(m, dict) and "id" in m]


class _Collector:
    """Accumulates one SSE stream (completions or chat chunks, as JSON) into a :class:`Generation`.

    Chunks are read as plain dicts: building SDK models per token costs more than the
    rest of the relay loop together.
    """

    __slots__ = (
        "chunks",
        "cut",
        "finish_reason",
        "limit",
        "parts",
        "prompt_tokens",
        "received",
        "stop_reason",
        "tokens",
        "trimmed",
        "usage_tokens",
        "watch",
    )

    def __init__(self, limit: int | None, watch: Watch | None = None) -> None:
        self.watch = watch
        self.tokens = 0  # tokens kept (before a cut), counted from log-probabilities
        self.received = 0  # tokens received in log-probabilities, a cut one included
        self.cut = False
        self.parts: list[str] = []
        self.chunks = 0
        self.limit = limit  # chat-instruct: trim to N content chunks
        self.trimmed = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.prompt_tokens = 0
        self.usage_tokens: int | None = None

    def add_line(self, line: str) -> str:
        """Take one SSE line; return the text it adds."""
        if not line.startswith("data:"):
            return ""
        payload = line[5:].strip()
        if payload == "[DONE]":
            return ""
        return self.add(json.loads(payload))

    def add(self, chunk: Any) -> str:
        """Take one chunk (or a whole non-streamed response); return the text it adds."""
        if not isinstance(chunk, dict):
            raise StreamError(f"unexpected response: {str(chunk)[:200]}")
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise StreamError(f"error event in the stream: {message}")
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens") or 0
            self.usage_tokens = usage.get("completion_tokens")
        choices = chunk.get("choices")
        if not choices:
            return ""
        choice = choices[0]
        delta = choice.get("text")
        if delta is None:
            delta = (choice.get("delta") or choice.get("message") or {}).get("content")
        if self.cut:
            return ""
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
            self.stop_reason = choice.get("stop_reason")
        logprobs = choice.get("logprobs")
        if logprobs:
            delta = self._watched(delta or "", logprobs)
        if delta:
            self.parts.append(delta)
            self.chunks += 1
            if self.limit is not None and self.chunks >= self.limit:
                self.trimmed = True  # trimmed: stop reading (the connection is dropped)
        return delta or ""

    def _watched(self, delta: str, logprobs: dict[str, Any]) -> str:
        """Count this chunk's tokens and let the watch cut before one; return the text kept.

        The text kept is the chunk's text up to the cut token: the texts of the tokens before
        it, which start the chunk's text (vLLM, both formats). The tokens need not spell the
        whole text: a whole reply that ended on EOS lists the EOS token (``<|im_end|>``) that its
        text leaves out, and a stop string may end the text inside a token. Where the tokens
        before the cut do not start the text (undecodable bytes), the whole chunk is dropped,
        its tokens with it, so the token the watch rejected never shows.
        """
        tokens = parse_logprobs(logprobs)
        self.received += len(tokens)
        if self.watch is None:
            self.tokens += len(tokens)
            return delta
        for i, token in enumerate(tokens):
            if self.watch(self.tokens + i, token):
                self.cut = self.trimmed = True
                self.finish_reason, self.stop_reason = None, None
                kept = "".join(t.token for t in tokens[:i])
                if not delta.startswith(kept):
                    return ""
                self.tokens += i
                return kept
        self.tokens += len(tokens)
        return delta

    def result(self, error: Exception | None = None) -> Generation:
        if self.limit is not None and self.chunks >= self.limit and self.finish_reason is None:
            self.finish_reason = "length"
        seen = self.received or self.chunks
        generated = self.usage_tokens if self.usage_tokens is not None else seen
        if self.limit is not None:
            generated = min(generated, self.limit)
        kept = self.tokens if self.cut else generated
        return Generation(
            text="".join(self.parts),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=kept,
            error=error,
            cut=self.cut,
            discarded_tokens=max(generated - kept, 0) if self.cut else 0,
        )


def parse_logprobs(logprobs: dict[str, Any]) -> list[TokenLogprob]:
    """Tokens with their log-probabilities from a choice's ``logprobs``, in either format:
    completions (``tokens``, ``token_logprobs``, ``top_logprobs`` as dicts) or chat
    (``content: [{token, logprob, top_logprobs: [{token, logprob}]}]``)."""
    content = logprobs.get("content")
    if content is not None:
        return [
            TokenLogprob(
                item.get("token") or "",
                item.get("logprob"),
                tuple((alt.get("token") or "", alt.get("logprob")) for alt in item.get("top_logprobs") or ()),
            )
            for item in content
        ]
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return [
        TokenLogprob(tok or "", lp, tuple((top or {}).items()))
        for tok, lp, top in zip(tokens, values, tops, strict=False)
    ]


class EndpointClient:
    """Talks to one endpoint as the student or the teacher (named in its errors): one pooled
    sync transport, one async transport (a pool per loop)."""

    def __init__(self, endpoint: Endpoint, role: Source) -> None:
        self.endpoint = endpoint
        self.role = role
        key, timeouts = (
            endpoint.api_key.get_secret_value(),
            {
                "timeout": endpoint.timeout,
                "connect_timeout": endpoint.connect_timeout,
            },
        )
        self.sync_transport = SyncTransport(key, **timeouts)
        self.transport = AsyncTransport(key, **timeouts)
        self._template: ChatTemplate | None = None
        if endpoint.chat_template:
            self._template = ChatTemplate(endpoint.chat_template)
        elif endpoint.tokenizer_path:
            self._template = ChatTemplate.from_tokenizer_dir(endpoint.tokenizer_path)
        self._call_token_ids: list[int] | None = None
        self._server_prompts: OrderedDict[str, str] = OrderedDict()

    def close(self) -> None:
        self.sync_transport.close()

    async def aclose(self) -> None:
        self.close()
        await self.transport.aclose()

    # -- retries --------------------------------------------------------------------

    def _retry_args(self) -> dict[str, Any]:
        ep = self.endpoint
        return {
            "retry": retry_if_exception(is_transient),
            "stop": stop_after_attempt(ep.max_retries + 1) | stop_after_delay(ep.retry_deadline),
            "wait": wait_exponential_jitter(
                multiplier=ep.retry_initial_delay, max=ep.retry_max_delay, jitter=ep.retry_initial_delay
            ),
            "reraise": True,
        }

    # -- prompts --------------------------------------------------------------------

    def _root_url(self) -> str:
        base = self.endpoint.base_url
        return base[: -len("/v1")] if base.endswith("/v1") else base

    def _render_locally(self, request: Request) -> str | None:
        if self._template is None:
            return None
        return self._template.render(
            request.messages, add_generation_prompt=True, enable_thinking=request.enable_thinking
        )

    def _tokenize_body(self, request: Request) -> dict[str, Any]:
        return {
            "model": self.endpoint.model,
            "messages": request.messages,
            "add_generation_prompt": True,
            "chat_template_kwargs": {"enable_thinking": request.enable_thinking},
        }

    @staticmethod
    def _prompt_key(request: Request) -> str:
        return repr((request.messages, request.enable_thinking))

    def prompt_prefix(self, request: Request) -> str:
        """The rendered prompt (completions API), from the local template or the server."""
        local = self._render_locally(request)
        if local is not None:
            return local
        key = self._prompt_key(request)
        if key not in self._server_prompts:
            post, root = self.sync_transport.post_json, self._root_url()
            ids = post(f"{root}/tokenize", self._tokenize_body(request))
            text = post(f"{root}/detokenize", {"model": self.endpoint.model, "tokens": ids["tokens"]})
            self._remember_prompt(key, text["prompt"])
        return self._server_prompts[key]

    async def aprompt_prefix(self, request: Request) -> str:
        local = self._render_locally(request)
        if local is not None:
            return local
        key = self._prompt_key(request)
        if key not in self._server_prompts:
            post, root = self.transport.post_json, self._root_url()
            ids = await post(f"{root}/tokenize", self._tokenize_body(request))
            text = await post(f"{root}/detokenize", {"model": self.endpoint.model, "tokens": ids["tokens"]})
            self._remember_prompt(key, text["prompt"])
        return self._server_prompts[key]

    def _remember_prompt(self, key: str, prompt: str) -> None:
        self._server_prompts[key] = prompt
        if len(self._server_prompts) > SERVER_PROMPT_CACHE_SIZE:
            self._server_prompts.popitem(last=False)

    def _tag_body(self, tag: str) -> dict[str, Any]:
        return {"model": self.endpoint.model, "prompt": tag, "add_special_tokens": False}

    def _tag_ids(self, tokenized: list[list[int]]) -> list[int]:
        for tag, ids in zip(CALL_TAGS, tokenized, strict=True):
            if len(ids) != 1:
                raise ValueError(
                    f"{self.endpoint.model}: call_suppression='logit_bias' needs {tag!r} to be one "
                    f"token, the server's tokenizer gives {len(ids)}; use 'bad_words'"
                )
        return [ids[0] for ids in tokenized]

    def call_token_ids(self) -> list[int]:
        """Token ids of ``<call>`` and ``</call>`` in the server's vocabulary (for logit_bias)."""
        if self._call_token_ids is None:
            post, root = self.sync_transport.post_json, self._root_url()
            tokenized = [post(f"{root}/tokenize", self._tag_body(t))["tokens"] for t in CALL_TAGS]
            self._call_token_ids = self._tag_ids(tokenized)
        return self._call_token_ids

    async def acall_token_ids(self) -> list[int]:
        if self._call_token_ids is None:
            root = self._root_url()
            tokenized = [
                (await self.transport.post_json(f"{root}/tokenize", self._tag_body(t)))["tokens"]
                for t in CALL_TAGS
            ]
            self._call_token_ids = self._tag_ids(tokenized)
        return self._call_token_ids

    # -- request building (pure) ----------------------------------------------------------

    def _body(
        self, request: Request, prefix: str | None, call_ids: list[int] | None
    ) -> tuple[str, dict[str, Any]]:
        """(API, JSON body) of one streamed continuation request."""
        ep = self.endpoint
        kwargs: dict[str, Any] = {
            "model": ep.model,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for name in ("temperature", "top_p", "seed"):
            value = getattr(ep, name)
            if value is not None:
                kwargs[name] = value
        kwargs[ep.max_tokens_param] = request.max_tokens
        if request.logprobs is not None:
            if ep.api == "completions":
                kwargs["logprobs"] = request.logprobs
            else:
                kwargs["logprobs"] = True
                kwargs["top_logprobs"] = request.logprobs
        extra = dict(ep.extra_body)
        if request.stop:
            kwargs["stop"] = request.stop
            if ep.api != "chat-instruct":
                extra["include_stop_str_in_output"] = True
        if request.suppress_calls:
            if ep.call_suppression == "bad_words":
                extra["bad_words"] = [*extra.get("bad_words", []), *CALL_TAGS]
            elif ep.call_suppression == "logit_bias" and call_ids is not None:
                kwargs["logit_bias"] = {str(i): -100 for i in call_ids}
        if ep.api == "completions":
            kwargs["prompt"] = (prefix or "") + request.answer
            api = "completions"
        elif ep.api == "chat":
            messages = list(request.messages)
            if request.answer:
                messages.append({"role": "assistant", "content": request.answer})
            extra["continue_final_message"] = bool(request.answer)
            extra["add_generation_prompt"] = not request.answer
            extra["chat_template_kwargs"] = {"enable_thinking": request.enable_thinking}
            kwargs["messages"] = messages
            api = "chat"
        else:
            kwargs["messages"] = (
                instruct_messages(request.messages, request.answer, ep.instruct_template)
                if request.answer
                else list(request.messages)
            )
            api = "chat"
        return api, {**kwargs, **extra}

    def _url(self, api: str) -> str:
        return f"{self.endpoint.base_url}/{'completions' if api == 'completions' else 'chat/completions'}"

    def _needs_call_ids(self, request: Request) -> bool:
        return request.suppress_calls and self.endpoint.call_suppression == "logit_bias"

    def _trim_limit(self, request: Request) -> int | None:
        return request.max_tokens if self.endpoint.api == "chat-instruct" else None

    # -- streaming ------------------------------------------------------------------

    def _whole(self, request: Request, on_text: OnText | None) -> bool:
        """Ask for the whole reply at once when nobody reads tokens as they come.

        vLLM spends noticeably more time per token on a stream; chat-instruct always
        streams, because its reply is trimmed to N tokens as they arrive.
        """
        return on_text is None and self.endpoint.api != "chat-instruct"

    @staticmethod
    def _unstreamed(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k not in ("stream", "stream_options")}

    # -- failures -------------------------------------------------------------------------

    def _served(self) -> list[str] | None:
        """The ids the server lists at ``/models`` (None when it lists none)."""
        try:
            return served_ids(self.sync_transport.get_json(f"{self.endpoint.base_url}/models"))
        except STREAM_ERRORS:
            return None

    async def _aserved(self) -> list[str] | None:
        try:
            return served_ids(await self.transport.get_json(f"{self.endpoint.base_url}/models"))
        except STREAM_ERRORS:
            return None

    def generate(
        self,
        request: Request,
        on_text: OnText | None = None,
        watch: Watch | None = None,
        on_interrupt: OnInterrupt | None = None,
    ) -> Generation:
        """One continuation; with ``on_text`` it streams and ``on_text`` gets each text delta.

        ``watch`` (with ``request.logprobs``) sees each token and may cut the reply before one:
        a stream stops there (the connection is closed), a whole reply is cut after the fact.
        ``on_interrupt`` gets what had arrived when anything but a stream error ends the call.
        A failure (raised, or a stream's ``error``) names the role, the URL and a hint.
        """
        collector = _Collector(self._trim_limit(request), watch)
        try:
            gen = self._generate(request, collector, on_text)
        except STREAM_ERRORS as exc:
            explain_failure(exc, self.endpoint, self.role, self._served() if model_missing(exc) else None)
            raise
        except BaseException:
            if on_interrupt is not None:
                on_interrupt(collector.result())
            raise
        if gen.error is not None:
            explain_failure(gen.error, self.endpoint, self.role, None)
        return gen

    async def agenerate(
        self,
        request: Request,
        on_text: OnText | None = None,
        watch: Watch | None = None,
        on_interrupt: OnInterrupt | None = None,
    ) -> Generation:
        """Async :meth:`generate`; a cancelled call hands what had arrived to ``on_interrupt``."""
        collector = _Collector(self._trim_limit(request), watch)
        try:
            gen = await self._agenerate(request, collector, on_text)
        except STREAM_ERRORS as exc:
            served = await self._aserved() if model_missing(exc) else None
            explain_failure(exc, self.endpoint, self.role, served)
            raise
        except BaseException:
            if on_interrupt is not None:
                on_interrupt(collector.result())
            raise
        if gen.error is not None:
            explain_failure(gen.error, self.endpoint, self.role, None)
        return gen

    def _generate(self, request: Request, collector: _Collector, on_text: OnText | None) -> Generation:
        prefix = self.prompt_prefix(request) if self.endpoint.api == "completions" else None
        call_ids = self.call_token_ids() if self._needs_call_ids(request) else None
        api, body = self._body(request, prefix, call_ids)
        url, transport = self._url(api), self.sync_transport
        if self._whole(request, on_text):
            for attempt in Retrying(**self._retry_args()):
                with attempt:
                    reply = transport.post_json(url, self._unstreamed(body))
            collector.add(reply)
            return collector.result()
        for attempt in Retrying(**self._retry_args()):
            with attempt:
                opened = transport.post(url, body)
                response = opened.__enter__()
                try:
                    lines = iter(transport.lines(response, url))
                    _emit(collector.add_line(next(lines, "data: [DONE]")), on_text)
                except BaseException:
                    opened.__exit__(None, None, None)
                    raise
        try:
            if not collector.trimmed:
                for line in lines:
                    _emit(collector.add_line(line), on_text)
                    if collector.trimmed:
                        break
        except STREAM_ERRORS as exc:
            return collector.result(error=exc)
        finally:
            opened.__exit__(None, None, None)
        return collector.result()

    async def _agenerate(self, request: Request, collector: _Collector, on_text: OnText | None) -> Generation:
        prefix = await self.aprompt_prefix(request) if self.endpoint.api == "completions" else None
        call_ids = await self.acall_token_ids() if self._needs_call_ids(request) else None
        api, body = self._body(request, prefix, call_ids)
        url, transport = self._url(api), self.transport
        if self._whole(request, on_text):
            async for attempt in AsyncRetrying(**self._retry_args()):
                with attempt:
                    reply = await transport.post_json(url, self._unstreamed(body))
            collector.add(reply)
            return collector.result()
        async for attempt in AsyncRetrying(**self._retry_args()):
            with attempt:
                opened = transport.post(url, body)
                response = await opened.__aenter__()
                try:
                    lines = aiter(transport.lines(response, url))
                    _emit(collector.add_line(await anext(lines, "data: [DONE]")), on_text)
                except BaseException:
                    await opened.__aexit__(None, None, None)
                    raise
        try:
            if not collector.trimmed:
                async for line in lines:
                    _emit(collector.add_line(line), on_text)
                    if collector.trimmed:
                        break
        except STREAM_ERRORS as exc:
            return collector.result(error=exc)
        finally:
            await opened.__aexit__(None, None, None)
        return collector.result()


_CLIENTS: dict[tuple[Source, str], EndpointClient] = {}


def client_for(endpoint: Endpoint, role: Source) -> EndpointClient:
    """The shared client of an endpoint in a role: every graph on the same endpoint reuses its pool."""
    key = (role, digest(endpoint))
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS[key] = EndpointClient(endpoint, role)
    return client


def _emit(delta: str, on_text: OnText | None) -> None:
    if delta and on_text is not None:
        on_text(delta)
