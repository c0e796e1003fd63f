"""The I/O edge: one pooled client per endpoint, generations with retries.

Both paths post through :mod:`relay_agents.transport` (pooled httpx2 for sync, aiohttp for
async; the SDK's error types), and the async one costs a quarter of the SDK's CPU per request. A
generation is retried with tenacity only until its first chunk arrives: a stream is never
retried after its first token, because tokens would be emitted twice. The SDK's own retries
are off; a ``Retry-After`` the server sends is honoured as the SDK honours it.

Nothing an upstream sends is trusted: a reply is cut at its ``max_tokens`` whatever the server
does, its usage figures are used only when they are counts (else the tokens are counted here),
lone surrogates in its text become U+FFFD, a reply of the wrong shape is a :class:`StreamError`,
and a whole call, retries included, ends at the endpoint's ``call_deadline_s``.

A failure leaves a client as the exception it was (``except openai.NotFoundError`` still
works, the server maps it to its status), its message rewritten to name the endpoint's role and
URL and, for the common mistakes, what to do.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
    wait_exponential_jitter,
)

from relay_agents.core.answer import context_room
from relay_agents.core.config import Endpoint, digest
from relay_agents.core.protocol import CALL_CLOSE, CALL_OPEN
from relay_agents.core.result import Source
from relay_agents.core.types import Generation, Request, TokenLogprob
from relay_agents.prompts import ChatTemplate, instruct_messages, plain_tool_messages, template_messages
from relay_agents.transport import AsyncTransport, Deadline, DeadlineExceeded, SyncTransport

T = TypeVar("T")
OnText = Callable[[str], None]
#: Called with what a call had received when it is interrupted (cancelled, or its text's
#: consumer raised), so that its caller can charge the tokens that did arrive.
OnInterrupt = Callable[[Generation], None]
#: Called with each generated token (its index in the reply, its log-probabilities); True
#: cuts the reply just before that token and stops reading it.
Watch = Callable[[int, TokenLogprob], bool]
#: A request waiting for its batch: the request, its watch, and the future its reply is set on.
Queued = tuple[Request, Watch | None, "asyncio.Future[Generation]"]
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
#: The openai SDK honours a server's ``Retry-After`` only within this many seconds.
MAX_RETRY_AFTER_S = 60.0
_SURROGATE = re.compile("[\ud800-\udfff]")


def is_transient(exc: BaseException) -> bool:
    """429, 5xx, timeouts and connection errors are worth another try; nothing else is."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return False


def retry_after(exc: BaseException | None) -> float | None:
    """The seconds an error response asked to wait before the next try, read as the openai SDK
    reads them: ``retry-after-ms``, else ``Retry-After`` in seconds or as an HTTP date; None when
    there is none or it is outside (0, 60] s (the SDK's range)."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    seconds: float | None = None
    try:
        seconds = float(headers.get("retry-after-ms", "")) / 1000
    except ValueError:
        value = headers.get("retry-after", "")
        try:
            seconds = float(value)
        except ValueError:
            date = email.utils.parsedate_tz(value)
            seconds = None if date is None else email.utils.mktime_tz(date) - time.time()
    return seconds if seconds is not None and 0 < seconds <= MAX_RETRY_AFTER_S else None


class _WaitRetryAfter:
    """Tenacity wait: the server's ``Retry-After`` when it sent one, else ``fallback``."""

    def __init__(self, fallback: Callable[[RetryCallState], float]) -> None:
        self.fallback = fallback

    def __call__(self, state: RetryCallState) -> float:
        asked = retry_after(state.outcome.exception() if state.outcome is not None else None)
        return asked if asked is not None else self.fallback(state)


def clean_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD: JSON can carry them (``"\\ud800"``),
    UTF-8 cannot, so one would break every encoder after this point."""
    return _SURROGATE.sub("\ufffd", text)


def token_count(value: object) -> int | None:
    """An upstream's token count when it is one (an int >= 0); None: count the tokens here."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class StreamError(ValueError):
    """The server sent an error event or a reply of the wrong shape (in a stream or whole)."""


class TokenCountError(RuntimeError):
    """The server could not re-encode a reply's text (``token_count = "tokenizer"`` needs its
    ``/tokenize``). Not a stream error: the reply arrived, so its tokens are still charged."""


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
    """Accumulates one SSE stream (completions or chat chunks, as JSON), or one whole reply, into
    a :class:`Generation`, checking what the server sent.

    Chunks are read as plain dicts: building SDK models per token costs more than the
    rest of the relay loop together. Tokens are counted here, from log-probabilities or one per
    text chunk (vLLM sends a chunk per token), and the reply is cut before the first token past
    ``max_tokens``: a server that ignores it cannot write, or charge, more than was asked.
    """

    __slots__ = (
        "context_room",
        "cut",
        "done",
        "finish_reason",
        "max_tokens",
        "overran",
        "parts",
        "prompt_tokens",
        "received",
        "stop_at_max",
        "stop_reason",
        "tokens",
        "trimmed",
        "usage_tokens",
        "watch",
    )

    def __init__(
        self, max_tokens: int | None, watch: Watch | None = None, *, stop_at_max: bool = False
    ) -> None:
        self.max_tokens = max_tokens  # None: no cut (tests of the watch alone)
        self.context_room: int | None = None  # the request was cut to the context's room
        self.stop_at_max = stop_at_max  # chat-instruct: stop reading once max_tokens arrived
        self.watch = watch
        self.tokens = 0  # tokens kept (before a cut): log-probabilities, else one per text chunk
        self.received = 0  # tokens received in log-probabilities, a cut one included
        self.cut = False  # the watch cut the reply
        self.overran = False  # the server wrote past max_tokens: cut there
        self.trimmed = False  # nothing more is read (a cut, or max_tokens reached)
        self.done = False  # the stream's ``[DONE]`` arrived
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.prompt_tokens = 0
        self.usage_tokens: int | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add_line(self, line: str) -> str:
        """Take one SSE line; return the text it adds."""
        if not line.startswith("data:"):
            return ""  # blank lines, ``event:`` and keep-alive comments (``: ping``)
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return ""
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise StreamError(f"malformed JSON in the stream: {payload[:200]!r}") from None
        return self.add(chunk)

    def add(self, chunk: Any, *, whole: bool = False) -> str:
        """Take one chunk (or, ``whole``, a whole non-streamed response); return the text it adds."""
        if not isinstance(chunk, dict):
            raise StreamError(f"unexpected response: {str(chunk)[:200]}")
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise StreamError(f"error event in the stream: {message}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = token_count(usage.get("prompt_tokens")) or 0
            self.usage_tokens = token_count(usage.get("completion_tokens"))
        choices = chunk.get("choices", [])
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise StreamError(f"malformed reply: choices is {str(choices)[:200]}")
        if not choices:
            if whole:
                raise StreamError("malformed reply: no choices")
            return ""
        choice = choices[0]
        delta = choice.get("text")
        if delta is None:
            message = choice.get("delta") or choice.get("message") or {}
            delta = message.get("content") if isinstance(message, dict) else message
        if delta is not None and not isinstance(delta, str):
            raise StreamError(f"malformed reply: the text is {str(delta)[:200]}")
        if self.trimmed:
            return ""
        if choice.get("finish_reason") is not None:
            self.finish_reason = str(choice["finish_reason"])
            stop = choice.get("stop_reason")
            self.stop_reason = stop if isinstance(stop, str | int) else None
        delta = clean_text(delta or "")
        logprobs = choice.get("logprobs")
        if logprobs:
            delta = self._counted(delta, _checked_logprobs(logprobs))
        elif delta:
            delta = self._counted(delta, None)
        if delta:
            self.parts.append(delta)
        return delta

    def _counted(self, delta: str, tokens: list[TokenLogprob] | None) -> str:
        """Count this chunk's tokens, cut before the first one past ``max_tokens`` or the first
        the watch rejects, and return the text kept.

        The text kept is the chunk's text up to the cut token: the texts of the tokens before
        it, which start the chunk's text (vLLM, both formats). The tokens need not spell the
        whole text: a whole reply that ended on EOS lists the EOS token (``<|im_end|>``) that its
        text leaves out, and a stop string may end the text inside a token. Where the tokens
        before the cut do not start the text (undecodable bytes), the whole chunk is dropped,
        its tokens with it, so the token the watch rejected never shows.
        """
        limit = self.max_tokens
        if tokens is None:  # no log-probabilities: a text chunk is a token
            if limit is not None and self.tokens >= limit:
                self._stop(overran=True)
                return ""
            self.tokens += 1
            self._at_max()
            return delta
        self.received += len(tokens)
        for i, token in enumerate(tokens):
            if limit is not None and self.tokens + i >= limit:
                return self._cut_at(delta, tokens, i, overran=True)
            if self.watch is not None and self.watch(self.tokens + i, token):
                return self._cut_at(delta, tokens, i, overran=False)
        self.tokens += len(tokens)
        self._at_max()
        return delta

    def _cut_at(self, delta: str, tokens: list[TokenLogprob], i: int, *, overran: bool) -> str:
        self._stop(overran=overran)
        kept = "".join(t.token for t in tokens[:i])
        if not delta.startswith(kept):
            return ""
        self.tokens += i
        return kept

    def _stop(self, *, overran: bool) -> None:
        """Read no more: the server overran ``max_tokens`` (a cut at the limit, as ``length``)
        or the watch cut the reply (no finish reason: the answer goes on)."""
        self.trimmed = True
        self.overran, self.cut = overran, not overran
        self.finish_reason, self.stop_reason = ("length" if overran else None), None

    def _at_max(self) -> None:
        if self.stop_at_max and self.max_tokens is not None and self.tokens >= self.max_tokens:
            self.trimmed = True  # trimmed: stop reading (the connection is dropped)
            self.finish_reason = self.finish_reason or "length"

    def ended(self) -> None:
        """The stream's body ended: StreamError unless it said it was complete."""
        if not self.done and self.finish_reason is None:
            raise StreamError("the stream ended before its [DONE] (a truncated or non-SSE body)")

    def needs_count(self) -> bool:
        """Whether this whole reply's tokens must be counted here: it has text, no
        log-probabilities, and no usable count (or more than ``max_tokens``)."""
        if not self.parts or self.received:
            return False
        usage = self.usage_tokens
        return usage is None or (self.max_tokens is not None and usage > self.max_tokens)

    def counted(self, tokens: int, kept: str) -> None:
        """The tokenizer's count of this whole reply, and its text cut at ``max_tokens``."""
        self.usage_tokens = tokens
        if self.max_tokens is not None and tokens > self.max_tokens:
            self.parts = [kept]
            self.overran = True
            self.finish_reason, self.stop_reason = "length", None

    def fit(self, max_tokens: int, context_room: int | None) -> None:
        """The request was cut to ``max_tokens`` to fit the context (``context_room`` when cut)."""
        self.max_tokens = max_tokens
        self.context_room = context_room

    def result(self, error: Exception | None = None) -> Generation:
        # The server's own count when it gave a usable one (vLLM's counts the EOS token its
        # log-probabilities may list too), else the tokens seen here.
        generated = max(self.received, self.tokens) if self.usage_tokens is None else self.usage_tokens
        if self.max_tokens is not None:
            generated = min(generated, self.max_tokens)  # never more than was asked for
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


def _checked_logprobs(logprobs: object) -> list[TokenLogprob]:
    try:
        return parse_logprobs(logprobs)  # type: ignore[arg-type]
    except (AttributeError, TypeError) as exc:
        raise StreamError(f"malformed log-probabilities: {str(logprobs)[:200]}") from exc


def parse_logprobs(logprobs: dict[str, Any]) -> list[TokenLogprob]:
    """Tokens with their log-probabilities from a choice's ``logprobs``, in either format:
    completions (``tokens``, ``token_logprobs``, ``top_logprobs`` as dicts) or chat
    (``content: [{token, logprob, top_logprobs: [{token, logprob}]}]``)."""
    content = logprobs.get("content")
    if content is not None:
        return [
            TokenLogprob(
                clean_text(item.get("token") or ""),
                item.get("logprob"),
                tuple((alt.get("token") or "", alt.get("logprob")) for alt in item.get("top_logprobs") or ()),
            )
            for item in content
        ]
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return [
        TokenLogprob(clean_text(tok or ""), lp, tuple((top or {}).items()))
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
        self._context_tokens = endpoint.context_tokens
        self._context_read = endpoint.context_tokens is not None
        self._warned_context = False

    def close(self) -> None:
        self.sync_transport.close()

    async def aclose(self) -> None:
        self.close()
        await self.transport.aclose()

    # -- retries --------------------------------------------------------------------

    def _retry_args(self, deadline: Deadline, started: float | None = None) -> dict[str, Any]:
        """Tries: up to ``max_retries`` more, none starting past ``retry_deadline`` (a server's
        ``Retry-After`` included) nor waiting past the call's deadline."""
        ep = self.endpoint
        backoff = wait_exponential_jitter(
            multiplier=ep.retry_initial_delay, max=ep.retry_max_delay, jitter=ep.retry_initial_delay
        )
        return {
            "retry": retry_if_exception(is_transient),
            "stop": stop_any(
                stop_after_attempt(ep.max_retries + 1),
                stop_before_delay(ep.retry_deadline) if started is None else _stop_before(started, ep),
                lambda state: deadline.left() <= state.upcoming_sleep,
            ),
            "wait": _WaitRetryAfter(backoff),
            "reraise": True,
        }

    async def _atried(self, deadline: Deadline, send: Callable[[], Awaitable[T]]) -> T:
        """``send()``, retried as :meth:`_retry_args` says.

        The first try runs outside tenacity, whose set-up per call (it inspects each action it
        adds) was 15% of the client's CPU per request with 256 answers in flight; a first try
        that fails transiently is replayed as tenacity's first attempt, and the retry deadline
        counts from before it, so the retries, their waits and their limits are unchanged.
        """
        started = time.monotonic()
        try:
            return await send()
        except Exception as exc:
            if not is_transient(exc):
                raise
            failed: list[Exception] = [exc]

        async def again() -> T:
            if failed:
                raise failed.pop()
            return await send()

        async for attempt in AsyncRetrying(**self._retry_args(deadline, started)):
            with attempt:
                result = await again()
        return result

    # -- prompts --------------------------------------------------------------------

    def _root_url(self) -> str:
        base = self.endpoint.base_url
        return base[: -len("/v1")] if base.endswith("/v1") else base

    def _render_locally(self, request: Request) -> str | None:
        if self._template is None:
            return None
        return self._template.render(
            template_messages(request.messages),
            add_generation_prompt=True,
            enable_thinking=request.enable_thinking,
            tools=request.tools,
        )

    def _tokenize_body(self, request: Request) -> dict[str, Any]:
        return {
            "model": self.endpoint.model,
            "messages": request.messages,
            "add_generation_prompt": True,
            "chat_template_kwargs": {"enable_thinking": request.enable_thinking},
            **({"tools": request.tools} if request.tools else {}),
        }

    @staticmethod
    def _prompt_key(request: Request) -> str:
        return repr((request.messages, request.enable_thinking, request.tools))

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

    def _text_body(self, text: str) -> dict[str, Any]:
        return {"model": self.endpoint.model, "prompt": text, "add_special_tokens": False}

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
            tokenized = [post(f"{root}/tokenize", self._text_body(t))["tokens"] for t in CALL_TAGS]
            self._call_token_ids = self._tag_ids(tokenized)
        return self._call_token_ids

    async def acall_token_ids(self) -> list[int]:
        if self._call_token_ids is None:
            root = self._root_url()
            tokenized = [
                (await self.transport.post_json(f"{root}/tokenize", self._text_body(t)))["tokens"]
                for t in CALL_TAGS
            ]
            self._call_token_ids = self._tag_ids(tokenized)
        return self._call_token_ids

    # -- counting a reply's text ---------------------------------------------------------

    def _text_count(self, answer: Any) -> int:
        count = token_count(answer.get("count")) if isinstance(answer, dict) else None
        if count is None:
            raise ValueError(f"/tokenize answered {str(answer)[:200]}")
        return count

    def _count_failed(self, exc: Exception) -> TokenCountError:
        return TokenCountError(
            f"{self.role} endpoint {self.endpoint.base_url} (model {self.endpoint.model!r}): "
            f"token_count = 'tokenizer' re-encodes each reply with the server's /tokenize, which "
            f"failed: {exc}. Hint: use token_count = 'usage' with a server that has none"
        )

    def count_tokens(self, text: str) -> int:
        """The tokens of ``text`` re-encoded by the server's tokenizer, no special tokens added
        (so no EOS): the published evaluation's count. No text: 0, without a request."""
        if not text:
            return 0
        try:
            return self._text_count(
                self.sync_transport.post_json(self._tokenize_url(), self._text_body(text))
            )
        except STREAM_ERRORS as exc:
            raise self._count_failed(exc) from exc

    async def acount_tokens(self, text: str) -> int:
        if not text:
            return 0
        try:
            return self._text_count(
                await self.transport.post_json(self._tokenize_url(), self._text_body(text))
            )
        except STREAM_ERRORS as exc:
            raise self._count_failed(exc) from exc

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
            for attempt in Retrying(**self._retry_args(Deadline(self.endpoint.call_deadline_s))):
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
            async for attempt in AsyncRetrying(**self._retry_args(Deadline(self.endpoint.call_deadline_s))):
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
            "tools",
        )
        return {key: body[key] for key in keys if key in body}

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
            if request.tools:
                # rendered by the template, never parsed by the server: the relay parses the answer
                kwargs["tools"] = request.tools
                kwargs["tool_choice"] = "none"
            api = "chat"
        else:
            kwargs["messages"] = (
                instruct_messages(request.messages, request.answer, ep.instruct_template, request.tools)
                if request.answer
                else plain_tool_messages(request.messages)
            )
            api = "chat"
        return api, {**kwargs, **extra}

    def _url(self, api: str) -> str:
        return f"{self.endpoint.base_url}/{'completions' if api == 'completions' else 'chat/completions'}"

    def _needs_call_ids(self, request: Request) -> bool:
        return request.suppress_calls and self.endpoint.call_suppression == "logit_bias"

    def _collector(self, request: Request, watch: Watch | None) -> _Collector:
        return _Collector(request.max_tokens, watch, stop_at_max=self.endpoint.api == "chat-instruct")

    def _overrun(self, collector: _Collector, ids: Any) -> dict[str, Any] | None:
        """Apply the tokenizer's count of a whole reply; the ``/detokenize`` body of the text to
        keep when the reply has more tokens than ``max_tokens``."""
        if not isinstance(ids, list):
            raise StreamError(f"/tokenize answered {str(ids)[:200]}")
        limit = collector.max_tokens
        if limit is None or len(ids) <= limit:
            collector.counted(len(ids), collector.text)
            return None
        return {"model": self.endpoint.model, "tokens": ids[:limit]}

    def _uncountable(self, exc: Exception) -> StreamError:
        return StreamError(
            f"{self.endpoint.model}: the reply reported no usable token count and its tokens "
            f"could not be counted with the server's /tokenize: {exc}"
        )

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

    def _count(self, collector: _Collector, deadline: Deadline) -> None:
        """Count a whole reply's tokens with the server's tokenizer, cutting it at ``max_tokens``:
        only for a reply without a usable count, or with more tokens than were asked for."""
        post, root = self.sync_transport.post_json, self._root_url()
        try:
            ids = post(f"{root}/tokenize", self._text_body(collector.text), deadline).get("tokens")
            cut = self._overrun(collector, ids)
            if cut is not None:
                kept = post(f"{root}/detokenize", cut, deadline)["prompt"]
                collector.counted(len(ids), clean_text(str(kept)))
        except (openai.APIError, ValueError, KeyError, AttributeError) as exc:
            raise self._uncountable(exc) from exc

    async def _acount(self, collector: _Collector) -> None:
        post, root = self.transport.post_json, self._root_url()
        try:
            ids = (await post(f"{root}/tokenize", self._text_body(collector.text))).get("tokens")
            cut = self._overrun(collector, ids)
            if cut is not None:
                kept = (await post(f"{root}/detokenize", cut))["prompt"]
                collector.counted(len(ids), clean_text(str(kept)))
        except (openai.APIError, ValueError, KeyError, AttributeError) as exc:
            raise self._uncountable(exc) from exc

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
        With ``request.count_with_tokenizer`` the reply's text is also re-encoded
        (``Generation.text_tokens``); a count that fails raises :class:`TokenCountError`.
        A failure (raised, or a stream's ``error``) names the role, the URL and a hint.
        The call ends at the endpoint's ``call_deadline_s``: the text of a stream so far comes
        back with a :class:`DeadlineExceeded` error, a call without text raises it. (This sync
        path checks the deadline as bytes arrive and bounds each read by what is left of it.)
        """
        collector = self._collector(request, watch)
        try:
            gen = self._generate(request, collector, on_text, Deadline(self.endpoint.call_deadline_s))
            if request.count_with_tokenizer:
                gen.text_tokens = self.count_tokens(gen.text)
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

    def _generate(
        self, request: Request, collector: _Collector, on_text: OnText | None, deadline: Deadline
    ) -> Generation:
        prefix = self.prompt_prefix(request) if self.endpoint.api == "completions" else None
        call_ids = self.call_token_ids() if self._needs_call_ids(request) else None
        api, body = self._body(request, prefix, call_ids)
        room = self._fit(body, request.max_tokens)
        if room == 0:
            return _no_room()
        collector.fit(body[self.endpoint.max_tokens_param], room)
        url, transport = self._url(api), self.sync_transport
        if self._whole(request, on_text):
            try:
                for attempt in Retrying(**self._retry_args(deadline)):
                    with attempt:
                        reply = transport.post_json(url, self._unstreamed(body), deadline)
            except ValueError as exc:
                raise StreamError(f"the reply is not JSON: {exc}") from exc
            collector.add(reply, whole=True)
            if collector.needs_count():
                self._count(collector, deadline)
            return collector.result()
        for attempt in Retrying(**self._retry_args(deadline)):
            with attempt:
                opened = transport.post(url, body, deadline)
                response = opened.__enter__()
                try:
                    lines = iter(transport.lines(response, url, deadline))
                    _emit(collector.add_line(next(lines, "")), on_text)
                except BaseException:
                    opened.__exit__(None, None, None)
                    raise
        try:
            if not collector.trimmed:
                for line in lines:
                    _emit(collector.add_line(line), on_text)
                    if collector.trimmed:
                        break
                else:
                    collector.ended()
        except STREAM_ERRORS as exc:
            return collector.result(error=exc)
        finally:
            opened.__exit__(None, None, None)
        return collector.result()

    async def agenerate(
        self,
        request: Request,
        on_text: OnText | None = None,
        watch: Watch | None = None,
        on_interrupt: OnInterrupt | None = None,
    ) -> Generation:
        """Async :meth:`generate`: a cancelled call hands what had arrived to ``on_interrupt``;
        the deadline cuts any wait, a silent server's included."""
        deadline = Deadline(self.endpoint.call_deadline_s)
        collector = self._collector(request, watch)
        try:
            try:
                async with asyncio.timeout(deadline.left()) as scope:
                    gen = await self._agenerate(request, on_text, collector, deadline)
            except TimeoutError:
                if not scope.expired():
                    raise
                error = DeadlineExceeded(self.endpoint.base_url, self.endpoint.call_deadline_s)
                if not collector.parts:
                    raise error from None
                gen = collector.result(error=error)
            if request.count_with_tokenizer:
                gen.text_tokens = await self.acount_tokens(gen.text)
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

    async def _aprepared(self, request: Request) -> tuple[str, dict[str, Any], int | None]:
        """(API, JSON body, context room) of ``request``: its prompt rendered, its max_tokens
        cut to the context (room 0: no request can be sent)."""
        prefix = await self.aprompt_prefix(request) if self.endpoint.api == "completions" else None
        call_ids = await self.acall_token_ids() if self._needs_call_ids(request) else None
        api, body = self._body(request, prefix, call_ids)
        return api, body, await self._afit(body, request.max_tokens)

    async def _agenerate(
        self, request: Request, on_text: OnText | None, collector: _Collector, deadline: Deadline
    ) -> Generation:
        api, body, room = await self._aprepared(request)
        if room == 0:
            return _no_room()
        collector.fit(body[self.endpoint.max_tokens_param], room)
        url, transport = self._url(api), self.transport
        if self._whole(request, on_text):
            try:
                reply = await self._atried(deadline, lambda: transport.post_json(url, self._unstreamed(body)))
            except ValueError as exc:
                raise StreamError(f"the reply is not JSON: {exc}") from exc
            collector.add(reply, whole=True)
            if collector.needs_count():
                await self._acount(collector)
            return collector.result()
        async for attempt in AsyncRetrying(**self._retry_args(deadline)):
            with attempt:
                opened = transport.post(url, body)
                response = await opened.__aenter__()
                try:
                    lines = aiter(transport.lines(response, url))
                    _emit(collector.add_line(await anext(lines, "")), on_text)
                except BaseException:
                    await opened.__aexit__(None, None, None)
                    raise
        try:
            if not collector.trimmed:
                async for line in lines:
                    _emit(collector.add_line(line), on_text)
                    if collector.trimmed:
                        break
                else:
                    collector.ended()
        except STREAM_ERRORS as exc:
            return collector.result(error=exc)
        finally:
            await opened.__aexit__(None, None, None)
        return collector.result()

    async def asample(self, request: Request, n: int) -> list[Sample]:
        """``n`` whole replies to one request in one call (the API's ``n``): the prompt is sent
        and prefilled once for all of them, where ``n`` separate calls would send it ``n`` times.
        Each reply is checked as a single one is; an API without ``n`` answers one reply, which
        is a :class:`StreamError` here (sample it with ``n=1`` calls instead)."""
        deadline = Deadline(self.endpoint.call_deadline_s)
        try:
            prefix = await self.aprompt_prefix(request) if self.endpoint.api == "completions" else None
            api, body = self._body(request, prefix, None)
            room = await self._afit(body, request.max_tokens)
            if room == 0:
                return [Sample("", "length") for _ in range(n)]
            async for attempt in AsyncRetrying(**self._retry_args(deadline)):
                with attempt:
                    reply = await self.transport.post_json(self._url(api), {**self._unstreamed(body), "n": n})
            choices = reply.get("choices") if isinstance(reply, dict) else None
            if not isinstance(choices, list) or len(choices) != n:
                got = len(choices) if isinstance(choices, list) else choices
                raise StreamError(f"asked for {n} replies (n={n}), got {str(got)[:200]}")
            return [self._sample(request, body, room, choice) for choice in choices]
        except STREAM_ERRORS as exc:
            served = await self._aserved() if model_missing(exc) else None
            explain_failure(exc, self.endpoint, self.role, served)
            raise

    def _sample(self, request: Request, body: dict[str, Any], room: int | None, choice: Any) -> Sample:
        collector = self._collector(request, None)
        collector.fit(body[self.endpoint.max_tokens_param], room)
        collector.add({"choices": [choice]}, whole=True)
        return Sample(collector.text, collector.finish_reason)

    # -- many requests in one --------------------------------------------------------------

    async def agenerate_batch(
        self,
        requests: Sequence[Request],
        watches: Sequence[Watch | None],
        done: Sequence[asyncio.Future[Generation]],
    ) -> None:
        """Whole replies to ``requests``, each set on its future in ``done`` (an error is set as
        the future's exception).

        On the completions API the requests whose bodies differ only in their prompt go out as
        ONE whole (not streamed) request with a list of prompts: vLLM runs them in the same
        engine steps and answers a choice per prompt. vLLM's ``return_token_ids`` gives each
        choice's own token counts (the usage sums them); a server without it has each choice's
        text counted with its ``/tokenize``, as a whole reply without usage is. Each reply is
        the same as :meth:`agenerate`'s whole reply: the same collector checks it and cuts it at
        its ``max_tokens``. Not streamed because a stream of many prompts cost vLLM's API server
        more CPU than it saved: 88 against 124 answers/s on the tiny pair (docs/benchmarks.md).
        A chat API cannot take a list, and a single request needs none: each goes alone, all at
        once. A list request that fails (after its retries) with an error status or a malformed
        reply is sent again prompt by prompt, so that one prompt's error is its answer's alone;
        one that cannot reach the server fails every answer in it.
        """
        items = list(zip(requests, watches, done, strict=True))
        if self.endpoint.api != "completions" or len(items) == 1:
            await self._aalone(items)
            return
        groups: dict[str, list[_Batched]] = {}
        prepared = await asyncio.gather(
            *(self._aprepared(request) for request in requests), return_exceptions=True
        )
        for (request, watch, future), ready in zip(items, prepared, strict=True):
            if isinstance(ready, BaseException):
                future.set_exception(await self._explained(ready))
                continue
            _, body, room = ready
            if room == 0:
                future.set_result(_no_room())
                continue
            collector = self._collector(request, watch)
            collector.fit(body[self.endpoint.max_tokens_param], room)
            key = json.dumps({k: v for k, v in body.items() if k != "prompt"}, sort_keys=True)
            groups.setdefault(key, []).append(_Batched(request, watch, future, body, collector))
        await asyncio.gather(*(self._agroup(group) for group in groups.values()))

    async def _aalone(self, items: Sequence[Queued]) -> None:
        """Each request sent alone (:meth:`agenerate`), all at once."""
        await asyncio.gather(*(_settled(future, self.agenerate(r, None, w)) for r, w, future in items))

    async def _agroup(self, group: list[_Batched]) -> None:
        """One whole completions request for ``group``'s prompts (see :meth:`agenerate_batch`)."""
        if len(group) == 1:
            await self._aalone([(group[0].request, group[0].watch, group[0].future)])
            return
        body = {
            **self._unstreamed(group[0].body),
            "prompt": [item.body["prompt"] for item in group],
            "return_token_ids": True,  # vLLM: each choice's prompt and completion token ids
        }
        url, transport = self._url("completions"), self.transport
        deadline = Deadline(self.endpoint.call_deadline_s)
        try:
            async with asyncio.timeout(deadline.left()):
                reply = await self._atried(deadline, lambda: transport.post_json(url, body))
                choices = reply.get("choices") if isinstance(reply, dict) else None
                if not isinstance(choices, list) or len(choices) != len(group):
                    got = len(choices) if isinstance(choices, list) else str(reply)[:200]
                    raise StreamError(f"asked for {len(group)} replies (a list of prompts), got {got}")
                await asyncio.gather(*(self._achoice(group[choice["index"]], choice) for choice in choices))
        except TimeoutError:
            expired = DeadlineExceeded(self.endpoint.base_url, self.endpoint.call_deadline_s)
            for item in group:
                if not item.future.done():
                    item.future.set_exception(expired)
        except openai.APIConnectionError as exc:  # the server, not a prompt: alone would fail too
            error = await self._explained(exc)
            for item in group:
                if not item.future.done():
                    item.future.set_exception(error)
        except (*STREAM_ERRORS, LookupError, TypeError):  # perhaps one prompt's: each alone
            await self._aalone([(i.request, i.watch, i.future) for i in group if not i.future.done()])

    async def _achoice(self, item: _Batched, choice: dict[str, Any]) -> None:
        """Set one choice of a batched reply on its future, counted as a whole reply is."""
        collector, future = item.collector, item.future
        try:
            collector.add({"choices": [choice], "usage": _choice_usage(choice)}, whole=True)
            if collector.needs_count():
                await self._acount(collector)
            gen = collector.result()
            if item.request.count_with_tokenizer:
                gen.text_tokens = await self.acount_tokens(gen.text)
        except TokenCountError as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():  # its answer may have been cancelled
            future.set_result(gen)

    async def _explained(self, exc: BaseException) -> BaseException:
        if isinstance(exc, STREAM_ERRORS):
            served = await self._aserved() if model_missing(exc) else None
            explain_failure(exc, self.endpoint, self.role, served)
        return exc


def _stop_before(started: float, endpoint: Endpoint) -> Callable[[RetryCallState], bool]:
    """Tenacity's ``stop_before_delay(endpoint.retry_deadline)``, counted from ``started``."""

    def stop(state: RetryCallState) -> bool:
        return time.monotonic() - started + (state.upcoming_sleep or 0) >= endpoint.retry_deadline

    return stop


@dataclass(slots=True)
class _Batched:
    """One request of a list request: what it asked, its body and collector, its future."""

    request: Request
    watch: Watch | None
    future: asyncio.Future[Generation]
    body: dict[str, Any]
    collector: _Collector


def _choice_usage(choice: dict[str, Any]) -> dict[str, int] | None:
    """A batched choice's own usage from its token ids (vLLM's ``return_token_ids``), None
    when the server sent none."""
    prompt, completion = choice.get("prompt_token_ids"), choice.get("token_ids")
    if not isinstance(prompt, list) or not isinstance(completion, list):
        return None
    return {"prompt_tokens": len(prompt), "completion_tokens": len(completion)}


async def _settled(future: asyncio.Future[Generation], generation: Awaitable[Generation]) -> None:
    """Set ``future`` to what ``generation`` returns or raises."""
    try:
        future.set_result(await generation)
    except Exception as exc:  # handed to the answer that asked, as its own call would raise it
        future.set_exception(exc)


@dataclass(frozen=True, slots=True)
class Sample:
    """One of the ``n`` replies of :meth:`EndpointClient.asample`: its text and why it ended
    (no token count: the usage of such a call sums all ``n`` replies)."""

    text: str
    finish_reason: str | None


#: Seconds a replica that could not be reached goes to the back of every conversation's order.
REPLICA_DOWN_S = 10.0


def affinity_key(request: Request) -> str:
    """What keeps a conversation on one replica: its id (``Request.affinity``: the relay's
    conversation id or thread), else its messages up to its first user message, which keep
    the requests of one answer together (a shared system prompt alone would send every
    conversation to one replica). Every relay host ranks the replicas alike for one key."""
    if request.affinity is not None:
        return f"id:{request.affinity}"
    opening: list[Any] = []
    for message in request.messages:
        opening.append((message.get("role"), message.get("content")))
        if message.get("role") == "user":
            break
    return repr(opening)


def _rendezvous_score(key: str, url: str) -> bytes:
    """The replica's weight for ``key`` (highest random weight): a sort on a 64-bit blake2b,
    two lines, where a hashing package (uhashring and the like) would be a dependency for them."""
    return hashlib.blake2b(f"{url}\n{key}".encode(), digest_size=8).digest()


class ReplicatedClient:
    """An endpoint served by several replicas (``Endpoint.replica_urls``), one
    :class:`EndpointClient` each. A request goes to the replica its conversation ranks first
    (rendezvous hashing, so adding or losing a replica moves only the conversations that
    ranked it first); when that one cannot be reached (a connection error after its own
    retries) the request goes to the next, and the unreachable replica is tried last for
    :data:`REPLICA_DOWN_S`. A stream that breaks after its first text is not moved: its text
    has been shown and paid for."""

    def __init__(self, endpoint: Endpoint, role: Source) -> None:
        self.endpoint = endpoint
        self.role = role
        urls = (endpoint.base_url, *endpoint.replica_urls)
        self.replicas = {
            url: EndpointClient(endpoint.model_copy(update={"base_url": url, "replica_urls": ()}), role)
            for url in dict.fromkeys(urls)
        }
        self._down_until: dict[str, float] = {}

    def order(self, request: Request | None) -> list[EndpointClient]:
        """The replicas in the order ``request``'s conversation tries them (``None``: as configured)."""
        urls = list(self.replicas)
        if request is not None:
            key = affinity_key(request)
            urls.sort(key=lambda url: _rendezvous_score(key, url), reverse=True)
        now = time.monotonic()
        urls.sort(key=lambda url: self._down_until.get(url, 0.0) > now)  # stable: up ones first
        return [self.replicas[url] for url in urls]

    def _failed(self, client: EndpointClient) -> None:
        self._down_until[client.endpoint.base_url] = time.monotonic() + REPLICA_DOWN_S

    def close(self) -> None:
        for client in self.replicas.values():
            client.close()

    async def aclose(self) -> None:
        for client in self.replicas.values():
            await client.aclose()

    def generate(
        self,
        request: Request,
        on_text: OnText | None = None,
        watch: Watch | None = None,
        on_interrupt: OnInterrupt | None = None,
    ) -> Generation:
        *first, final = self.order(request)
        for client in first:
            try:
                return client.generate(request, on_text, watch, on_interrupt)
            except openai.APIConnectionError:
                self._failed(client)
        return final.generate(request, on_text, watch, on_interrupt)

    async def agenerate(
        self,
        request: Request,
        on_text: OnText | None = None,
        watch: Watch | None = None,
        on_interrupt: OnInterrupt | None = None,
    ) -> Generation:
        *first, final = self.order(request)
        for client in first:
            try:
                return await client.agenerate(request, on_text, watch, on_interrupt)
            except openai.APIConnectionError:
                self._failed(client)
        return await final.agenerate(request, on_text, watch, on_interrupt)

    async def agenerate_batch(
        self,
        requests: Sequence[Request],
        watches: Sequence[Watch | None],
        done: Sequence[asyncio.Future[Generation]],
    ) -> None:
        """:meth:`EndpointClient.agenerate_batch` per replica, each request on the replica its
        conversation ranks first; a request whose replica cannot be reached fails over alone
        (through :meth:`agenerate`)."""
        groups: dict[str, list[tuple[Request, Watch | None, asyncio.Future[Generation]]]] = {}
        for item in zip(requests, watches, done, strict=True):
            groups.setdefault(self.order(item[0])[0].endpoint.base_url, []).append(item)
        await asyncio.gather(*(self._abatch_on(self.replicas[url], group) for url, group in groups.items()))

    async def _abatch_on(
        self, client: EndpointClient, group: list[tuple[Request, Watch | None, asyncio.Future[Generation]]]
    ) -> None:
        loop = asyncio.get_running_loop()
        tried: list[asyncio.Future[Generation]] = [loop.create_future() for _ in group]
        await client.agenerate_batch([r for r, _, _ in group], [w for _, w, _ in group], tried)
        for (request, watch, future), result in zip(group, tried, strict=True):
            if future.done():  # its answer was cancelled
                continue
            error = result.exception()
            if isinstance(error, openai.APIConnectionError):
                self._failed(client)
                await _settled(future, self.agenerate(request, None, watch))
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(result.result())

    def context_tokens(self) -> int | None:
        return self.order(None)[0].context_tokens()

    async def acontext_tokens(self) -> int | None:
        return await self.order(None)[0].acontext_tokens()

    def prompt_tokens(self, request: Request) -> int | None:
        return self.order(request)[0].prompt_tokens(request)

    async def aprompt_tokens(self, request: Request) -> int | None:
        return await self.order(request)[0].aprompt_tokens(request)


#: What talks to an endpoint: one server, or its replicas.
Client = EndpointClient | ReplicatedClient

_CLIENTS: dict[tuple[Source, str], Client] = {}


def client_for(endpoint: Endpoint, role: Source) -> Client:
    """The shared client of an endpoint in a role: every graph on the same endpoint reuses its pool."""
    key = (role, digest(endpoint))
    client = _CLIENTS.get(key)
    if client is None:
        replicated = bool(endpoint.replica_urls)
        client = _CLIENTS[key] = (ReplicatedClient if replicated else EndpointClient)(endpoint, role)
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
