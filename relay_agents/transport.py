"""HTTP to one endpoint, sync and async, with one error mapping: the SDK's error types.

Both transports have the same operations (``post_json`` and ``get_json``, ``post`` for an open
2xx response, ``lines`` of a streamed body) and raise the same exceptions, so the client's code
above them is written once. The async one is a pooled aiohttp session per event loop; the
sync one a pooled ``httpx2.Client`` (the HTTP library the openai SDK itself uses).

The openai SDK builds every request through httpx models, auth hooks and a type-walk of its
arguments: about 0.47 ms of CPU per request, against 0.11 ms for the same POST on aiohttp
(``benchmarks/transport.py``). A relay answer makes several requests, and at 64 concurrent
conversations that CPU was the difference between meeting and missing the scaling target, so
the async path posts its JSON here. Failures are raised as exactly what the SDK raises
(:class:`openai.APIStatusError` subclasses, :class:`openai.APIConnectionError`,
:class:`openai.APITimeoutError`), so callers cannot tell the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp
import httpx2
import openai

#: The SDK's own pool limits (``openai._constants.DEFAULT_CONNECTION_LIMITS``, httpx's 5 s
#: keep-alive, which is also uvicorn's and so vLLM's).
MAX_CONNECTIONS = 1000
KEEPALIVE_S = 5.0
#: Room for one SSE line (a chunk with many top log-probabilities runs long).
READ_BUFFER = 2**20

_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def status_error(status: int, content: bytes, headers: Mapping[str, str], url: str) -> openai.APIStatusError:
    """The SDK's exception for an error response, with the SDK's message and ``body``."""
    text = content.decode("utf-8", "replace").strip()
    message = f"Error code: {status}"
    body: object = text
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        error = body.get("error", body) if isinstance(body, dict) else None
        detail = error.get("message") if isinstance(error, dict) else None
        if isinstance(detail, str) and detail:
            message += f" - {detail}"
    data = body.get("error", body) if isinstance(body, dict) else body
    response = httpx2.Response(
        status, headers=dict(headers), content=content, request=httpx2.Request("POST", url)
    )
    kind = _STATUS_ERRORS.get(status, openai.InternalServerError if status >= 500 else openai.APIStatusError)
    return kind(message, response=response, body=data)


def connection_error(exc: BaseException, url: str) -> openai.APIConnectionError:
    """A transport failure as the SDK reports it: a timeout, or a connection error."""
    request = httpx2.Request("POST", url)
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError | httpx2.TimeoutException):
        return openai.APITimeoutError(request)
    return openai.APIConnectionError(
        message=f"Connection error: {exc}" if str(exc) else "Connection error.", request=request
    )


#: What a request or a stream raises before :func:`connection_error` names it.
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)
SYNC_TRANSPORT_ERRORS = (httpx2.TransportError,)


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": "relay-agents"}


class SyncTransport:
    """POSTs JSON to one endpoint from any thread; one pooled client, made on first use."""

    def __init__(self, api_key: str, *, timeout: float, connect_timeout: float) -> None:
        self._api_key = api_key
        self._timeout = httpx2.Timeout(timeout, connect=connect_timeout)
        self._client: httpx2.Client | None = None
        self._lock = threading.Lock()

    def _session(self) -> httpx2.Client:
        with self._lock:
            if self._client is None:
                limits = httpx2.Limits(max_connections=MAX_CONNECTIONS, keepalive_expiry=KEEPALIVE_S)
                headers = _headers(self._api_key)
                self._client = httpx2.Client(headers=headers, timeout=self._timeout, limits=limits)
            return self._client

    def post_json(self, url: str, body: dict[str, Any]) -> Any:
        """The decoded JSON answer to one POST (a non-JSON answer raises ``ValueError``)."""
        return self._json("POST", url, body)

    def get_json(self, url: str) -> Any:
        """The decoded JSON answer to one GET (a non-JSON answer raises ``ValueError``)."""
        return self._json("GET", url, None)

    def _json(self, method: str, url: str, body: dict[str, Any] | None) -> Any:
        with self._open(method, url, body) as response:
            try:
                content = response.read()
            except SYNC_TRANSPORT_ERRORS as exc:
                raise connection_error(exc, url) from exc
        return json.loads(content)

    def post(self, url: str, body: dict[str, Any]) -> contextlib.AbstractContextManager[httpx2.Response]:
        """An open response with a 2xx status; its body is read (or streamed) by the caller."""
        return self._open("POST", url, body)

    @contextlib.contextmanager
    def _open(self, method: str, url: str, body: dict[str, Any] | None) -> Iterator[httpx2.Response]:
        try:
            opened = self._session().stream(method, url, json=body)
            response = opened.__enter__()
        except SYNC_TRANSPORT_ERRORS as exc:
            raise connection_error(exc, url) from exc
        try:
            if response.status_code >= 400:
                try:
                    content = response.read()
                except SYNC_TRANSPORT_ERRORS as exc:
                    raise connection_error(exc, url) from exc
                raise status_error(response.status_code, content, response.headers, url)
            yield response
        finally:
            opened.__exit__(None, None, None)

    def lines(self, response: httpx2.Response, url: str) -> Iterator[str]:
        """The lines of a streamed (SSE) body, as text."""
        try:
            yield from response.iter_lines()
        except SYNC_TRANSPORT_ERRORS as exc:
            raise connection_error(exc, url) from exc

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class AsyncTransport:
    """POSTs JSON to one endpoint; one connection pool per event loop, closed with its loop."""

    def __init__(self, api_key: str, *, timeout: float, connect_timeout: float) -> None:
        self._headers = _headers(api_key)
        # ``timeout`` bounds each read (a stream's next chunk), as httpx's read timeout does.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=timeout)
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
            weakref.WeakKeyDictionary()
        )
        self._shutdown_hooks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncGenerator[None]] = (
            weakref.WeakKeyDictionary()
        )

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_S)
            session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, timeout=self._timeout, read_bufsize=READ_BUFFER
            )
            self._sessions[loop] = session
            self._shutdown_hooks[loop] = _close_at_loop_shutdown(session)
        return session

    async def post_json(self, url: str, body: dict[str, Any]) -> Any:
        """The decoded JSON answer to one POST (a non-JSON answer raises ``ValueError``)."""
        return await self._json("POST", url, body)

    async def get_json(self, url: str) -> Any:
        """The decoded JSON answer to one GET (a non-JSON answer raises ``ValueError``)."""
        return await self._json("GET", url, None)

    async def _json(self, method: str, url: str, body: dict[str, Any] | None) -> Any:
        async with self._open(method, url, body) as response:
            try:
                content = await response.read()
            except TRANSPORT_ERRORS as exc:
                raise connection_error(exc, url) from exc
        return json.loads(content)

    def post(
        self, url: str, body: dict[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """An open response with a 2xx status; its body is read (or streamed) by the caller."""
        return self._open("POST", url, body)

    @contextlib.asynccontextmanager
    async def _open(
        self, method: str, url: str, body: dict[str, Any] | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            response = await self._session().request(method, url, json=body)
        except TRANSPORT_ERRORS as exc:
            raise connection_error(exc, url) from exc
        try:
            if response.status >= 400:
                try:
                    content = await response.read()
                except TRANSPORT_ERRORS as exc:
                    raise connection_error(exc, url) from exc
                raise status_error(response.status, content, response.headers, url)
            yield response
        finally:
            response.release()

    async def lines(self, response: aiohttp.ClientResponse, url: str) -> AsyncIterator[str]:
        """The lines of a streamed (SSE) body, as text."""
        try:
            async for line in response.content:
                yield line.decode()
        except TRANSPORT_ERRORS as exc:
            raise connection_error(exc, url) from exc

    async def aclose(self) -> None:
        with contextlib.suppress(RuntimeError):
            session = self._sessions.pop(asyncio.get_running_loop(), None)
            if session is not None:
                await session.close()


def _close_at_loop_shutdown(session: aiohttp.ClientSession) -> AsyncGenerator[None]:
    """Close ``session`` inside its event loop when the loop shuts down.

    A loop has no close hook, but ``asyncio.run`` (and ``asyncio.Runner``, uvicorn,
    pytest-asyncio) finalize the loop's live async generators before closing it: this one's
    ``finally`` then closes the session, so no socket or session leaks. The caller keeps the
    generator alive (the loop only holds it weakly).
    """

    async def hook() -> AsyncGenerator[None]:
        try:
            yield
        finally:
            await session.close()

    agen = hook()
    step = agen.__anext__()  # registers the generator with the running loop
    with contextlib.suppress(StopIteration):
        step.send(None)  # run it to its ``yield``
    return agen
