"""The Python API: ``relay``, ``arelay``, ``astream_relay``, ``stream_relay``, and the batch
path ``abatch_relay`` / ``batch_relay``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph.state import CompiledStateGraph
from pydantic import BaseModel

from relay_agents.batch import DEFAULT_WINDOW_S, BatchRelay, in_langchain_run, shared_batch_relay
from relay_agents.budgets import BudgetStore
from relay_agents.core.config import RelayConfig
from relay_agents.core.result import BudgetState, RelayEvent, RelayRecord, RelayUsage, Source, Span
from relay_agents.graph import (
    RelayContext,
    ThreadedDeltas,
    build_relay_graph,
    drain_deltas,
    shared_relay_graph,
)
from relay_agents.prompts import Message

__all__ = [
    "BudgetState",
    "RelayDelta",
    "RelayEvent",
    "RelayResult",
    "RelayStream",
    "RelayUsage",
    "Span",
    "abatch_relay",
    "arelay",
    "astream_relay",
    "batch_relay",
    "relay",
    "stream_relay",
]


class RelayResult(RelayRecord):
    """One relayed answer: its text, the relay's account of it, and the reply message."""

    text: str
    message: AIMessage

    @classmethod
    def from_message(cls, message: AIMessage) -> RelayResult:
        return cls.model_validate(
            {**message.response_metadata["relay"], "text": message.text, "message": message}
        )


class RelayDelta(BaseModel):
    """A piece of streamed answer text and the model that wrote it."""

    text: str
    source: Source


Question = str | Sequence[BaseMessage | Message]


def _graph(config: RelayConfig, checkpointer: BaseCheckpointSaver | None) -> CompiledStateGraph:
    if checkpointer is not None:
        return build_relay_graph(config, checkpointer=checkpointer)
    return shared_relay_graph(config)


def _inputs(question: Question) -> dict[str, Any]:
    if isinstance(question, str):
        return {"messages": [{"role": "user", "content": question}]}
    return {"messages": list(question)}


def _run_config(thread_id: str | None, checkpointer: BaseCheckpointSaver | None) -> dict[str, Any]:
    if checkpointer is None:
        return {}
    return {"configurable": {"thread_id": thread_id or str(uuid.uuid4())}}


def relay(
    question: Question,
    config: RelayConfig,
    *,
    conversation_id: str | None = None,
    user: str | None = None,
    checkpointer: BaseCheckpointSaver | None = None,
    thread_id: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> RelayResult:
    """Relay one answer (blocking); see :func:`arelay`."""
    graph = _graph(config, checkpointer)
    context = RelayContext(stream_tokens=False, conversation_id=conversation_id, user=user, tools=tools)
    state = graph.invoke(_inputs(question), _run_config(thread_id, checkpointer), context=context)
    return RelayResult.from_message(state["messages"][-1])


async def arelay(
    question: Question,
    config: RelayConfig,
    *,
    conversation_id: str | None = None,
    user: str | None = None,
    checkpointer: BaseCheckpointSaver | None = None,
    thread_id: str | None = None,
    on_delta: Callable[[RelayDelta], None] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> RelayResult:
    """Relay one answer.

    ``conversation_id`` keys the conversation's budget (``config.budget``) in the budget
    store, so it holds across calls and processes; ``user`` keys a pool shared by all that
    user's conversations (``config.user_budget``). With ``checkpointer``, the conversation
    key defaults to ``thread_id``. ``on_delta`` sees the answer's text as each model reply is
    settled (whole replies, not tokens), so a caller knows what an answer that fails half-way
    has already cost. ``tools`` (OpenAI tool definitions) are shown to both models through their
    chat templates; the answer's text holds any calls, in the student's format, unparsed.

    Without a checkpointer, outside a LangChain run and without tracing, the graph's nodes run
    directly, without LangGraph, whose bookkeeping per step was half the client's CPU per
    answer, and the requests of ``arelay`` calls running at the same time in this event loop go
    out together (:func:`relay_agents.batch.shared_batch_relay`): at 256 concurrent calls on the
    tiny pair, 79 -> 142 answers/s and 1.84 -> 0.36 ms of client CPU per answer
    (docs/benchmarks.md). The answer is the same.
    """
    sink = None if on_delta is None else _delta_sink(on_delta)
    context = RelayContext(
        stream_tokens=False, conversation_id=conversation_id, user=user, on_delta=sink, tools=tools
    )
    if checkpointer is None and not in_langchain_run():
        reply = await shared_batch_relay(config).answer(_inputs(question)["messages"], context)
        return RelayResult.from_message(reply)
    graph = _graph(config, checkpointer)
    state = await graph.ainvoke(_inputs(question), _run_config(thread_id, checkpointer), context=context)
    return RelayResult.from_message(state["messages"][-1])


def _delta_sink(on_delta: Callable[[RelayDelta], None]) -> Callable[[dict[str, str]], None]:
    """``on_delta`` as ``RelayContext.on_delta``, which the nodes call with plain dicts."""

    def sink(delta: dict[str, str]) -> None:
        on_delta(RelayDelta.model_construct(text=delta["text"], source=delta["source"]))

    return sink


class RelayStream:
    """Async iterator of :class:`RelayDelta`; ``result`` is set once it is exhausted."""

    def __init__(
        self,
        graph: CompiledStateGraph,
        inputs: dict[str, Any],
        run_config: dict[str, Any],
        context: RelayContext,
    ) -> None:
        self._graph = graph
        self._inputs = inputs
        self._config = run_config
        self._context = context
        self.result: RelayResult | None = None

    async def run(self, on_delta: Callable[[RelayDelta], None]) -> RelayResult:
        """Run the answer, handing each delta to ``on_delta`` as it is produced; sets ``result``.

        The deltas go straight from the graph's nodes to ``on_delta``
        (``RelayContext.on_delta``) rather than through LangGraph's ``custom`` stream mode,
        which wakes the event loop with a thread-safe call and a waiter task for every token
        (measured: 1.95 -> 1.71 ms of CPU for a one-request streamed answer in process, 2.7 ->
        2.2 ms in the server).
        """

        context = dataclasses.replace(self._context, on_delta=_delta_sink(on_delta))
        state = await self._graph.ainvoke(self._inputs, self._config, context=context)
        self.result = RelayResult.from_message(state["messages"][-1])
        return self.result

    async def __aiter__(self) -> AsyncIterator[RelayDelta]:
        deltas: asyncio.Queue[RelayDelta | None] = asyncio.Queue()
        run = asyncio.ensure_future(self.run(deltas.put_nowait))
        async with contextlib.aclosing(drain_deltas(run, deltas)) as stream:  # leaving cancels the run
            async for delta in stream:
                yield delta

    def __iter__(self) -> Iterator[RelayDelta]:
        def run(on_delta: Callable[[dict[str, str]], None]) -> dict[str, Any]:
            context = dataclasses.replace(self._context, on_delta=on_delta)
            return self._graph.invoke(self._inputs, self._config, context=context)

        deltas = ThreadedDeltas(run)
        for delta in deltas:
            yield RelayDelta.model_construct(text=delta["text"], source=delta["source"])
        assert deltas.result is not None
        self.result = RelayResult.from_message(deltas.result["messages"][-1])


def astream_relay(
    question: Question,
    config: RelayConfig,
    *,
    conversation_id: str | None = None,
    user: str | None = None,
    checkpointer: BaseCheckpointSaver | None = None,
    thread_id: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> RelayStream:
    """Stream an answer as the models write it: ``async for delta in astream_relay(...)``.

    The keywords are :func:`arelay`'s.
    """
    return RelayStream(
        _graph(config, checkpointer),
        _inputs(question),
        _run_config(thread_id, checkpointer),
        RelayContext(conversation_id=conversation_id, user=user, tools=tools),
    )


stream_relay = astream_relay
"""The same stream, iterated synchronously: ``for delta in stream_relay(...)``."""


async def abatch_relay(
    questions: Sequence[Question],
    config: RelayConfig,
    *,
    conversation_ids: Sequence[str | None] | None = None,
    users: Sequence[str | None] | None = None,
    budget_store: BudgetStore | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    return_exceptions: bool = False,
) -> list[RelayResult | BaseException]:
    """Relay many answers at once, for offline work (evaluation, data generation, rollouts).

    Each answer is the one :func:`arelay` gives, but the requests of all answers ready at the
    same moment go to each model together: on the completions API, one request with a list of
    prompts per batch (a chat API takes them one by one, all at once), sent once every running
    answer waits for a reply. Batches overlap: an answer goes on as soon as its own batch is
    back, never waiting for another batch. ``conversation_ids`` and ``users``
    (one per question, or None) key the budgets in the budget store as in :func:`arelay`; holds
    and settles go through the store call by call. An answer that fails cancels the others and
    raises its error, unless ``return_exceptions`` (the error then takes its place in the list).
    """
    n = len(questions)
    conversations = list(conversation_ids) if conversation_ids is not None else [None] * n
    owners = list(users) if users is not None else [None] * n
    if len(conversations) != n or len(owners) != n:
        raise ValueError("conversation_ids and users need one entry per question")
    contexts = [
        RelayContext(stream_tokens=False, conversation_id=c, user=u)
        for c, u in zip(conversations, owners, strict=True)
    ]
    executor = BatchRelay(config, budget_store=budget_store, window_s=window_s)
    try:
        replies = await executor.run(
            [_inputs(q)["messages"] for q in questions], contexts, return_exceptions=return_exceptions
        )
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return [r if isinstance(r, BaseException) else RelayResult.from_message(r) for r in replies]


def batch_relay(
    questions: Sequence[Question],
    config: RelayConfig,
    *,
    conversation_ids: Sequence[str | None] | None = None,
    users: Sequence[str | None] | None = None,
    budget_store: BudgetStore | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    return_exceptions: bool = False,
) -> list[RelayResult | BaseException]:
    """:func:`abatch_relay`, blocking (it runs its own event loop: call it outside one)."""
    return asyncio.run(
        abatch_relay(
            questions,
            config,
            conversation_ids=conversation_ids,
            users=users,
            budget_store=budget_store,
            window_s=window_s,
            return_exceptions=return_exceptions,
        )
    )
