"""``ChatRelay``: the relay as a LangChain chat model (``BaseChatModel``).

Use it wherever LangChain takes a chat model: ``prompt | ChatRelay(...) | StrOutputParser()``,
``create_agent(model=ChatRelay(...), tools=[...])``, ``init_chat_model``-style code that
expects the usual fields (``model``, ``base_url``, ``api_key``, ``temperature``,
``max_tokens``, ``timeout``, ``max_retries``, ``stop``, ``streaming``).

Each call runs one relay graph (:func:`relay_agents.build_relay_graph`) on the given messages;
the reply is the relay's clean text. Streamed chunks carry the model that wrote them in
``chunk.response_metadata["relay_sources"]`` (a one-item list, so that aggregated chunks keep one
entry per chunk instead of concatenated strings); the last chunk carries ``usage_metadata``
(student and teacher summed) and ``response_metadata["relay"]`` (spans, usage, events, budget).

``stop`` sequences are applied to the relayed text: the reply (and the stream) ends just
before the first stop sequence. The models still write the whole answer (the relay does not
stop them early), so ``usage_metadata`` and ``response_metadata["relay"]`` describe the full,
uncut answer; ``response_metadata["stop_sequence"]`` names the sequence that cut the reply.

The relay graph runs as a private detail of each call: inside a user's LangGraph node it does
not inherit the node's checkpointer, thread, stream writer or callbacks (tokens still reach the
parent's ``messages`` stream mode through this model's callbacks; the graph's inner nodes are not
traced).

Budgets: ``conversation_id=`` (per call or through ``.bind``) keys the conversation's budget in
the budget store; inside a LangGraph graph the parent run's ``thread_id`` is used when no
``conversation_id`` is given (a direct ``invoke(..., config={"configurable": {"thread_id": ...}})``
does not pass the thread to a chat model, so name the conversation there). ``user=`` keys a
pool shared by a user's conversations (``RelayConfig.user_budget``).

Tools: ``bind_tools`` shows the tools to both models through their chat templates (the student
writes calls in its own format, a teacher may write part of one) and parses the relayed answer
into ``tool_calls`` (``RelayConfig.tool_parser``: Hermes/Qwen ``<tool_call>`` by default);
malformed calls become ``invalid_tool_calls``. Streams carry ``tool_call_chunks``. ``tool_choice``
``"none"`` hides the tools and parses nothing; ``"any"``/``"required"`` or a tool's name is checked
on the answer and a reply that misses it raises ``ToolChoiceUnmet`` (the relay does not ask
again). ``with_structured_output(..., method="function_calling")`` uses the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph.state import CompiledStateGraph
from pydantic import ConfigDict, Field, SecretStr, model_validator

from relay_agents.core.config import Endpoint, RelayConfig
from relay_agents.core.tools import CallPiece, ToolAnswer, normalise_tool_choice
from relay_agents.graph import (
    RelayContext,
    ThreadedDeltas,
    conversation_id,
    drain_deltas,
    shared_relay_graph,
)

__all__ = ["ChatRelay"]


# ChatRelay field -> Endpoint field of the student (applied when the field is set)
_STUDENT_FIELDS = {
    "model_name": "model",
    "base_url": "base_url",
    "api_key": "api_key",
    "timeout": "timeout",
    "max_retries": "max_retries",
    "temperature": "temperature",
}
# per-call keyword arguments that change the relay for that call
_CALL_OVERRIDES = ("model", "temperature", "max_tokens")


class ChatRelay(BaseChatModel):
    """Relay decoding as a LangChain chat model.

    Build it from a whole :class:`RelayConfig`::

        ChatRelay(config=RelayConfig(student=..., teacher=...))

    or from the ecosystem's usual fields for the student plus a teacher endpoint::

        ChatRelay(model="relay-student", base_url="http://127.0.0.1:8001/v1",
                  teacher=Endpoint(base_url=..., model="big-model", api="chat-instruct"),
                  temperature=0.7, max_tokens=2048)

    Fields set explicitly override the matching values of ``config`` (``model``,
    ``base_url``, ``api_key``, ``timeout``, ``max_retries``, ``temperature`` go to the student
    endpoint; ``max_tokens`` is the relay's ``max_answer_tokens``; ``teacher`` replaces the
    config's teacher). ``student_options`` holds further :class:`Endpoint` fields for the
    student (``api``, ``chat_template``, ``tokenizer_path``, ...) and ``relay_options`` further
    :class:`RelayConfig` fields (``budget``, ``system_prompt``, ``user_template``, ...).

    ``api_key`` is read from ``RELAY_STUDENT_API_KEY``, then ``OPENAI_API_KEY``, when not given.
    Per call, ``model=``, ``temperature=`` and ``max_tokens=`` (e.g. through ``.bind``)
    override the student model, its temperature and the answer cap for that call;
    ``conversation_id=`` and ``user=`` key the conversation's and the user's budgets (the
    conversation is echoed in ``response_metadata["conversation_id"]``).
    """

    model_config = ConfigDict(populate_by_name=True)

    config: RelayConfig | None = None
    """A complete relay configuration; the fields below override parts of it."""
    model_name: str | None = Field(default=None, alias="model")
    """The student model name."""
    base_url: str | None = None
    """The student server's OpenAI-compatible base URL (``.../v1``)."""
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env(["RELAY_STUDENT_API_KEY", "OPENAI_API_KEY"], default=None)
    )
    """The student's API key."""
    timeout: float | None = None
    """Seconds to wait for each streamed chunk of the student."""
    max_retries: int | None = None
    """Retries of a failed student request."""
    temperature: float | None = None
    """The student's sampling temperature."""
    max_tokens: int | None = None
    """Cap on the whole relayed answer (the relay's ``max_answer_tokens``)."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop sequences applied to the relayed text."""
    streaming: bool = False
    """Stream the answer internally even for ``invoke``."""
    teacher: Endpoint | None = None
    """The teacher endpoint."""
    student_options: dict[str, Any] = Field(default_factory=dict)
    """Further :class:`Endpoint` fields for the student."""
    relay_options: dict[str, Any] = Field(default_factory=dict)
    """Further :class:`RelayConfig` fields."""

    relay_config: RelayConfig | None = Field(default=None, exclude=True)
    """The resolved relay configuration (set by the validator)."""
    graph: Any = Field(default=None, exclude=True)
    """The compiled relay graph (set by the validator)."""

    @model_validator(mode="after")
    def _build_relay(self) -> ChatRelay:
        config = self._resolve_config()
        self.relay_config = config
        self.model_name = config.student.model
        self.graph = shared_relay_graph(config)
        return self

    def _resolve_config(self) -> RelayConfig:
        explicit = self.model_fields_set
        student: dict[str, Any] = self.config.student.model_dump() if self.config else {}
        for field, target in _STUDENT_FIELDS.items():
            value = getattr(self, field)
            if value is not None and (field in explicit or self.config is None):
                student[target] = value
        student.update(self.student_options)
        missing = [name for name, key in (("model", "model"), ("base_url", "base_url")) if key not in student]
        teacher = self.teacher or (self.config.teacher if self.config else None)
        if teacher is None:
            missing.append("teacher")
        if missing:
            raise ValueError(
                "ChatRelay needs config=RelayConfig(...) or the fields "
                f"model, base_url and teacher; missing: {', '.join(missing)}"
            )
        data: dict[str, Any] = self.config.model_dump(exclude={"student", "teacher"}) if self.config else {}
        if self.max_tokens is not None:
            data["max_answer_tokens"] = self.max_tokens
        data.update(self.relay_options)
        data.update(student=Endpoint.model_validate(student), teacher=teacher)
        return RelayConfig.model_validate(data)

    # LangChain metadata ----------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "relay-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        config = self._config()
        return {
            "model_name": config.student.model,
            "student_base_url": config.student.base_url,
            "teacher_model": config.teacher.model,
            "teacher_base_url": config.teacher.base_url,
            "temperature": config.student.temperature,
            "max_answer_tokens": config.max_answer_tokens,
            "policy": config.policy,
            "stop": self.stop,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        config = self._config()
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="relay",
            ls_model_name=model if isinstance(model, str) else config.student.model,
            ls_model_type="chat",
            ls_max_tokens=kwargs.get("max_tokens") or config.max_answer_tokens,
        )
        temperature = kwargs.get("temperature", config.student.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        if stop := stop or self.stop:
            params["ls_stop"] = stop
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Runnable:
        """Bind tools (anything ``convert_to_openai_tool`` takes) and a ``tool_choice``: ``None``
        or ``"auto"``, ``"none"``, ``"any"``/``"required"``/``True``, or a tool's name."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        names = [tool["function"]["name"] for tool in formatted]
        choice = normalise_tool_choice(tool_choice, names)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    # running ---------------------------------------------------------------------------

    def _config(self) -> RelayConfig:
        assert self.relay_config is not None  # set by the validator
        return self.relay_config

    def _graph_for_call(self, kwargs: dict[str, Any]) -> CompiledStateGraph:
        overrides = {key: kwargs[key] for key in _CALL_OVERRIDES if kwargs.get(key) is not None}
        if not overrides:
            return self.graph
        config = self._config()
        student = config.student.model_dump()
        if "model" in overrides:
            student["model"] = overrides["model"]
        if "temperature" in overrides:
            student["temperature"] = overrides["temperature"]
        data = config.model_dump(exclude={"student", "teacher"})
        if "max_tokens" in overrides:
            data["max_answer_tokens"] = overrides["max_tokens"]
        data.update(student=Endpoint.model_validate(student), teacher=config.teacher)
        return shared_relay_graph(RelayConfig.model_validate(data))

    @staticmethod
    def _conversation(kwargs: dict[str, Any], run_manager: Any) -> str | None:
        """``conversation_id=`` of this call, else the LangGraph thread the model runs in."""
        return conversation_id(
            kwargs.get("conversation_id"), {"metadata": getattr(run_manager, "metadata", None)}
        )

    def _context(self, kwargs: dict[str, Any], run_manager: Any, stream_tokens: bool) -> RelayContext:
        user = kwargs.get("user")
        return RelayContext(
            stream_tokens=stream_tokens,
            conversation_id=self._conversation(kwargs, run_manager),
            user=None if user is None else str(user),
            tools=_active_tools(kwargs),
        )

    def _tool_answer(self, kwargs: dict[str, Any]) -> ToolAnswer | None:
        if _active_tools(kwargs) is None:
            return None
        return ToolAnswer(kwargs.get("tool_choice") or "auto", self._config().tool_parser)

    def _extra_metadata(self, kwargs: dict[str, Any], run_manager: Any) -> dict[str, Any]:
        conversation = self._conversation(kwargs, run_manager)
        return {} if conversation is None else {"conversation_id": conversation}

    def _result(
        self, reply: AIMessage, stop: list[str] | None, kwargs: dict[str, Any], run_manager: Any
    ) -> ChatResult:
        text, hit = _cut_at_stop(reply.text, _stops(stop, self.stop))
        metadata = {**reply.response_metadata, **self._extra_metadata(kwargs, run_manager)}
        finish_reason = metadata.get("finish_reason")
        if hit is not None:
            metadata.update(stop_sequence=hit, finish_reason="stop")
            finish_reason = "stop"
        calls: dict[str, Any] = {}
        if (tools := self._tool_answer(kwargs)) is not None:
            tools.stream.feed(text)
            tools.stream.finish()
            parsed = tools.checked()
            text = parsed.content
            calls = {"tool_calls": parsed.tool_calls, "invalid_tool_calls": parsed.invalid_tool_calls}
            if parsed.tool_calls or parsed.invalid_tool_calls:
                metadata["finish_reason"] = finish_reason = "tool_calls"
        message = AIMessage(
            content=text,
            response_metadata=metadata,
            usage_metadata=reply.usage_metadata,
            id=reply.id,
            **calls,
        )
        generation = ChatGeneration(message=message, generation_info={"finish_reason": finish_reason})
        return ChatResult(
            generations=[generation],
            llm_output={"model_name": metadata.get("model_name"), "token_usage": reply.usage_metadata},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        graph = self._graph_for_call(kwargs)
        context = self._context(kwargs, run_manager, stream_tokens=False)
        state = _isolated(lambda: graph.invoke({"messages": messages}, context=context))
        return self._result(state["messages"][-1], stop, kwargs, run_manager)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        graph = self._graph_for_call(kwargs)
        context = self._context(kwargs, run_manager, stream_tokens=False)
        token = var_child_runnable_config.set(None)
        try:
            state = await graph.ainvoke({"messages": messages}, context=context)
        finally:
            var_child_runnable_config.reset(token)
        return self._result(state["messages"][-1], stop, kwargs, run_manager)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        graph = self._graph_for_call(kwargs)
        context = self._context(kwargs, run_manager, stream_tokens=True)

        def run(on_delta: Callable[[dict[str, str]], None]) -> dict[str, Any]:
            live = dataclasses.replace(context, on_delta=on_delta)
            return _isolated(lambda: graph.invoke({"messages": messages}, context=live))

        deltas = ThreadedDeltas(run)
        chunks = _Chunker(
            _stops(stop, self.stop), self._extra_metadata(kwargs, run_manager), self._tool_answer(kwargs)
        )
        for delta in deltas:
            for chunk in chunks.take(delta):
                if run_manager and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        chunks.done(deltas.result)
        yield from chunks.finish()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """The relay graph runs in a task of its own, handing deltas to this generator directly
        (``RelayContext.on_delta``: LangGraph's ``custom`` stream woke the loop for every token).
        The task starts without the caller's runnable config (see :func:`_isolated`)."""
        graph = self._graph_for_call(kwargs)
        deltas: asyncio.Queue[dict[str, str] | None] = asyncio.Queue()
        context = dataclasses.replace(
            self._context(kwargs, run_manager, stream_tokens=True), on_delta=deltas.put_nowait
        )
        run = _isolated(lambda: asyncio.ensure_future(graph.ainvoke({"messages": messages}, context=context)))
        chunks = _Chunker(
            _stops(stop, self.stop), self._extra_metadata(kwargs, run_manager), self._tool_answer(kwargs)
        )
        async with contextlib.aclosing(drain_deltas(run, deltas)) as stream:  # leaving cancels the run
            async for delta in stream:
                for chunk in chunks.take(delta):
                    if run_manager and chunk.text:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        chunks.done(run.result())
        for chunk in chunks.finish():
            yield chunk


def _active_tools(kwargs: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The call's tools, unless ``tool_choice`` is ``"none"`` (the models are not shown them)."""
    tools = kwargs.get("tools")
    return tools if tools and kwargs.get("tool_choice") != "none" else None


def _isolated(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` without the caller's runnable config.

    The relay graph is a private implementation detail of one chat-model call: inside a user's
    LangGraph node it must not inherit the node's checkpointer, thread, stream writer or
    callbacks (it would checkpoint as a subgraph and leak its node outputs into the parent's
    streams).
    """
    token = var_child_runnable_config.set(None)
    try:
        return fn()
    finally:
        var_child_runnable_config.reset(token)


def _stops(*lists: list[str] | None) -> list[str]:
    for stops in lists:
        if stops:
            return [s for s in stops if s]
    return []


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    hits = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    if not hits:
        return text, None
    i, s = min(hits)
    return text[:i], s


class _Chunker:
    """Turns the relay's deltas (``RelayContext.on_delta``) and its final state into
    ``AIMessageChunk``s.

    Text that could be the start of a stop sequence is held back until it is known not to
    be; after a stop sequence nothing more is emitted (the graph is still drained, so the
    final chunk carries the whole relay's usage and metadata).
    """

    def __init__(
        self, stops: list[str], extra_metadata: dict[str, Any], tools: ToolAnswer | None = None
    ) -> None:
        self.stops = stops
        self.extra = extra_metadata
        self.tools = tools
        self.held: list[tuple[str, str]] = []  # (source, text) not yet emitted
        self.stopped: str | None = None
        self.reply: AIMessage | None = None

    def done(self, state: dict[str, Any] | None) -> None:
        """Take the reply from the relay's final state (its usage and metadata)."""
        last = state["messages"][-1] if state and state.get("messages") else None
        if isinstance(last, AIMessage) and "relay" in last.response_metadata:
            self.reply = last

    def take(self, payload: dict[str, str]) -> list[ChatGenerationChunk]:
        if self.stopped is not None or not payload["text"]:
            return []
        self.held.append((payload["source"], payload["text"]))
        held = "".join(text for _, text in self.held)
        text, hit = _cut_at_stop(held, self.stops)
        if hit is not None:
            self.stopped = hit
            return self._emit(len(text), drop_rest=True)
        return self._emit(len(held) - _stop_prefix_len(held, self.stops))

    def _emit(self, n: int, drop_rest: bool = False) -> list[ChatGenerationChunk]:
        out: list[ChatGenerationChunk] = []
        while self.held and n > 0:
            source, text = self.held[0]
            if len(text) <= n:
                self.held.pop(0)
                piece = text
            else:
                piece, self.held[0] = text[:n], (source, text[n:])
            n -= len(piece)
            if self.tools is None:
                out.append(_text_chunk(source, piece))
            else:
                out.extend(_event_chunk(source, event) for event in self.tools.stream.feed(piece))
        if drop_rest:
            self.held.clear()
        return out

    def finish(self) -> Iterator[ChatGenerationChunk]:
        source = self.held[-1][0] if self.held else "student"
        yield from self._emit(sum(len(text) for _, text in self.held))
        reply = self.reply
        metadata: dict[str, Any] = dict(reply.response_metadata) if reply is not None else {}
        metadata.update(self.extra)
        if self.stopped is not None:
            metadata.update(stop_sequence=self.stopped, finish_reason="stop")
        if self.tools is not None:
            yield from (_event_chunk(source, event) for event in self.tools.stream.finish())
            parsed = self.tools.checked()
            if parsed.tool_calls or parsed.invalid_tool_calls:
                metadata["finish_reason"] = "tool_calls"
        message = AIMessageChunk(
            content="",
            response_metadata=metadata,
            usage_metadata=reply.usage_metadata if reply is not None else None,
            chunk_position="last",
        )
        yield ChatGenerationChunk(
            message=message, generation_info={"finish_reason": metadata.get("finish_reason")}
        )


def _event_chunk(source: str, event: str | CallPiece) -> ChatGenerationChunk:
    """A chunk of user text or of a tool call (``tool_call_chunks``)."""
    if isinstance(event, str):
        return _text_chunk(source, event)
    piece = tool_call_chunk(name=event.name, args=event.args, id=event.id, index=event.index)
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content="", tool_call_chunks=[piece], response_metadata={"relay_sources": [source]}
        )
    )


def _text_chunk(source: str, text: str) -> ChatGenerationChunk:
    return ChatGenerationChunk(
        message=AIMessageChunk(content=text, response_metadata={"relay_sources": [source]})
    )


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that starts a stop sequence."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
