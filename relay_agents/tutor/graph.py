"""The tutor graph: a checkpointed conversation whose every answer is one relay.

The tutor keeps the whole conversation in its own state (``messages``; a checkpointer
persists it per ``thread_id``) and hands the relay only the recent part of it, so a long
conversation does not outgrow a small student's context: at most ``history_messages``, and,
when the student's context is known, only the turns whose prompt leaves the answer its room
(the oldest dropped first, the answer says so in an event). The relay runs as a plain graph
inside the ``tutor`` node (not a checkpointed subgraph: the tutor's checkpoints hold the
conversation, not every relay step); its ``{"source", "text"}`` deltas are passed on to the
tutor's ``custom`` stream mode, and its budget is the conversation's (the ``thread_id``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph

from relay_agents.clients import Client, client_for
from relay_agents.core.answer import EventDict
from relay_agents.core.config import Budget, RelayConfig
from relay_agents.core.grants import has_limits
from relay_agents.core.types import Request
from relay_agents.graph import RelayContext, build_relay_graph, conversation_id, relay_prompt

TUTOR_SYSTEM_PROMPT = (
    "You are a patient maths tutor. Explain the solution step by step, one short step per "
    "line, say why each step follows, write maths in LaTeX between $...$, and put the final "
    "answer within \\boxed{}."
)
#: Messages of the conversation the relay sees by default (the question and earlier turns).
DEFAULT_HISTORY_MESSAGES = 20
#: The teacher budget of each conversation when the config sets none.
DEFAULT_BUDGET = Budget(max_teacher_tokens=2000)


class TutorState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def recent_messages(messages: Sequence[BaseMessage], limit: int) -> list[BaseMessage]:
    """The last ``limit`` messages, starting at a user message and ending with the question."""
    last_user = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=None)
    if last_user is None:
        raise ValueError("the conversation has no question to answer")
    window = list(messages[max(0, last_user + 1 - limit) : last_user + 1])
    while not isinstance(window[0], HumanMessage):
        window.pop(0)
    return window


def shorter_windows(window: list[BaseMessage]) -> list[list[BaseMessage]]:
    """``window`` less its oldest turns (a question and what followed it), one turn more each
    time, down to the last question alone."""
    return [window[i:] for i, m in enumerate(window) if i > 0 and isinstance(m, HumanMessage)]


def prompt_limit(config: RelayConfig, context: int) -> int:
    """The most prompt tokens a ``context``-token student takes: the rest is the answer's room,
    its whole cap or, when the cap is larger, half the context (one question's history does not
    crowd out its answer; the tiny pair's 512 tokens leave a 256-token prompt)."""
    return context - min(config.max_answer_tokens, context // 2)


class _History:
    """Fits a window of the conversation into the student's context (counted by its server).

    The whole window is counted first (it fits unless the context is small), then the turns
    are added back from the newest while they fit: on the tiny pair's 512-token context, where
    a tutor answer runs to its 256-token cap, that was two counts per question, where dropping
    the oldest turn one at a time counted once per dropped turn (four by the fifth question,
    up to ten with the default history).
    """

    def __init__(self, config: RelayConfig, client: Client) -> None:
        self.config = config
        self.client = client

    def request(self, window: list[BaseMessage]) -> Request:
        prompt = relay_prompt(self.config, window)
        return Request(messages=prompt, answer="", max_tokens=1, enable_thinking=self.config.enable_thinking)

    def fit(self, window: list[BaseMessage]) -> tuple[list[BaseMessage], EventDict | None]:
        shorter = shorter_windows(window)
        context = self.client.context_tokens() if shorter else None
        if context is None:
            return window, None
        limit = prompt_limit(self.config, context)
        if (self.client.prompt_tokens(self.request(window)) or 0) <= limit:
            return window, None
        kept = shorter[-1]
        for candidate in reversed(shorter[:-1]):
            if (self.client.prompt_tokens(self.request(candidate)) or 0) > limit:
                break
            kept = candidate
        return kept, trimmed_event(len(window) - len(kept), context)

    async def afit(self, window: list[BaseMessage]) -> tuple[list[BaseMessage], EventDict | None]:
        shorter = shorter_windows(window)
        context = await self.client.acontext_tokens() if shorter else None
        if context is None:
            return window, None
        limit = prompt_limit(self.config, context)
        if (await self.client.aprompt_tokens(self.request(window)) or 0) <= limit:
            return window, None
        kept = shorter[-1]
        for candidate in reversed(shorter[:-1]):
            if (await self.client.aprompt_tokens(self.request(candidate)) or 0) > limit:
                break
            kept = candidate
        return kept, trimmed_event(len(window) - len(kept), context)


def trimmed_event(dropped: int, context: int) -> EventDict:
    return {
        "kind": "history_trimmed",
        "message": f"The {dropped} oldest message{'' if dropped == 1 else 's'} of this conversation "
        f"were left out of the prompt to fit the student's {context}-token context.",
    }


def tutor_relay_config(config: RelayConfig, system_prompt: str | None) -> RelayConfig:
    """The relay config with the tutor's system prompt, unless the config has its own."""
    if system_prompt is None or config.system_prompt is not None:
        return config
    return config.model_copy(update={"system_prompt": system_prompt})


def tutor_config(config: RelayConfig, budget: Budget | None = None) -> RelayConfig:
    """The relay config the tutor runs: a conversation budget always set (``budget``, else
    the config's, else :data:`DEFAULT_BUDGET`) so the meter has something to measure, and the
    student going on alone when it is spent."""
    chosen = budget if budget is not None else config.budget if has_limits(config.budget) else DEFAULT_BUDGET
    return config.model_copy(update={"budget": chosen, "on_budget_exhausted": "continue"})


def build_tutor_graph(
    config: RelayConfig,
    *,
    checkpointer: BaseCheckpointSaver | None = None,
    system_prompt: str | None = TUTOR_SYSTEM_PROMPT,
    history_messages: int = DEFAULT_HISTORY_MESSAGES,
    name: str = "tutor",
) -> CompiledStateGraph:
    """Build the tutor: ``START -> tutor -> END`` over ``{"messages": [...]}``.

    Each run answers the conversation's last user message with one relayed ``AIMessage``
    (``response_metadata["relay"]`` has its spans, usage, events and the conversation's
    budget). ``system_prompt`` is used when ``config`` has none (``None``: no system
    prompt, as for students trained without one); ``history_messages`` caps what the relay
    sees, and the student's context cuts it further (oldest turns first, with a
    ``history_trimmed`` event). Both ``invoke`` and ``ainvoke`` work.
    """
    if history_messages < 1:
        raise ValueError("history_messages must be at least 1 (the question itself)")
    relay_config = tutor_relay_config(config, system_prompt)
    # checkpointer=False: never a checkpointed subgraph of the tutor (LangGraph's switch).
    relay = build_relay_graph(relay_config, checkpointer=False)
    history = _History(relay_config, client_for(relay_config.student, "student"))

    def relay_context(run: RunnableConfig) -> RelayContext:
        """The thread's budget, deltas straight into the tutor's own ``custom`` stream."""
        return RelayContext(conversation_id=conversation_id(None, run), on_delta=get_stream_writer())

    def tutor(state: TutorState, config: RunnableConfig) -> dict[str, Any]:
        window, trimmed = history.fit(recent_messages(state["messages"], history_messages))
        reply = _reply(relay.invoke({"messages": window}, context=relay_context(config)))
        return {"messages": [_with_event(reply, trimmed)]}

    async def atutor(state: TutorState, config: RunnableConfig) -> dict[str, Any]:
        window, trimmed = await history.afit(recent_messages(state["messages"], history_messages))
        reply = _reply(await relay.ainvoke({"messages": window}, context=relay_context(config)))
        return {"messages": [_with_event(reply, trimmed)]}

    builder = StateGraph(TutorState)
    builder.add_node("tutor", RunnableLambda(tutor, afunc=atutor, name="tutor"))
    builder.add_edge(START, "tutor")
    builder.add_edge("tutor", END)
    return builder.compile(checkpointer=checkpointer, name=name)


def _reply(state: dict[str, Any]) -> AIMessage:
    message = state["messages"][-1] if state.get("messages") else None
    if not isinstance(message, AIMessage) or "relay" not in message.response_metadata:
        raise RuntimeError("the relay ended without an answer")
    return message


def _with_event(reply: AIMessage, event: EventDict | None) -> AIMessage:
    """``reply`` with ``event`` first among its relay events (``None``: as it is)."""
    if event is None:
        return reply
    meta = reply.response_metadata
    relay = {**meta["relay"], "events": [event, *meta["relay"]["events"]]}
    return reply.model_copy(update={"response_metadata": {**meta, "relay": relay}})
