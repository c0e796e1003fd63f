"""Fault injection: HTTP errors, hangs, dropped connections and malformed bodies, queued per
model or placed in a script, that a request gets instead of (or in the middle of) its answer."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .wire import error_response

FAULTS = ("hang", "drop", "malformed")
_TRANSPORT_KEY = "scripted.transport"
#: The status logged for a request whose client is gone (nginx's "client closed request").
_CLIENT_GONE = 499


def check_fault(fault: Any) -> str:
    """``fault`` as a fault name; ValueError for anything else."""
    fault = str(fault)
    if fault in FAULTS or (fault.isdigit() and 400 <= int(fault) <= 599):
        return fault
    raise ValueError(f"unknown fault {fault!r}: use an HTTP status 4xx/5xx, hang, drop, malformed")


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
    fault: str, request: Request, *, stream: bool, record: dict[str, Any]
) -> Response | None:
    """The response a fault gives instead of an answer; ``None`` for a dropped stream, which
    sends its first tokens before the connection goes. ``record`` is the request's log entry."""
    if fault.isdigit():
        return error_response(f"scripted fault {fault}", int(fault))
    if fault == "hang":
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        record["disconnected"] = True
        return Response(status_code=_CLIENT_GONE)  # never reaches the (gone) client
    if fault == "malformed":
        if stream:
            return StreamingResponse(
                iter(['data: {"id": "cmpl-malformed", "choi\n\n', "data: [DONE]\n\n"]),
                media_type="text/event-stream",
            )
        return Response(b'{"id": "cmpl-malformed", "choices": [', media_type="application/json")
    if stream:
        return None
    await drop_connection(request.scope)
    return Response(status_code=_CLIENT_GONE)
