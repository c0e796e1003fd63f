"""The relay loop as a LangGraph state machine: ``START -> student <-> teacher -> END``.

State is declared once. ``messages`` follows LangGraph's messages convention (the reply
is an ``AIMessage``); ``ledger`` is the conversation's teacher spend, so a checkpointer
persists the budget across the turns of a thread; ``answer`` is the answer in progress.
The first student step begins the answer and the step that ends it writes the reply: no
begin or finish node, because every LangGraph step costs more than those two did.
Model text goes, as ``{"source", "text"}`` deltas, to ``RelayContext.on_delta`` when a
consumer in the same process gives one (every stream of this library: :func:`drain_deltas`
for async consumers, :class:`ThreadedDeltas` for sync ones), else to LangGraph's ``custom``
stream mode (``graph.stream``, LangGraph's server and Studio).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Generic, Protocol, TypedDict, TypeVar

from langchain_core.messages import AIMessage, AnyMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.config import get_config, get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import get_runtime
from langgraph.types import Checkpointer

from relay_agents.budgets import (
    BudgetExceeded,
    BudgetStore,
    Reservation,
    Scope,
    conversation_key,
    open_budget_store,
    user_key,
)
from relay_agents.clients import STREAM_ERRORS, OnInterrupt, OnText, Watch, client_for
from relay_agents.core.answer import (
    AnswerState,
    Delta,
    Ledger,
    apply_reservation,
    budget_declined,
    call_quote,
    finish_student_turn,
    finish_teacher_call,
    held_student_text,
    new_ledger,
    relay_record,
    route,
    skipped_student_turn,
    start_answer,
    student_filter,
    student_plan,
    student_request,
    teacher_request,
)
from relay_agents.core.config import ByDigest, RelayConfig, hold_ttl_s
from relay_agents.core.grants import Balance, CallQuote, ScopeKind, Spend, has_limits
from relay_agents.core.policies import TurnPlan
from relay_agents.core.protocol import CleanTextFilter
from relay_agents.core.types import Generation, Message, Request
from relay_agents.prompts import protocol_messages, to_openai_messages

T = TypeVar("T")


@dataclass(frozen=True)
class RelayContext:
    """Run-time options (LangGraph ``context``).

    ``stream_tokens``: stream model replies token by token into the ``custom`` stream mode
    (the default). ``relay()``/``arelay()`` turn it off: whole replies are cheaper for vLLM.
    ``conversation_id``: the key of the conversation's budget in the budget store (default:
    the run's ``thread_id``). ``user``: the key of a pool shared by a user's conversations.
    ``on_delta``: takes each delta (``{"source", "text"}``) in place of the ``custom`` stream,
    for a consumer in the same event loop (``astream_relay``, the server, ``ChatRelay.astream``):
    LangGraph's stream writer wakes the loop with a thread-safe call and a waiter task for
    every token. ``tools``: OpenAI tools the answer may call, shown to both models through their
    chat templates (the calls are parsed from the answer by its consumer: ``ChatRelay``, the server).
    """

    stream_tokens: bool = True
    conversation_id: str | None = None
    user: str | None = None
    on_delta: Callable[[dict[str, str]], None] | None = None
    tools: list[dict[str, Any]] | None = None

    def writer(self) -> Callable[[Any], None]:
        return self.on_delta or get_stream_writer()


async def drain_deltas(run: asyncio.Future[Any], deltas: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    """Yield what ``run`` (a relay running with ``on_delta=deltas.put_nowait``) puts into
    ``deltas`` until it ends, then raise its error if it failed; cancel it (and its upstream
    requests) if the consumer leaves first."""
    run.add_done_callback(lambda _: deltas.put_nowait(None))
    try:
        while (delta := await deltas.get()) is not None:
            yield delta
        run.result()
    finally:
        if not run.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run


def conversation_id(explicit: object | None, run: Mapping[str, Any] | None = None) -> str | None:
    """Whose conversation budget a run spends: ``explicit`` (``conversation_id=``), else the
    LangGraph thread the run belongs to (its config's ``thread_id``, or a callback's metadata)."""
    if explicit is not None:
        return str(explicit)
    run = run or {}
    thread = (run.get("configurable") or {}).get("thread_id") or (run.get("metadata") or {}).get("thread_id")
    return None if thread is None else str(thread)


class StreamClosed(Exception):
    """Raised inside a relay run when the consumer of its sync stream has left."""


class ThreadedDeltas(Generic[T]):
    """The sync twin of :func:`drain_deltas`: iterating runs ``run(on_delta)`` in a worker thread
    and yields what it hands to ``on_delta``; ``result`` is its return value once exhausted.

    A sync consumer cannot be called back from inside the nodes, so the deltas cross one
    ``queue.Queue``. Leaving the loop early makes the run's next delta raise
    :class:`StreamClosed`, which closes its upstream request where the async path cancels.
    """

    def __init__(self, run: Callable[[Callable[[dict[str, str]], None]], T]) -> None:
        self._run = run
        self.result: T | None = None

    def __iter__(self) -> Iterator[dict[str, str]]:
        deltas: queue.SimpleQueue[Any] = queue.SimpleQueue()
        closed = threading.Event()
        end = object()
        outcome: list[Any] = []

        def on_delta(delta: dict[str, str]) -> None:
            if closed.is_set():
                raise StreamClosed
            deltas.put(delta)

        def work() -> None:
            try:
                outcome.append(self._run(on_delta))
            except BaseException as exc:  # handed to the consumer
                outcome.append(exc)
            finally:
                deltas.put(end)

        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(work,), name="relay-stream", daemon=True).start()
        try:
            while (delta := deltas.get()) is not end:
                yield delta
        finally:
            closed.set()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        self.result = outcome[0]


def _context() -> RelayContext:
    context = get_runtime().context
    if context is None:
        return RelayContext()
    if isinstance(context, dict):
        return RelayContext(**context)
    return context


def relay_prompt(config: RelayConfig, messages: Sequence[BaseMessage | Message]) -> list[Message]:
    """The messages a relay answering ``messages`` sends its models (the protocol's prompt)."""
    return protocol_messages(
        to_openai_messages(messages), user_template=config.user_template, system_prompt=config.system_prompt
    )


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
    """Emits the student's held text just before the teacher's first token, and the teacher's
    text through a clean-text filter (a teacher may write markup)."""

    def __init__(self, answer: AnswerState, writer: Writer) -> None:
        self.held = held_student_text(answer)
        self.writer = writer
        self.filter = CleanTextFilter(answer_started=True)
        self.streamed = False

    def on_text(self, delta: str) -> None:
        self.flush_held()
        self.streamed = True
        self.write(self.filter.feed(delta))

    def write(self, clean: str) -> None:
        if clean:
            self.writer({"source": "teacher", "text": clean})

    def flush_held(self) -> None:
        if self.held:
            self.writer({"source": "student", "text": self.held})
            self.held = ""


@dataclass(slots=True)
class _StudentStep:
    """What one student turn needs, planned before its request goes out."""

    answer: AnswerState
    ledger: Ledger
    turn: _StudentTurn
    live: bool
    scopes: list[Scope]
    plan: TurnPlan
    request: Request

    @property
    def on_text(self) -> Callable[[str], None] | None:
        return self.turn.on_text if self.live else None

    @property
    def watch(self) -> Callable[..., bool] | None:
        """The plan's token check, when the policy reads the student's tokens as they come."""
        return self.plan.unsure if self.plan.watch_from is not None else None


@dataclass(slots=True)
class _TeacherStep:
    """What one teacher call needs, planned before its hold is taken and its request goes out."""

    answer: AnswerState
    call: _TeacherCall
    live: bool
    scopes: list[Scope]
    quote: CallQuote | None

    @property
    def on_text(self) -> Callable[[str], None] | None:
        return self.call.on_text if self.live else None


class ModelClient(Protocol):
    """What the nodes ask of a model: :class:`relay_agents.clients.EndpointClient`, or the
    batch executor's client that sends the requests of many answers together."""

    def generate(
        self,
        request: Request,
        on_text: OnText | None = None,
        watch: Watch | None = None,
        on_interrupt: OnInterrupt | None = None,
    ) -> Generation: ...

    async def agenerate(
        self,
        request: Request,
        on_text: OnText | None = None,
        watch: Watch | None = None,
        on_interrupt: OnInterrupt | None = None,
    ) -> Generation: ...


@dataclass(frozen=True, slots=True)
class RunScope:
    """Who runs a node: the run's context and the budgets it draws on in the store. A graph
    reads them from LangGraph's runtime; the batch executor, which runs the nodes without
    LangGraph, passes each answer's own."""

    context: RelayContext
    scopes: list[Scope]
    #: The conversation's id (explicit or the run's thread): keeps its requests on one replica.
    conversation: str | None = None


class RelayNodes:
    """The node functions, sync and async, bound to one config and its endpoint clients.

    Budget-store I/O (reserve before a teacher call, settle after it, read at the end) happens
    here; what it means for the answer is decided by the pure functions of ``answer``.
    """

    def __init__(
        self,
        config: RelayConfig,
        budget_store: BudgetStore | None = None,
        *,
        student_client: ModelClient | None = None,
        teacher_client: ModelClient | None = None,
    ) -> None:
        self.config = config
        self.student_client: ModelClient = student_client or client_for(config.student, "student")
        self.teacher_client: ModelClient = teacher_client or client_for(config.teacher, "teacher")
        self._budget_store = budget_store

    @property
    def budget_store(self) -> BudgetStore:
        if self._budget_store is None:
            self._budget_store = open_budget_store(self.config.budget_store)
        return self._budget_store

    def run_scope(self, context: RelayContext, run: Mapping[str, Any] | None = None) -> RunScope:
        """The budgets a run with ``context`` (and LangGraph run config ``run``) draws on in the
        store: its conversation's and its user's pool."""
        config = self.config
        scopes: list[Scope] = []
        conversation = conversation_id(context.conversation_id, run)
        if conversation and has_limits(config.budget):
            scopes.append(Scope("conversation", conversation_key(conversation), config.budget))
        if context.user and has_limits(config.user_budget):
            scopes.append(Scope("user", user_key(context.user), config.user_budget))
        return RunScope(context, scopes, conversation)

    def _graph_run(self, run: RunScope | None) -> RunScope:
        return run if run is not None else self.run_scope(_context(), get_config())

    def _begun(self, state: RelayState, context: RelayContext) -> tuple[AnswerState, Ledger]:
        """The answer in progress, or a new one when this run starts: an answer belongs to the
        message it replies to, so a thread's next question (or a run retried after a failure
        with a new question) never continues an old answer, while a resumed run does."""
        messages = state["messages"]
        question_id = messages[-1].id if messages else None
        answer = state.get("answer")
        ledger = state.get("ledger") or new_ledger()
        if answer is not None and answer.get("question_id") == question_id:
            return answer, ledger
        return (
            start_answer(relay_prompt(self.config, messages), self.config, question_id, context.tools),
            ledger,
        )

    # Each node is plan -> I/O -> apply: the sync and async bodies differ only in their I/O
    # lines (a model request, a budget-store call).

    # student -------------------------------------------------------------------------

    def _student_turn(self, state: RelayState, run: RunScope | None) -> _StudentStep:
        run = self._graph_run(run)
        context = run.context
        answer, ledger = self._begun(state, context)
        plan = student_plan(answer, self.config)
        return _StudentStep(
            answer=answer,
            ledger=ledger,
            turn=_StudentTurn(answer, context.writer()),
            live=context.stream_tokens,
            scopes=run.scopes,
            plan=plan,
            request=student_request(answer, self.config, plan, run.conversation),
        )

    def _after_student(self, step: _StudentStep, gen: Generation) -> AnswerState:
        """Apply the student's turn (a call it asks for is held by the teacher step)."""
        if gen.error is not None:
            raise gen.error  # without the student there is no answer to continue
        turn = step.turn
        if not step.live:
            turn.on_text(gen.text)
        in_store = any(s.kind == "conversation" for s in step.scopes)
        answer, deltas = finish_student_turn(
            step.answer,
            None if in_store else step.ledger,
            self.config,
            gen,
            "".join(turn.parts),
            turn.filter,
            step.plan,
        )
        _write(turn.writer, deltas)
        return self._held(answer, turn.writer, None)

    def _held(self, answer: AnswerState, writer: Writer, reserved: Reservation | None) -> AnswerState:
        """Apply the store's grant (if the call went to a store) and the raise-when-spent policy."""
        if reserved is not None:
            answer, deltas = apply_reservation(
                answer,
                self.config,
                reserved.grant,
                None if reserved.id is None else {"id": reserved.id, "keys": list(reserved.keys)},
            )
            _write(writer, deltas)
        if self.config.on_budget_exhausted == "raise" and (event := budget_declined(answer)) is not None:
            raise BudgetExceeded(event["message"], scope=event.get("scope"), reason=event.get("reason"))
        return answer

    def student(self, state: RelayState, run: RunScope | None = None) -> dict[str, Any]:
        step = self._student_turn(state, run)
        gen = skipped_student_turn()
        if not step.plan.call_at_start:
            gen = self.student_client.generate(step.request, step.on_text, step.watch)
        answer = self._after_student(step, gen)
        balances = self._balances(step.scopes) if route(answer) == "finish" else None
        return self._update(answer, step.ledger, balances)

    async def astudent(self, state: RelayState, run: RunScope | None = None) -> dict[str, Any]:
        step = self._student_turn(state, run)
        gen = skipped_student_turn()
        if not step.plan.call_at_start:
            gen = await self.student_client.agenerate(step.request, step.on_text, step.watch)
        answer = self._after_student(step, gen)
        balances = await self._abalances(step.scopes) if route(answer) == "finish" else None
        return self._update(answer, step.ledger, balances)

    # teacher -------------------------------------------------------------------------

    # A call's hold is taken and settled inside the teacher step, in one try/finally: no step
    # boundary lies between them, so no cancellation, error or interrupt between two steps can
    # leave a hold behind, whoever runs the graph. The settle charges what the teacher delivered,
    # a cancelled stream's tokens too (``on_interrupt``).

    def _teacher_call(self, state: RelayState, run: RunScope | None) -> _TeacherStep:
        run = self._graph_run(run)
        context, scopes = run.context, run.scopes
        answer = state["answer"]
        call = answer["call"]
        assert call is not None
        return _TeacherStep(
            answer=answer,
            call=_TeacherCall(answer, context.writer()),
            live=context.stream_tokens,
            scopes=scopes,
            quote=call_quote(answer, self.config, call["granted"]) if scopes else None,
        )

    def _granted(self, step: _TeacherStep, reserved: Reservation | None) -> Request | None:
        """Apply the store's grant to the step; the teacher's request, None when declined."""
        step.answer = self._held(step.answer, step.call.writer, reserved)
        return None if step.answer["call"] is None else teacher_request(step.answer, self.config)

    def _charged(self, gen: Generation | None) -> Spend:
        """What the store is charged for a call: only text actually received."""
        if gen is None or not gen.text:
            return Spend()
        cost = self.config.teacher.price(gen.prompt_tokens, gen.completion_tokens)
        return Spend(gen.completion_tokens, 1, cost)

    def _after_teacher(
        self, state: RelayState, step: _TeacherStep, gen: Generation | None, error: BaseException | None
    ) -> tuple[AnswerState, Ledger]:
        if step.answer["call"] is None:  # declined by the store
            return step.answer, state["ledger"]
        failed = error if gen is None else gen.error
        if failed is not None and self.config.on_teacher_failure == "raise":
            raise failed
        call = step.call
        if gen is not None and gen.context_room != 0:  # 0: the call was never asked
            call.flush_held()
            if not call.streamed:
                call.write(call.filter.feed(gen.text))
            call.write(call.filter.finish(answered_call=False))
        answer, ledger, deltas = finish_teacher_call(step.answer, state["ledger"], self.config, gen, error)
        _write(call.writer, deltas)
        return answer, ledger

    def teacher(self, state: RelayState, run: RunScope | None = None) -> dict[str, Any]:
        step = self._teacher_call(state, run)
        reserved: Reservation | None = None
        gen: Generation | None = None
        error: BaseException | None = None
        interrupted: list[Generation] = []
        try:
            if step.quote is not None:
                reserved = self.budget_store.reserve(step.scopes, step.quote, ttl_s=hold_ttl_s(self.config))
            request = self._granted(step, reserved)
            if request is not None:
                try:
                    gen = self.teacher_client.generate(request, step.on_text, on_interrupt=interrupted.append)
                except STREAM_ERRORS as exc:
                    error = exc
        finally:
            gen, error = _answered(gen, error)
            if reserved is not None and reserved.id is not None:
                delivered = gen if gen is not None else _delivered(interrupted)
                self.budget_store.settle(reserved.id, reserved.keys, self._charged(delivered))
        answer, ledger = self._after_teacher(state, step, gen, error)
        balances = self._balances(step.scopes) if route(answer) == "finish" else None
        return self._update(answer, ledger, balances)

    async def ateacher(self, state: RelayState, run: RunScope | None = None) -> dict[str, Any]:
        step = self._teacher_call(state, run)
        reserved: Reservation | None = None
        gen: Generation | None = None
        error: BaseException | None = None
        interrupted: list[Generation] = []
        try:
            if step.quote is not None:
                reserved = await self.budget_store.areserve(
                    step.scopes, step.quote, ttl_s=hold_ttl_s(self.config)
                )
            request = self._granted(step, reserved)
            if request is not None:
                try:
                    gen = await self.teacher_client.agenerate(
                        request, step.on_text, on_interrupt=interrupted.append
                    )
                except STREAM_ERRORS as exc:
                    error = exc
        finally:
            gen, error = _answered(gen, error)
            if reserved is not None and reserved.id is not None:
                delivered = gen if gen is not None else _delivered(interrupted)
                await self.budget_store.asettle(reserved.id, reserved.keys, self._charged(delivered))
        answer, ledger = self._after_teacher(state, step, gen, error)
        balances = await self._abalances(step.scopes) if route(answer) == "finish" else None
        return self._update(answer, ledger, balances)

    # the end of the answer ------------------------------------------------------------

    def _balances(self, scopes: list[Scope]) -> dict[ScopeKind, Balance]:
        balances = self.budget_store.balances([s.key for s in scopes]) if scopes else {}
        return {s.kind: balances[s.key] for s in scopes}

    async def _abalances(self, scopes: list[Scope]) -> dict[ScopeKind, Balance]:
        balances = await self.budget_store.abalances([s.key for s in scopes]) if scopes else {}
        return {s.kind: balances[s.key] for s in scopes}

    def _update(
        self,
        answer: AnswerState,
        ledger: Ledger,
        store_balances: dict[ScopeKind, Balance] | None,
    ) -> dict[str, Any]:
        """The node's state update; once the answer is finished (``store_balances`` read), the
        reply too: the node that ends the answer writes it, which saves LangGraph a step."""
        update: dict[str, Any] = {"answer": answer, "ledger": ledger}
        if store_balances is None:
            return update
        record = relay_record(answer, ledger, self.config, store_balances)
        input_tokens = answer["student_prompt_tokens"] + answer["teacher_prompt_tokens"]
        output_tokens = answer["student_tokens"] + answer["teacher_tokens"]
        update["messages"] = [
            AIMessage(
                content="".join(span["text"] for span in answer["spans"]),
                response_metadata={
                    "relay": record.model_dump(),
                    "model_name": self.config.student.model,
                    "finish_reason": answer["finish_reason"],
                },
                usage_metadata={
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "total_tokens": input_tokens + output_tokens,
                },
            )
        ]
        return update


def _delivered(interrupted: list[Generation]) -> Generation | None:
    """What an interrupted teacher call had received (its client's account), if it was one."""
    return interrupted[0] if interrupted else None


def _answered(
    gen: Generation | None, error: BaseException | None
) -> tuple[Generation | None, BaseException | None]:
    """A teacher stream that broke before any text answered nothing."""
    if gen is not None and gen.error is not None and not gen.text:
        return None, gen.error
    return gen, error


def _route(state: RelayState) -> str:
    return route(state["answer"])


class _Step(Runnable[Any, Any]):
    """A node or edge with a sync and an async body.

    LangGraph's task already traces each node and sets the run's context, so this calls the
    body directly: a plain function would go to a thread pool in async runs, and a
    ``RunnableLambda`` inspects its function's signature and opens a child trace on every call.
    """

    def __init__(
        self, name: str, func: Callable[[Any], Any], afunc: Callable[[Any], Awaitable[Any]] | None = None
    ) -> None:
        self.name = name
        self.func = func
        self.afunc = afunc

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self.func(input)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self.afunc(input) if self.afunc is not None else self.func(input)


@lru_cache(maxsize=64)
def _shared_graph(key: ByDigest[RelayConfig]) -> CompiledStateGraph:
    return _compiled(RelayNodes(key.config), key.config, None, "relay")


def shared_relay_graph(config: RelayConfig) -> CompiledStateGraph:
    """The one checkpointer-less graph per distinct config, shared by ``relay()`` and ``ChatRelay``."""
    return _shared_graph(ByDigest(config))


def recursion_limit(config: RelayConfig) -> int:
    """Steps one answer may take: a student/teacher pair per turn, and two to spare."""
    return 2 * config.max_student_turns + 2


def build_relay_graph(
    config: RelayConfig,
    *,
    checkpointer: Checkpointer = None,
    budget_store: BudgetStore | None = None,
    name: str = "relay",
) -> CompiledStateGraph:
    """Build the compiled relay graph for ``config``.

    Input ``{"messages": [...]}``; the reply is appended to ``messages`` as an
    ``AIMessage`` whose ``response_metadata["relay"]`` holds spans, usage, events and the
    budget. Conversation budgets are kept in ``budget_store`` (default: the store named by
    ``config.budget_store``) under the run's ``thread_id`` or ``context.conversation_id``;
    a run with neither keeps its ledger in the thread state. Both ``invoke`` and ``ainvoke``
    work (each node has a sync and an async body).
    """
    return _compiled(RelayNodes(config, budget_store), config, checkpointer, name)


def _compiled(
    nodes: RelayNodes, config: RelayConfig, checkpointer: Checkpointer, name: str
) -> CompiledStateGraph:
    builder = StateGraph(
        RelayState, context_schema=RelayContext, input_schema=MessagesState, output_schema=MessagesState
    )
    builder.add_node("student", _Step("student", nodes.student, nodes.astudent))
    builder.add_node("teacher", _Step("teacher", nodes.teacher, nodes.ateacher))
    builder.add_edge(START, "student")
    route_next = _Step("route", _route)
    ends = {"student": "student", "finish": END}
    builder.add_conditional_edges("student", route_next, {**ends, "teacher": "teacher"})
    builder.add_conditional_edges("teacher", route_next, ends)
    graph = builder.compile(checkpointer=checkpointer, name=name)
    return graph.with_config(recursion_limit=recursion_limit(config))
