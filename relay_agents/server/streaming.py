"""Running one relay answer for one HTTP request, and stopping it when the client leaves.

The relay runs in a task of its own (a LangGraph stream must be iterated by the task that
started it), pushing deltas into a queue. A watcher reads the ASGI ``receive`` channel;
when the client disconnects it cancels that task, which closes the upstream requests in
flight, so an abandoned answer stops costing model time at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay_agents.api import RelayDelta, RelayResult, RelayStream


@dataclass(slots=True)
class End:
    """The last item of a run: the result, or the exception that ended it."""

    result: RelayResult | None = None
    error: BaseException | None = None


GONE = object()
"""Queued by the watcher when the client disconnected."""

Item = RelayDelta | End | object


class RelayRun:
    """One streamed relay answer running in its own task."""

    def __init__(self, stream: RelayStream) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.started = time.perf_counter()
        self.first_text_at: float | None = None
        self.task = asyncio.create_task(self._run(stream))

    def _put(self, delta: RelayDelta) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        self.queue.put_nowait(delta)

    async def _run(self, stream: RelayStream) -> None:
        try:
            result = await stream.run(self._put)
        except Exception as exc:
            self.queue.put_nowait(End(error=exc))
        else:
            self.queue.put_nowait(End(result=result))

    async def get(self) -> list[Item]:
        """The next items: waits for one, then takes whatever else is already queued."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    def abandon(self) -> None:
        """Cancel the relay (and its upstream requests); wake whoever waits on the queue."""
        self.task.cancel()
        self.queue.put_nowait(GONE)


class DisconnectWatcher:
    """Calls ``on_gone`` once if the client disconnects before :meth:`stop`."""

    def __init__(self, receive: Receive, on_gone: Callable[[], None]) -> None:
        self.gone = False
        self._on_gone = on_gone
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._on_gone()

    def stop(self) -> None:
        self._task.cancel()


async def until_disconnect(receive: Receive, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Await ``work`` in a task, cancelling it if the client disconnects: ``(gone, result)``."""
    task = asyncio.ensure_future(work)
    watcher = DisconnectWatcher(receive, task.cancel)
    try:
        return False, await task
    except asyncio.CancelledError:
        if watcher.gone:
            return True, None
        task.cancel()  # we were cancelled ourselves (shutdown): stop the work too
        raise
    finally:
        watcher.stop()


class RelayStreamResponse(Response):
    """Streams an answer that already produced its first items, as server-sent events.

    ``render(items)`` turns queued items into SSE text and says whether the stream ended;
    ``on_close(gone)`` runs once, after the last byte or after the client left.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        run: RelayRun,
        watcher: DisconnectWatcher,
        first: list[Item],
        render: Callable[[list[Item]], tuple[str, bool]],
        on_close: Callable[[bool], None],
    ) -> None:
        # No Response.__init__: it would set Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.run = run
        self.watcher = watcher
        self.first = first
        self.render = render
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = ended = False
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            items = self.first
            while True:
                if any(item is GONE for item in items):
                    gone = True
                    break
                text, ended = self.render(items)
                await send({"type": "http.response.body", "body": text.encode(), "more_body": not ended})
                if ended:
                    break
                items = await self.run.get()
        except OSError:  # the transport failed under us: same as a disconnect
            gone = True
        finally:
            self.watcher.stop()
            if not ended:
                self.run.abandon()
                gone = True
            self.on_close(gone)
