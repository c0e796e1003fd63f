"""Fault injection: what a misbehaving upstream does instead of (or to) its answer, queued per
model or placed in a script.

A fault is a name, optionally with an argument after a colon:

* ``"429"`` … ``"599"`` (and 4xx): that HTTP error; ``"429:retry-after=2"`` or
  ``"503:retry-after-ms=200"`` adds the ``Retry-After`` / ``retry-after-ms`` header;
* ``"hang"``: no byte, ever (until the client leaves);
* ``"drop"``: a stream sends its first tokens, then the connection closes; a whole reply closes
  it before any byte;
* ``"drip:S"``: the answer arrives slowly: a token (stream) or a few bytes of the body (whole
  reply) every ``S`` seconds (default 1);
* ``"comments:S"``: only SSE comments (``: ping``) on a stream, only whitespace in a whole reply,
  every ``S`` seconds (default 0.1), never an answer;
* ``"overrun"``: ``max_tokens`` is ignored (the whole scripted text is written);
* ``"malformed"``: the JSON of the body (or of a chunk) is cut short;
* ``"bad-usage"`` / ``"negative-usage"``: ``usage.completion_tokens`` is ``"seven"`` / ``-1000``;
* ``"null-choices"``: ``choices`` is ``null`` in the body (every chunk of a stream);
* ``"html"``: a 200 with an HTML page for a body (a proxy's error page);
* ``"surrogate"``: a lone surrogate (``\\ud800``, escaped in the JSON) in the first token's text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .wire import error_response

#: Faults that replace the answer, and faults that change it (see the module's docstring).
REPLACING = ("hang", "drop", "malformed", "comments", "null-choices", "html")
ALTERING = ("drip", "overrun", "bad-usage", "negative-usage", "surrogate")
FAULTS = REPLACING + ALTERING
_WITH_ARGUMENT = ("drip", "comments")
_DEFAULT_INTERVAL_S = {"drip": 1.0, "comments": 0.1}
_RETRY_HEADERS = ("retry-after", "retry-after-ms")
_TRANSPORT_KEY = "scripted.transport"
#: The status logged for a request whose client is gone (nginx's "client closed request").
_CLIENT_GONE = 499
#: Bytes of a whole body sent per interval by the ``drip`` fault.
DRIP_BYTES = 16
#: ``usage.completion_tokens`` as the usage faults report it.
BAD_USAGE: dict[str, Any] = {"bad-usage": "seven", "negative-usage": -1000}
LONE_SURROGATE = "\ud800"
HTML_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>\n"


@dataclass(frozen=True)
class Fault:
    """A parsed fault: its name, its interval (``drip``, ``comments``) or its status and headers."""

    name: str
    interval_s: float = 0.0
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()


def parse_fault(fault: Any) -> Fault:
    """``fault`` parsed; ValueError for anything else."""
    text = str(fault)
    name, _, arg = text.partition(":")
    if name.isdigit() and 400 <= int(name) <= 599:
        headers: list[tuple[str, str]] = []
        if arg:
            header, _, value = arg.partition("=")
            if header not in _RETRY_HEADERS or not value:
                raise ValueError(
                    f"fault {text!r}: the argument of a status is retry-after=S or retry-after-ms=MS"
                )
            headers.append((header, value))
        return Fault(name, status=int(name), headers=tuple(headers))
    if name not in FAULTS or (arg and name not in _WITH_ARGUMENT):
        raise ValueError(
            f"unknown fault {text!r}: use an HTTP status 4xx/5xx (with :retry-after=S or "
            f":retry-after-ms=MS), {', '.join(FAULTS)} (drip:S and comments:S take an interval)"
        )
    interval = _DEFAULT_INTERVAL_S.get(name, 0.0)
    if arg:
        interval = float(arg)
        if not 0 < interval <= 60:
            raise ValueError(f"fault {text!r}: the interval must be in (0, 60] seconds")
    return Fault(name, interval_s=interval)


def check_fault(fault: Any) -> str:
    """``fault`` as a fault string (checked); ValueError for anything else."""
    parse_fault(fault)
    return str(fault)


class TransportMiddleware:
    """Outermost ASGI wrapper: remembers the connection's transport so that the "drop" fault
    can close it for real (uvicorn's send callable is a bound method of its request cycle)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope[_TRANSPORT_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        await self.app(scope, receive, send)


async def drop_connection(scope: dict[str, Any]) -> None:
    """Close the request's TCP connection without an answer (or mid-stream)."""
    transport = scope.get(_TRANSPORT_KEY)
    if transport is None:
        raise RuntimeError("scripted drop: no transport to close")  # uvicorn then aborts/500s
    transport.close()
    for _ in range(3):  # let uvicorn see connection_lost, so later sends are no-ops
        await asyncio.sleep(0)


async def fault_response(
    fault: Fault, request: Request, *, stream: bool, record: dict[str, Any]
) -> Response | None:
    """The response a replacing fault gives instead of an answer; ``None`` when the answer is
    made as usual (an altering fault, or a dropped stream, which sends its first tokens before
    the connection goes). ``record`` is the request's log entry."""
    if fault.status is not None:
        response = error_response(f"scripted fault {fault.status}", fault.status)
        response.headers.update(dict(fault.headers))
        return response
    if fault.name == "hang":
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        record["disconnected"] = True
        return Response(status_code=_CLIENT_GONE)  # never reaches the (gone) client
    if fault.name == "malformed":
        if stream:
            return StreamingResponse(
                iter(['data: {"id": "cmpl-malformed", "choi\n\n', "data: [DONE]\n\n"]),
                media_type="text/event-stream",
            )
        return Response(b'{"id": "cmpl-malformed", "choices": [', media_type="application/json")
    if fault.name == "comments":
        ping = ": ping\n\n" if stream else " "
        media = "text/event-stream" if stream else "application/json"
        return StreamingResponse(_forever(ping, fault.interval_s, record), media_type=media)
    if fault.name == "html":
        return Response(HTML_PAGE, media_type="text/html")
    if fault.name != "drop" or stream:
        return None
    await drop_connection(request.scope)
    return Response(status_code=_CLIENT_GONE)


async def _forever(text: str, interval_s: float, record: dict[str, Any]) -> AsyncIterator[str]:
    try:
        while True:
            yield text
            await asyncio.sleep(interval_s)
    except asyncio.CancelledError:  # the client left
        record["disconnected"] = True
        raise


def tamper(fault: Fault | None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """How ``fault`` changes each JSON payload of an answer (a body, or a stream's chunks)."""
    if fault is None:
        return _unchanged
    if fault.name in BAD_USAGE:
        value = BAD_USAGE[fault.name]

        def bad_usage(payload: dict[str, Any]) -> dict[str, Any]:
            if isinstance(payload.get("usage"), dict):
                payload["usage"] = {**payload["usage"], "completion_tokens": value}
            return payload

        return bad_usage
    if fault.name == "null-choices":
        return lambda payload: {**payload, "choices": None}
    return _unchanged


def _unchanged(payload: dict[str, Any]) -> dict[str, Any]:
    return payload


def whole_body(payload: dict[str, Any], fault: Fault | None, record: dict[str, Any]) -> Response:
    """A whole reply's body: escaped to ASCII (a lone surrogate cannot be UTF-8), dripped slowly
    when ``fault`` says so."""
    body = json.dumps(payload).encode()
    if fault is None or fault.name != "drip":
        return Response(body, media_type="application/json")
    pieces = [body[i : i + DRIP_BYTES] for i in range(0, len(body), DRIP_BYTES)]
    return StreamingResponse(_dripped(pieces, fault.interval_s, record), media_type="application/json")


async def _dripped(pieces: list[bytes], interval_s: float, record: dict[str, Any]) -> AsyncIterator[bytes]:
    try:
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(interval_s)
            yield piece
    except asyncio.CancelledError:
        record["disconnected"] = True
        raise
