"""Relaying without LangGraph: one answer (``arelay``'s usual path) or many together (the batch
executor, its requests sent in batches).

Each answer runs the graph's own nodes (:class:`relay_agents.graph.RelayNodes`: the same plan,
budget holds and settles, and pure state machine), one coroutine per answer, without LangGraph:
its per-step bookkeeping is most of the client's CPU per answer (measured in
docs/benchmarks.md). The nodes' model requests go to a :class:`BatchedClient` per endpoint,
which sends whatever is queued as one request with a list of prompts
(:meth:`relay_agents.clients.EndpointClient.agenerate_batch`) a few milliseconds after the first
one queued. A reply is handed back as soon as its own choice ends, so an answer goes on (to its
teacher call, its next turn, or out) without waiting for the rest of its batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, convert_to_messages
from langchain_core.runnables.config import var_child_runnable_config
from langsmith.utils import tracing_is_enabled

from relay_agents.budgets import BudgetStore
from relay_agents.clients import Client, OnInterrupt, OnText, Watch, client_for
from relay_agents.core.answer import route
from relay_agents.core.config import RelayConfig
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


class BatchedClient:
    """An endpoint client whose async requests are queued and sent in batches.

    ``window_s`` after the first request of a batch is queued, everything queued goes out
    together; batches overlap (a new one does not wait for the one in flight), so a request
    never waits for another answer's reply. The sync ``generate`` sends alone.
    """

    def __init__(self, client: Client, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.client = client
        self.window_s = window_s
        self._queued: list[tuple[Request, Watch | None, asyncio.Future[Generation]]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.batches = 0  # requests sent (each with one prompt or more)

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
        """The whole reply to ``request``, sent with the others queued in the same window."""
        if on_text is not None:  # a reader of tokens as they come needs its own stream
            return await self.client.agenerate(request, on_text, watch, on_interrupt)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Generation] = loop.create_future()
        self._queued.append((request, watch, future))
        if self._flush is None:
            self._flush = loop.call_later(self.window_s, self._send)
        return await future

    def _send(self) -> None:
        batch, self._queued, self._flush = self._queued, [], None
        batch = [item for item in batch if not item[2].done()]  # a cancelled answer's request
        if not batch:
            return
        self.batches += 1
        requests, watches, futures = (list(column) for column in zip(*batch, strict=True))
        task = asyncio.get_running_loop().create_task(self._sent(requests, watches, futures))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def cancel(self) -> None:
        """Close the requests still in flight (their answers are gone)."""
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
        self.student = BatchedClient(client_for(config.student, "student"), window_s)
        self.teacher = BatchedClient(client_for(config.teacher, "teacher"), window_s)
        self.nodes = RelayNodes(
            config, budget_store, student_client=self.student, teacher_client=self.teacher
        )

    async def answer(self, messages: list[Any], context: RelayContext) -> AIMessage:
        return await run_answer(self.nodes, messages, context)

    async def run(
        self,
        questions: Sequence[list[Any]],
        contexts: Sequence[RelayContext],
        *,
        return_exceptions: bool = False,
    ) -> list[AIMessage | BaseException]:
        """The replies to ``questions``, in order. An answer that fails cancels the others and
        raises, unless ``return_exceptions`` (its exception then takes its place)."""
        runs = [run_answer(self.nodes, q, c) for q, c in zip(questions, contexts, strict=True)]
        try:
            if return_exceptions:
                return list(await asyncio.gather(*runs, return_exceptions=True))
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(run) for run in runs]
            return [task.result() for task in tasks]
        finally:  # after a failure or a cancellation, no request goes on for nobody
            self.student.cancel()
            self.teacher.cancel()


def _unread(delta: dict[str, str]) -> None:
    """Where the text of an answer goes as it is settled when nobody reads it (its result
    holds it all)."""
