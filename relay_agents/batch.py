"""Relaying without LangGraph: one answer (``arelay``'s usual path) or many together (the batch
executor, its requests sent in batches).

Each answer runs the graph's own nodes (:class:`relay_agents.graph.RelayNodes`: the same plan,
budget holds and settles, and pure state machine), one coroutine per answer, without LangGraph:
its per-step bookkeeping is most of the client's CPU per answer (measured in
docs/benchmarks.md). The nodes' model requests go to a :class:`BatchedClient` per endpoint,
which sends whatever is queued as one request with a list of prompts
(:meth:`relay_agents.clients.EndpointClient.agenerate_batch`) when its :class:`Batcher` says:
once every running answer waits for a reply, or a few milliseconds after the first request
queued. Batches overlap: an answer goes on (to its teacher call, its next turn, or out) as soon
as its own batch is back, without waiting for any other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, convert_to_messages
from langchain_core.runnables.config import var_child_runnable_config
from langsmith.utils import tracing_is_enabled

from relay_agents.budgets import BudgetStore
from relay_agents.clients import Client, OnInterrupt, OnText, Watch, client_for
from relay_agents.core.answer import route
from relay_agents.core.config import RelayConfig, digest
from relay_agents.core.types import Generation, Request
from relay_agents.graph import RelayContext, RelayNodes, RelayState

#: How long a batch waits, after its first request is queued, for more to join it.
DEFAULT_WINDOW_S = 0.002


def in_langchain_run() -> bool:
    """Whether a run here belongs to LangChain: called inside a runnable (a LangGraph node, a
    chain: the graph inherits its config, thread and callbacks) or with tracing on. Such a run
    goes through the graph, so that it is traced and configured as before."""
    return var_child_runnable_config.get() is not None or bool(tracing_is_enabled())


async def run_answer(nodes: RelayNodes, messages: list[Any], context: RelayContext) -> AIMessage:
    """One answer: the student and teacher steps, as the graph routes them, until it ends."""
    if context.on_delta is None:  # no LangGraph stream to write to
        context = dataclasses.replace(context, on_delta=_unread)
    run = nodes.run_scope(context)
    state: RelayState = {"messages": convert_to_messages(messages)}
    while True:
        answer = state.get("answer")
        if answer is not None and route(answer) == "teacher":
            update = await nodes.ateacher(state, run)
        else:
            update = await nodes.astudent(state, run)
        if "messages" in update:  # the step that ends the answer writes the reply
            reply: AIMessage = update["messages"][-1]
            return reply
        state = {**state, **update}


class Batcher:
    """When the queued requests of a set of answers go out: as soon as every answer running
    here waits for a model reply (no request could still join the batch), else ``window_s``
    after the batch's first request was queued (an answer busy with something else, such as
    its budget store, holds the others back no longer).

    With the whole replies of :meth:`relay_agents.clients.EndpointClient.agenerate_batch`, the
    answers whose requests went out together come back together and send their next requests
    in the same moment, so answers in step (the same turn lengths) go out as one request per
    turn, as in a barrier loop, and answers out of step never wait for each other's turn.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = window_s
        self.clients: list[BatchedClient] = []
        self.live = 0  # answers running here
        self.waiting = 0  # of them, those waiting for a model reply
        self._timer: asyncio.TimerHandle | None = None
        self._soon = False

    def client(self, client: Client) -> BatchedClient:
        """``client``'s requests queued here."""
        batched = BatchedClient(client, self)
        self.clients.append(batched)
        return batched

    async def answer(self, nodes: RelayNodes, messages: list[Any], context: RelayContext) -> AIMessage:
        """:func:`run_answer`, counted among the answers running here."""
        self.live += 1
        try:
            return await run_answer(nodes, messages, context)
        finally:
            self.live -= 1
            self._ready()

    def queued(self) -> None:
        self.waiting += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self.flush)
        self._ready()

    def answered(self) -> None:
        self.waiting -= 1

    def _ready(self) -> None:
        """Flush once the running step is done when nothing else could join the batch."""
        if self.waiting >= self.live and self._timer is not None and not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send every client's queued requests."""
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for client in self.clients:
            client.send()

    def cancel(self) -> None:
        """Close the requests still in flight (their answers are gone)."""
        for client in self.clients:
            client.cancel()


class BatchedClient:
    """An endpoint client whose async requests are queued and sent in batches when its
    :class:`Batcher` says; batches overlap (a new one does not wait for the one in flight),
    so a request never waits for another answer's reply. The sync ``generate`` sends alone."""

    def __init__(self, client: Client, batcher: Batcher) -> None:
        self.client = client
        self.batcher = batcher
        self._queued: list[tuple[Request, Watch | None, asyncio.Future[Generation]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def generate(
        self,
        request: Request,
        on_text: OnText | None = None,
        watch: Watch | None = None,
        on_interrupt: OnInterrupt | None = None,
    ) -> Generation:
        return self.client.generate(request, on_text, watch, on_interrupt)

    async def agenerate(
        self,
        request: Request,
        on_text: OnText | None = None,
        watch: Watch | None = None,
        on_interrupt: OnInterrupt | None = None,
    ) -> Generation:
        """The whole reply to ``request``, sent with the others queued in the same batch."""
        if on_text is not None:  # a reader of tokens as they come needs its own stream
            return await self.client.agenerate(request, on_text, watch, on_interrupt)
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._queued.append((request, watch, future))
        self.batcher.queued()
        try:
            return await future
        finally:
            self.batcher.answered()

    def send(self) -> None:
        """Send what is queued as one batch."""
        batch, self._queued = self._queued, []
        batch = [item for item in batch if not item[2].done()]  # a cancelled answer's request
        if not batch:
            return
        requests, watches, futures = (list(column) for column in zip(*batch, strict=True))
        task = asyncio.get_running_loop().create_task(self._sent(requests, watches, futures))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

        def abandoned(done: asyncio.Future[Generation]) -> None:
            """Close the request once every answer it was for is cancelled."""
            if done.cancelled() and not task.done() and all(f.cancelled() for f in futures):
                task.cancel()

        for future in futures:
            future.add_done_callback(abandoned)

    def cancel(self) -> None:
        for task in list(self._sending):
            task.cancel()

    async def _sent(
        self, requests: list[Request], watches: list[Watch | None], futures: list[asyncio.Future[Generation]]
    ) -> None:
        try:
            await self.client.agenerate_batch(requests, watches, futures)
        except BaseException as exc:  # nothing may leave an answer waiting forever
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise


class BatchRelay:
    """Relays many answers under one config with batched requests (see the module's docstring)."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        budget_store: BudgetStore | None = None,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        self.batcher = Batcher(window_s)
        self.student = self.batcher.client(client_for(config.student, "student"))
        self.teacher = self.batcher.client(client_for(config.teacher, "teacher"))
        self.nodes = RelayNodes(
            config, budget_store, student_client=self.student, teacher_client=self.teacher
        )

    async def answer(self, messages: list[Any], context: RelayContext) -> AIMessage:
        """One answer, its requests batched with those of the others running at the moment."""
        return await self.batcher.answer(self.nodes, messages, context)

    async def run(
        self,
        questions: Sequence[list[Any]],
        contexts: Sequence[RelayContext],
        *,
        return_exceptions: bool = False,
    ) -> list[AIMessage | BaseException]:
        """The replies to ``questions``, in order. An answer that fails cancels the others and
        raises, unless ``return_exceptions`` (its exception then takes its place)."""
        runs = [self.answer(q, c) for q, c in zip(questions, contexts, strict=True)]
        try:
            if return_exceptions:
                return list(await asyncio.gather(*runs, return_exceptions=True))
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(run) for run in runs]
            return [task.result() for task in tasks]
        finally:  # after a failure or a cancellation, no request goes on for nobody
            self.batcher.cancel()


#: Batch executors kept per event loop, one per config, the least recently used dropped first.
SHARED_PER_LOOP = 64
_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, OrderedDict[str, BatchRelay]] = (
    weakref.WeakKeyDictionary()
)


def shared_batch_relay(config: RelayConfig) -> BatchRelay:
    """The batch executor that concurrent :func:`relay_agents.arelay` calls of one config share
    in the running event loop (budgets in the config's store, one per process): their
    requests are batched together, and a call running alone goes out at once. A dropped
    executor's answers in flight finish on it; new calls get a new one."""
    relays = _SHARED.setdefault(asyncio.get_running_loop(), OrderedDict())
    key = digest(config)
    relay = relays.get(key)
    if relay is None:
        relay = relays[key] = BatchRelay(config)
        if len(relays) > SHARED_PER_LOOP:
            relays.popitem(last=False)
    else:
        relays.move_to_end(key)
    return relay


def _unread(delta: dict[str, str]) -> None:
    """Where the text of an answer goes as it is settled when nobody reads it (its result
    holds it all)."""
