"""The relay loop as a LangGraph state machine: ``begin -> student <-> teacher -> finish``.

State is declared once. ``messages`` follows LangGraph's messages convention (the reply
is an ``AIMessage``); ``ledger`` is the conversation's teacher spend, so a checkpointer
persists the budget across the turns of a thread; ``answer`` is the answer in progress.
Model text is streamed through the ``custom`` stream mode as ``{"source", "text"}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import RunnableLambda
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import get_runtime

from relay_agents.answer import (
    AnswerState,
    Delta,
    Ledger,
    finish_student_turn,
    finish_teacher_call,
    held_student_text,
    new_ledger,
    relay_metadata,
    route,
    start_answer,
    student_filter,
    student_request,
    teacher_request,
)
from relay_agents.clients import STREAM_ERRORS, EndpointClient, Generation, client_for
from relay_agents.config import RelayConfig, identity
from relay_agents.prompts import protocol_messages, to_openai_messages
from relay_agents.protocol import CleanTextFilter


@dataclass(frozen=True)
class RelayContext:
    """Run-time options (LangGraph ``context``).

    ``stream_tokens``: stream model replies token by token into the ``custom`` stream mode
    (the default). ``relay()``/``arelay()`` turn it off: whole replies are cheaper for vLLM.
    """

    stream_tokens: bool = True


def _stream_tokens() -> bool:
    context = get_runtime().context
    if context is None:
        return True
    if isinstance(context, dict):
        return bool(context.get("stream_tokens", True))
    return context.stream_tokens


class MessagesState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


class RelayState(MessagesState, total=False):
    ledger: Ledger
    answer: AnswerState


Writer = Callable[[Any], None]


def _write(writer: Writer, deltas: list[Delta]) -> None:
    for source, text in deltas:
        writer({"source": source, "text": text})


class _StudentTurn:
    """Feeds streamed student text through the clean-text filter into the stream writer."""

    def __init__(self, answer: AnswerState, writer: Writer) -> None:
        self.filter: CleanTextFilter = student_filter(answer)
        self.parts: list[str] = []
        self.writer = writer

    def on_text(self, delta: str) -> None:
        clean = self.filter.feed(delta)
        if clean:
            self.parts.append(clean)
            self.writer({"source": "student", "text": clean})


class _TeacherCall:
    """Emits the student's held text just before the teacher's first token."""

    def __init__(self, answer: AnswerState, writer: Writer) -> None:
        self.held = held_student_text(answer)
        self.writer = writer
        self.streamed = False

    def on_text(self, delta: str) -> None:
        self.flush_held()
        self.streamed = True
        self.writer({"source": "teacher", "text": delta})

    def flush_held(self) -> None:
        if self.held:
            self.writer({"source": "student", "text": self.held})
            self.held = ""


class RelayNodes:
    """The node functions, sync and async, bound to one config and its endpoint clients."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.student_client: EndpointClient = client_for(config.student)
        self.teacher_client: EndpointClient = client_for(config.teacher)

    def begin(self, state: RelayState) -> dict[str, Any]:
        messages = protocol_messages(
            to_openai_messages(state["messages"]),
            user_template=self.config.user_template,
            system_prompt=self.config.system_prompt,
        )
        return {
            "answer": start_answer(messages, self.config),
            "ledger": state.get("ledger") or new_ledger(),
        }

    # student -------------------------------------------------------------------------

    def _after_student(self, state: RelayState, turn: _StudentTurn, gen: Generation) -> dict[str, Any]:
        if gen.error is not None:
            raise gen.error  # without the student there is no answer to continue
        answer, deltas = finish_student_turn(
            state["answer"], state["ledger"], self.config, gen, "".join(turn.parts), turn.filter
        )
        _write(turn.writer, deltas)
        return {"answer": answer}

    def student(self, state: RelayState) -> dict[str, Any]:
        turn = _StudentTurn(state["answer"], get_stream_writer())
        live = _stream_tokens()
        request = student_request(state["answer"], self.config)
        gen = self.student_client.generate(request, turn.on_text if live else None)
        if not live:
            turn.on_text(gen.text)
        return self._after_student(state, turn, gen)

    async def astudent(self, state: RelayState) -> dict[str, Any]:
        turn = _StudentTurn(state["answer"], get_stream_writer())
        live = _stream_tokens()
        request = student_request(state["answer"], self.config)
        gen = await self.student_client.agenerate(request, turn.on_text if live else None)
        if not live:
            turn.on_text(gen.text)
        return self._after_student(state, turn, gen)

    # teacher -------------------------------------------------------------------------

    def _after_teacher(
        self,
        state: RelayState,
        call: _TeacherCall,
        gen: Generation | None,
        error: Exception | None,
    ) -> dict[str, Any]:
        if gen is not None and gen.error is not None and not gen.text:
            gen, error = None, gen.error  # broke before any text: nothing was answered
        failed = error if gen is None else gen.error
        if failed is not None and self.config.on_teacher_failure == "raise":
            raise failed
        if gen is not None:
            call.flush_held()
            if gen.text and not call.streamed:
                call.writer({"source": "teacher", "text": gen.text})
        answer, ledger, deltas = finish_teacher_call(
            state["answer"], state["ledger"], self.config, gen, error
        )
        _write(call.writer, deltas)
        return {"answer": answer, "ledger": ledger}

    def teacher(self, state: RelayState) -> dict[str, Any]:
        call = _TeacherCall(state["answer"], get_stream_writer())
        live = _stream_tokens()
        try:
            request = teacher_request(state["answer"], self.config)
            gen = self.teacher_client.generate(request, call.on_text if live else None)
        except STREAM_ERRORS as exc:
            return self._after_teacher(state, call, None, exc)
        return self._after_teacher(state, call, gen, None)

    async def ateacher(self, state: RelayState) -> dict[str, Any]:
        call = _TeacherCall(state["answer"], get_stream_writer())
        live = _stream_tokens()
        try:
            request = teacher_request(state["answer"], self.config)
            gen = await self.teacher_client.agenerate(request, call.on_text if live else None)
        except STREAM_ERRORS as exc:
            return self._after_teacher(state, call, None, exc)
        return self._after_teacher(state, call, gen, None)

    # finish --------------------------------------------------------------------------

    def finish(self, state: RelayState) -> dict[str, Any]:
        answer = state["answer"]
        meta = relay_metadata(answer, state["ledger"], self.config)
        input_tokens = answer["student_prompt_tokens"] + answer["teacher_prompt_tokens"]
        output_tokens = answer["student_tokens"] + answer["teacher_tokens"]
        message = AIMessage(
            content="".join(span["text"] for span in answer["spans"]),
            response_metadata={
                "relay": meta,
                "model_name": self.config.student.model,
                "finish_reason": answer["finish_reason"],
            },
            usage_metadata={
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        )
        return {"messages": [message]}


def _route(state: RelayState) -> str:
    return route(state["answer"])


@lru_cache(maxsize=64)
def _shared_graph(config_key: str) -> CompiledStateGraph:
    return build_relay_graph(RelayConfig.model_validate_json(config_key))


def shared_relay_graph(config: RelayConfig) -> CompiledStateGraph:
    """The one checkpointer-less graph per distinct config, shared by ``relay()`` and ``ChatRelay``."""
    return _shared_graph(identity(config))


def recursion_limit(config: RelayConfig) -> int:
    """Steps one answer may take: begin, finish, and a student/teacher pair per turn."""
    return 2 * config.max_student_turns + 4


def build_relay_graph(
    config: RelayConfig,
    *,
    checkpointer: BaseCheckpointSaver | None = None,
    name: str = "relay",
) -> CompiledStateGraph:
    """Build the compiled relay graph for ``config``.

    Input ``{"messages": [...]}``; the reply is appended to ``messages`` as an
    ``AIMessage`` whose ``response_metadata["relay"]`` holds spans, usage, events and the
    budget. With a checkpointer, the teacher budget persists per ``thread_id``. Both
    ``invoke`` and ``ainvoke`` work (each node has a sync and an async body).
    """
    nodes = RelayNodes(config)
    builder = StateGraph(
        RelayState, context_schema=RelayContext, input_schema=MessagesState, output_schema=MessagesState
    )
    builder.add_node("begin", nodes.begin)
    builder.add_node("student", RunnableLambda(nodes.student, afunc=nodes.astudent, name="student"))
    builder.add_node("teacher", RunnableLambda(nodes.teacher, afunc=nodes.ateacher, name="teacher"))
    builder.add_node("finish", nodes.finish)
    builder.add_edge(START, "begin")
    builder.add_edge("begin", "student")
    builder.add_conditional_edges("student", _route, ["student", "teacher", "finish"])
    builder.add_conditional_edges("teacher", _route, ["student", "finish"])
    builder.add_edge("finish", END)
    graph = builder.compile(checkpointer=checkpointer, name=name)
    return graph.with_config(recursion_limit=recursion_limit(config))
