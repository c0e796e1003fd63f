"""How uvicorn listens for the relay server: its timeouts, its connection limit, and a header
deadline that uvicorn lacks.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but only once a
response has been sent: a connection that sends nothing, or half a request line, or headers
one byte at a time, is kept open for as long as the client likes (measured: 45 s and more,
which is how slowloris clients exhaust a server). :class:`HeaderDeadlineProtocol` closes a
connection whose request headers are not complete ``header_timeout_s`` after it opened or after
the first byte of its next request. Request bodies have their own deadline in the app
(``ServerSettings.body_timeout_s``), where a 408 can be answered.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

if TYPE_CHECKING:  # this module loads in each worker before its health checks: uvicorn only
    from relay_agents.server.settings import ServerSettings


class HeaderDeadlineProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol (httptools, else h11) with a deadline on request headers."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm()  # the first byte of a request starts its clock; later bytes do not
        super().data_received(data)
        if not self._between_requests():
            self._disarm()  # the headers are in: the request is the app's now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self.header_deadline is None:
            self.header_deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _expire(self) -> None:
        self.header_deadline = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.close()


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """The ``uvicorn.Config`` keywords that bound what one client can hold open."""
    return {
        "http": functools.partial(HeaderDeadlineProtocol, header_timeout_s=settings.header_timeout_s),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.max_connections,
    }
