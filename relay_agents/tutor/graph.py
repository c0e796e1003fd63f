"""The tutor graph: a checkpointed conversation whose every answer is one relay.

The tutor keeps the whole conversation in its own state (``messages``; a checkpointer
persists it per ``thread_id``) and hands the relay only the recent part of it, so a long
conversation does not outgrow a small student's context. The relay runs as a plain graph
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

from relay_agents.core.config import Budget, RelayConfig
from relay_agents.core.grants import has_limits
from relay_agents.graph import RelayContext, build_relay_graph, conversation_id

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
    sees. Both ``invoke`` and ``ainvoke`` work.
    """
    if history_messages < 1:
        raise ValueError("history_messages must be at least 1 (the question itself)")
    # checkpointer=False: never a checkpointed subgraph of the tutor (LangGraph's switch).
    relay = build_relay_graph(tutor_relay_config(config, system_prompt), checkpointer=False)

    def relay_run(state: TutorState, run: RunnableConfig) -> tuple[dict[str, Any], RelayContext]:
        """The relay's inputs, and its context: the thread's budget, deltas straight into the
        tutor's own ``custom`` stream."""
        inputs = {"messages": recent_messages(state["messages"], history_messages)}
        context = RelayContext(conversation_id=conversation_id(None, run), on_delta=get_stream_writer())
        return inputs, context

    def tutor(state: TutorState, config: RunnableConfig) -> dict[str, Any]:
        inputs, context = relay_run(state, config)
        return {"messages": [_reply(relay.invoke(inputs, context=context))]}

    async def atutor(state: TutorState, config: RunnableConfig) -> dict[str, Any]:
        inputs, context = relay_run(state, config)
        return {"messages": [_reply(await relay.ainvoke(inputs, context=context))]}

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
