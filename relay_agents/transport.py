"""HTTP to one endpoint, sync and async, with one error mapping: the SDK's error types.

Both transports have the same four operations (``post_json``, ``post`` for an open 2xx
response, ``lines`` of a streamed body, ``get_json``) and raise the same exceptions, so the client's code
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
import errno
import json
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai

#: The SDK's own pool limit (``openai._constants.DEFAULT_CONNECTION_LIMITS``). Idle connections
#: are dropped after 4 s, under the 5 s keep-alive of uvicorn (so of vLLM): at an equal 5 s a
#: connection the server was closing was reused, and its request hung until the call's deadline
#: (the fault matrix's Retry-After case, about 3 runs in 4).
MAX_CONNECTIONS = 1000
KEEPALIVE_S = 4.0
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


def connection_error(
    exc: BaseException, url: str, deadline: Deadline | None = None
) -> openai.APIConnectionError:
    """A transport failure as the SDK reports it: a timeout (the call's deadline, when it has
    passed), or a connection error."""
    if deadline is not None and deadline.left() <= 0:
        return DeadlineExceeded(url)
    request = httpx2.Request("POST", url)
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError | httpx2.TimeoutException):
        return openai.APITimeoutError(request)
    if _refused(exc):  # said the same way by both libraries (aiohttp's own words name ssl:default)
        return openai.APIConnectionError(
            message=f"Connection error: {urlsplit(url).netloc} refused the connection", request=request
        )
    return openai.APIConnectionError(
        message=f"Connection error: {exc}" if str(exc) else "Connection error.", request=request
    )


def _refused(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a refused connection: nothing listens there."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Deadline:
    """The end of one call's time, retries included, on the monotonic clock."""

    __slots__ = ("at",)

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, url: str) -> None:
        if self.left() <= 0:
            raise DeadlineExceeded(url)


class DeadlineExceeded(openai.APITimeoutError):
    """A call ran past its endpoint's ``call_deadline_s`` (a timeout, as the SDK names one)."""

    def __init__(self, url: str, seconds: float | None = None) -> None:
        limit = "" if seconds is None else f" of {seconds:g} s"
        openai.APIConnectionError.__init__(
            self,
            message=f"the call ran past its deadline{limit} (call_deadline_s)",
            request=httpx2.Request("POST", url),
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
        self._read_s, self._connect_s = timeout, connect_timeout
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

    def post_json(self, url: str, body: dict[str, Any], deadline: Deadline | None = None) -> Any:
        """The decoded JSON answer to one POST (a non-JSON answer raises ``ValueError``)."""
        with self.post(url, body, deadline) as response:
            pieces = []
            try:
                for piece in response.iter_bytes():
                    if deadline is not None:
                        deadline.check(url)
                    pieces.append(piece)
            except SYNC_TRANSPORT_ERRORS as exc:
                raise connection_error(exc, url, deadline) from exc
        return json.loads(b"".join(pieces))

    def get_json(self, url: str) -> Any:
        """The decoded JSON answer to one GET (the server's ``/models``)."""
        try:
            response = self._session().get(url)
        except SYNC_TRANSPORT_ERRORS as exc:
            raise connection_error(exc, url) from exc
        if response.status_code >= 400:
            raise status_error(response.status_code, response.content, response.headers, url)
        return response.json()

    @contextlib.contextmanager
    def post(
        self, url: str, body: dict[str, Any], deadline: Deadline | None = None
    ) -> Iterator[httpx2.Response]:
        """An open response with a 2xx status; its body is read (or streamed) by the caller.

        With ``deadline``, each read waits at most what is left of it."""
        timeout = self._timeout
        if deadline is not None:
            deadline.check(url)
            left = deadline.left()
            timeout = httpx2.Timeout(min(self._read_s, left), connect=min(self._connect_s, left))
        try:
            opened = self._session().stream("POST", url, json=body, timeout=timeout)
            response = opened.__enter__()
        except SYNC_TRANSPORT_ERRORS as exc:
            raise connection_error(exc, url, deadline) from exc
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

    def lines(self, response: httpx2.Response, url: str, deadline: Deadline | None = None) -> Iterator[str]:
        """The lines of a streamed (SSE) body, as text (checked against ``deadline`` as they come)."""
        try:
            for line in response.iter_lines():
                if deadline is not None:
                    deadline.check(url)
                yield line
        except SYNC_TRANSPORT_ERRORS as exc:
            raise connection_error(exc, url, deadline) from exc

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
        async with self.post(url, body) as response:
            try:
                content = await response.read()
            except TRANSPORT_ERRORS as exc:
                raise connection_error(exc, url) from exc
        return json.loads(content)

    async def get_json(self, url: str) -> Any:
        """The decoded JSON answer to one GET (the server's ``/models``)."""
        try:
            async with self._session().get(url) as response:
                content = await response.read()
        except TRANSPORT_ERRORS as exc:
            raise connection_error(exc, url) from exc
        if response.status >= 400:
            raise status_error(response.status, content, response.headers, url)
        return json.loads(content)

    @contextlib.asynccontextmanager
    async def post(self, url: str, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open response with a 2xx status; its body is read (or streamed) by the caller."""
        try:
            response = await self._session().post(url, json=body)
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
                yield line.decode(errors="replace")  # as httpx decodes: bad bytes become U+FFFD
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
