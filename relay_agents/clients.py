"""The I/O edge: one pooled client per endpoint, generations with retries.

Both paths post through :mod:`relay_agents.transport` (pooled httpx2 for sync, aiohttp for
async; the SDK's error types), and the async one costs a quarter of the SDK's CPU per request. A
generation is retried with tenacity only until its first chunk arrives: a stream is never
retried after its first token, because tokens would be emitted twice. The SDK's own retries
are off.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import openai
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from relay_agents.core.answer import context_room
from relay_agents.core.config import Endpoint, digest
from relay_agents.core.protocol import CALL_CLOSE, CALL_OPEN
from relay_agents.core.types import Generation, Request, TokenLogprob
from relay_agents.prompts import ChatTemplate, instruct_messages
from relay_agents.transport import AsyncTransport, SyncTransport

OnText = Callable[[str], None]
#: Called with each generated token (its index in the reply, its log-probabilities); True
#: cuts the reply just before that token and stops reading it.
Watch = Callable[[int, TokenLogprob], bool]
#: Both tags are banned when calls are blocked: a student that may not open a command
#: must not close one either.
CALL_TAGS = (CALL_OPEN, CALL_CLOSE)
#: Prompts rendered by the server (``/tokenize`` + ``/detokenize``) kept per client.
SERVER_PROMPT_CACHE_SIZE = 1024

#: A prompt of N UTF-8 bytes holds at most N tokens (a token of a byte-level BPE or
#: byte-fallback tokenizer spells at least one byte) plus the special tokens the server adds to
#: a completions prompt (one BOS for the tokenizers vLLM serves; two allowed).
ADDED_SPECIAL_TOKENS = 2

log = logging.getLogger(__name__)

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


class _Collector:
    """Accumulates one SSE stream (completions or chat chunks, as JSON) into a :class:`Generation`.

    Chunks are read as plain dicts: building SDK models per token costs more than the
    rest of the relay loop together.
    """

    __slots__ = (
        "chunks",
        "context_room",
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

    def __init__(
        self, limit: int | None, watch: Watch | None = None, context_room: int | None = None
    ) -> None:
        self.watch = watch
        self.context_room = context_room
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
            context_room=self.context_room,
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
    """Talks to one endpoint: one pooled sync SDK client, one async transport (a pool per loop)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
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
        self._context_tokens = endpoint.context_tokens
        self._context_read = endpoint.context_tokens is not None
        self._warned_context = False

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

    # -- the context window -------------------------------------------------------------

    def _models_url(self) -> str:
        return f"{self.endpoint.base_url}/models"

    def _listed_context(self, listing: Any) -> int | None:
        """The ``max_model_len`` /v1/models lists for this model (vLLM); hosted APIs list none."""
        entries = listing.get("data") if isinstance(listing, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("id") == self.endpoint.model:
                value = entry.get("max_model_len")
                return value if isinstance(value, int) and value > 0 else None
        return None

    def _remember_context(self, listing: Any) -> int | None:
        self._context_tokens, self._context_read = self._listed_context(listing), True
        return self._context_tokens

    def context_tokens(self) -> int | None:
        """The endpoint's context window in tokens (``None``: no known limit)."""
        if self._context_read:
            return self._context_tokens
        listing = None
        try:
            for attempt in Retrying(**self._retry_args()):
                with attempt:
                    listing = self.sync_transport.get_json(self._models_url())
        except (openai.APIStatusError, ValueError):
            pass  # no model list: no known limit
        return self._remember_context(listing)

    async def acontext_tokens(self) -> int | None:
        if self._context_read:
            return self._context_tokens
        listing = None
        try:
            async for attempt in AsyncRetrying(**self._retry_args()):
                with attempt:
                    listing = await self.transport.get_json(self._models_url())
        except (openai.APIStatusError, ValueError):
            pass
        return self._remember_context(listing)

    def _count_body(
        self, body: dict[str, Any], wanted: int | None, context: int | None
    ) -> dict[str, Any] | None:
        """The /tokenize body that counts the prompt of a generation ``body``; ``None`` when no
        count is needed: no known context, no /tokenize (chat-instruct: hosted APIs), or a
        prompt whose bytes show that ``wanted`` tokens fit (``wanted`` None: always count)."""
        api = self.endpoint.api
        if context is None or api == "chat-instruct":
            return None
        if api == "completions":
            prompt = body["prompt"]
            if wanted is not None and len(prompt.encode()) + ADDED_SPECIAL_TOKENS + wanted <= context:
                return None
            return {"model": body["model"], "prompt": prompt}
        keys = (
            "model",
            "messages",
            "add_generation_prompt",
            "continue_final_message",
            "chat_template_kwargs",
        )
        return {key: body[key] for key in keys}

    def _tokenize_url(self) -> str:
        return f"{self._root_url()}/tokenize"

    def _fitted(
        self, body: dict[str, Any], wanted: int, context: int | None, prompt: int | None
    ) -> int | None:
        """Cut ``body``'s max_tokens to the context's room; the room when it was cut (0: none)."""
        if context is not None and wanted > context and not self._warned_context:
            self._warned_context = True
            log.warning(
                "%s at %s has a context of %d tokens, fewer than the %d asked for: requests are cut to "
                "fit it. Set max_answer_tokens (RELAY_MAX_ANSWER_TOKENS) to at most %d.",
                self.endpoint.model,
                self.endpoint.base_url,
                context,
                wanted,
                context,
            )
        room = context_room(wanted, context, prompt)
        if room:
            body[self.endpoint.max_tokens_param] = room
        return room

    def _fit(self, body: dict[str, Any], wanted: int) -> int | None:
        """Cut ``body`` to the room its prompt leaves in the context; the room when it was cut.

        vLLM answers 400 to a max_tokens above max_model_len and to a prompt that leaves no
        room. The context is the endpoint's setting, else what /v1/models lists, read once per
        client. The prompt is counted by the server's /tokenize, exactly, and only when its UTF-8
        bytes do not show that it fits (the chat API's prompt is rendered by the server, so it
        is always counted): under a 32768-token context and the default 8192-token answer cap,
        a prompt under 24574 bytes needs no count. On the tiny pair's 512-token context each
        request of a tutor answer sent one, median 2.9 to 6.4 ms (857-token prompt, two runs on
        a shared 2-core machine), against 0.6 to 2.0 s for the whole 256-token answer. The
        previous request's prompt_tokens plus the tokens written since would cost no request,
        but it is not exact (a text's tokens are not the sum of its parts' tokens) and the first
        request of an answer has none.
        """
        context = self.context_tokens()
        count = self._count_body(body, wanted, context)
        prompt = (
            None if count is None else self.sync_transport.post_json(self._tokenize_url(), count)["count"]
        )
        return self._fitted(body, wanted, context, prompt)

    async def _afit(self, body: dict[str, Any], wanted: int) -> int | None:
        context = await self.acontext_tokens()
        count = self._count_body(body, wanted, context)
        prompt = (
            None if count is None else (await self.transport.post_json(self._tokenize_url(), count))["count"]
        )
        return self._fitted(body, wanted, context, prompt)

    def prompt_tokens(self, request: Request) -> int | None:
        """The tokens of ``request``'s prompt on this endpoint (``None``: no known context, or
        an API without /tokenize)."""
        context = self.context_tokens()
        prefix = (
            self.prompt_prefix(request)
            if context is not None and self.endpoint.api == "completions"
            else None
        )
        count = self._count_body(self._body(request, prefix, None)[1], None, context)
        return None if count is None else self.sync_transport.post_json(self._tokenize_url(), count)["count"]

    async def aprompt_tokens(self, request: Request) -> int | None:
        context = await self.acontext_tokens()
        prefix = (
            await self.aprompt_prefix(request)
            if context is not None and self.endpoint.api == "completions"
            else None
        )
        count = self._count_body(self._body(request, prefix, None)[1], None, context)
        return (
            None if count is None else (await self.transport.post_json(self._tokenize_url(), count))["count"]
        )

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

    def _trim_limit(self, body: dict[str, Any]) -> int | None:
        return body[self.endpoint.max_tokens_param] if self.endpoint.api == "chat-instruct" else None

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

    def generate(
        self, request: Request, on_text: OnText | None = None, watch: Watch | None = None
    ) -> Generation:
        """One continuation; with ``on_text`` it streams and ``on_text`` gets each text delta.

        ``watch`` (with ``request.logprobs``) sees each token and may cut the reply before one:
        a stream stops there (the connection is closed), a whole reply is cut after the fact.
        """
        prefix = self.prompt_prefix(request) if self.endpoint.api == "completions" else None
        call_ids = self.call_token_ids() if self._needs_call_ids(request) else None
        api, body = self._body(request, prefix, call_ids)
        room = self._fit(body, request.max_tokens)
        if room == 0:
            return _no_room()
        url, transport = self._url(api), self.sync_transport
        if self._whole(request, on_text):
            collector = _Collector(None, watch, room)
            for attempt in Retrying(**self._retry_args()):
                with attempt:
                    reply = transport.post_json(url, self._unstreamed(body))
            collector.add(reply)
            return collector.result()
        collector = _Collector(self._trim_limit(body), watch, room)
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

    async def agenerate(
        self, request: Request, on_text: OnText | None = None, watch: Watch | None = None
    ) -> Generation:
        """Async :meth:`generate`."""
        prefix = await self.aprompt_prefix(request) if self.endpoint.api == "completions" else None
        call_ids = await self.acall_token_ids() if self._needs_call_ids(request) else None
        api, body = self._body(request, prefix, call_ids)
        room = await self._afit(body, request.max_tokens)
        if room == 0:
            return _no_room()
        url, transport = self._url(api), self.transport
        if self._whole(request, on_text):
            collector = _Collector(None, watch, room)
            async for attempt in AsyncRetrying(**self._retry_args()):
                with attempt:
                    reply = await transport.post_json(url, self._unstreamed(body))
            collector.add(reply)
            return collector.result()
        collector = _Collector(self._trim_limit(body), watch, room)
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


_CLIENTS: dict[str, EndpointClient] = {}


def client_for(endpoint: Endpoint) -> EndpointClient:
    """The shared client of an endpoint: every graph on the same endpoint reuses its pool."""
    key = digest(endpoint)
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS[key] = EndpointClient(endpoint)
    return client


def _no_room() -> Generation:
    """The reply of a request the context has no room for: none, ended by the context."""
    return Generation(
        text="",
        finish_reason="length",
        stop_reason=None,
        prompt_tokens=0,
        completion_tokens=0,
        context_room=0,
    )


def _emit(delta: str, on_text: OnText | None) -> None:
    if delta and on_text is not None:
        on_text(delta)
