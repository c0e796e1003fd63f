"""The Python API: ``relay``, ``arelay``, ``astream_relay`` and ``stream_relay``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph.state import CompiledStateGraph
from pydantic import BaseModel, Field

from relay_agents.config import RelayConfig
from relay_agents.graph import RelayContext, build_relay_graph, drain_deltas, shared_relay_graph
from relay_agents.prompts import Message


class Span(BaseModel):
    """A run of answer text written by one model."""

    source: Literal["student", "teacher"]
    text: str
    tokens: int


class RelayUsage(BaseModel):
    student_tokens: int = 0
    teacher_tokens: int = 0
    teacher_calls: int = 0
    student_discarded_tokens: int = 0
    """Student tokens generated after a policy's cut: paid for, not in the answer."""
    call_ratio: float = 0.0
    cost_usd: float = 0.0
    student_prompt_tokens: int = 0
    teacher_prompt_tokens: int = 0
    student_cost_usd: float = 0.0
    teacher_cost_usd: float = 0.0


class RelayEvent(BaseModel):
    """A declined, cut, ignored or malformed call, or a teacher failure, in words."""

    kind: str
    message: str
    requested: int | None = None
    granted: int | None = None
    reason: str | None = None
    scope: Literal["turn", "conversation", "user"] | None = None
    """The budget that declined or cut the call."""

    def __str__(self) -> str:
        return self.message


class BudgetState(BaseModel):
    max_teacher_tokens: int | None = None
    max_teacher_calls: int | None = None
    max_cost_usd: float | None = None
    spent_teacher_tokens: int = 0
    spent_teacher_calls: int = 0
    spent_cost_usd: float = 0.0
    remaining_teacher_tokens: int | None = None
    remaining_teacher_calls: int | None = None
    remaining_cost_usd: float | None = None
    exhausted: bool = False


class RelayResult(BaseModel):
    """One relayed answer."""

    text: str
    spans: list[Span]
    usage: RelayUsage
    finish_reason: str | None
    finished_by: Literal["student", "teacher"] | None = None
    events: list[RelayEvent] = Field(default_factory=list)
    budget: BudgetState = Field(default_factory=BudgetState)
    """The conversation's budget after this answer."""
    user_budget: BudgetState | None = None
    """The user's pooled budget after this answer, when the call named a ``user``."""
    enable_thinking: bool = False
    """The thinking mode the prompts were rendered with (results differ with it)."""
    preset: str | None = None
    """The preset the config came from (``published``), if any."""
    message: AIMessage

    @classmethod
    def from_message(cls, message: AIMessage) -> RelayResult:
        meta = message.response_metadata["relay"]
        return cls(
            text=message.text,
            spans=meta["spans"],
            usage=meta["usage"],
            finish_reason=meta["finish_reason"],
            finished_by=meta["finished_by"],
            events=meta["events"],
            budget=meta["budget"],
            user_budget=meta.get("user_budget"),
            enable_thinking=meta.get("enable_thinking", False),
            preset=meta.get("preset"),
            message=message,
        )


class RelayDelta(BaseModel):
    """A piece of streamed answer text and the model that wrote it."""

    text: str
    source: Literal["student", "teacher"]


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
) -> RelayResult:
    """Relay one answer (blocking); see :func:`arelay`."""
    graph = _graph(config, checkpointer)
    context = RelayContext(stream_tokens=False, conversation_id=conversation_id, user=user)
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
) -> RelayResult:
    """Relay one answer.

    ``conversation_id`` keys the conversation's budget (``config.budget``) in the budget
    store, so it holds across calls and processes; ``user`` keys a pool shared by all that
    user's conversations (``config.user_budget``). With ``checkpointer``, the conversation
    key defaults to ``thread_id``.
    """
    graph = _graph(config, checkpointer)
    context = RelayContext(stream_tokens=False, conversation_id=conversation_id, user=user)
    state = await graph.ainvoke(_inputs(question), _run_config(thread_id, checkpointer), context=context)
    return RelayResult.from_message(state["messages"][-1])


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

    def _take(self, mode: str, payload: Any) -> RelayDelta | None:
        if mode == "custom":
            return RelayDelta(text=payload["text"], source=payload["source"])
        last = payload["messages"][-1] if payload.get("messages") else None
        if isinstance(last, AIMessage) and "relay" in last.response_metadata:
            self.result = RelayResult.from_message(last)
        return None

    async def run(self, on_delta: Callable[[RelayDelta], None]) -> RelayResult:
        """Run the answer, handing each delta to ``on_delta`` as it is produced; sets ``result``.

        The deltas go straight from the graph's nodes to ``on_delta``
        (``RelayContext.on_delta``) rather than through LangGraph's ``custom`` stream mode,
        which wakes the event loop with a thread-safe call and a waiter task for every token
        (measured: 1.95 -> 1.71 ms of CPU for a one-request streamed answer in process, 2.7 ->
        2.2 ms in the server).
        """

        def sink(delta: dict[str, str]) -> None:
            on_delta(RelayDelta.model_construct(text=delta["text"], source=delta["source"]))

        context = dataclasses.replace(self._context, on_delta=sink)
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
        for mode, payload in self._graph.stream(
            self._inputs, self._config, stream_mode=_MODES, context=self._context
        ):
            if (delta := self._take(mode, payload)) is not None:
                yield delta


_MODES: list[Any] = ["custom", "values"]


def astream_relay(
    question: Question,
    config: RelayConfig,
    *,
    conversation_id: str | None = None,
    user: str | None = None,
    checkpointer: BaseCheckpointSaver | None = None,
    thread_id: str | None = None,
) -> RelayStream:
    """Stream an answer as the models write it: ``async for delta in astream_relay(...)``.

    The keywords are :func:`arelay`'s.
    """
    return RelayStream(
        _graph(config, checkpointer),
        _inputs(question),
        _run_config(thread_id, checkpointer),
        RelayContext(conversation_id=conversation_id, user=user),
    )


stream_relay = astream_relay
"""The same stream, iterated synchronously: ``for delta in stream_relay(...)``."""
