"""ChatRelay in LangChain and LangGraph: a chain, an agent, and the relay graph as a subgraph.

    RELAY_STUDENT_BASE_URL=... RELAY_STUDENT_MODEL=... \
    RELAY_TEACHER_BASE_URL=... RELAY_TEACHER_MODEL=... python examples/agent_pipeline.py "What is 17*23?"

(or ``RELAY_CONFIG=relay.toml``). Three ways to use the relay:

1. ``prompt | ChatRelay | StrOutputParser()``: a plain LCEL chain.
2. ``create_agent(model=ChatRelay(...))``: a LangChain agent (here without tools; with tools,
   the student writes the calls: see docs/tools.md).
3. ``build_relay_graph(config)`` as a node of your own LangGraph ``StateGraph`` over
   ``messages``: the relay's reply (with ``response_metadata["relay"]``) lands in your state.
"""

from __future__ import annotations

import sys
from typing import Any

from langchain.agents import create_agent
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph

from relay_agents import ChatRelay, RelayConfig, build_relay_graph, load_config

PROMPT = ChatPromptTemplate.from_messages([("system", "You are a careful tutor."), ("human", "{question}")])


def build_chain(model: ChatRelay) -> Runnable[dict[str, Any], str]:
    """``{"question": ...}`` -> the relayed answer as a string."""
    return PROMPT | model | StrOutputParser()


def build_agent(model: ChatRelay) -> CompiledStateGraph:
    """A LangChain agent answering with the relay (a tutor needs no tools)."""
    return create_agent(model=model, system_prompt="You are a careful tutor.")


def build_app(config: RelayConfig) -> CompiledStateGraph:
    """Your own graph: a note-taking step, then the relay graph as a subgraph node."""

    def intake(state: MessagesState) -> dict[str, Any]:
        return {}  # e.g. retrieval, routing, guardrails

    def audit(state: MessagesState) -> dict[str, Any]:
        usage = state["messages"][-1].response_metadata["relay"]["usage"]
        print(f"[audit] teacher wrote {usage['teacher_tokens']} tokens", file=sys.stderr)
        return {}

    builder = StateGraph(MessagesState)
    builder.add_node("intake", intake)
    builder.add_node("relay", build_relay_graph(config))
    builder.add_node("audit", audit)
    builder.add_edge(START, "intake")
    builder.add_edge("intake", "relay")
    builder.add_edge("relay", "audit")
    builder.add_edge("audit", END)
    return builder.compile()


def main(question: str) -> None:
    config = load_config()
    model = ChatRelay(config=config)

    print("chain:", build_chain(model).invoke({"question": question}))

    agent = build_agent(model)
    state = agent.invoke({"messages": [{"role": "user", "content": question}]})
    print("agent:", state["messages"][-1].text)

    app = build_app(config)
    state = app.invoke({"messages": [{"role": "user", "content": question}]})
    print("subgraph:", state["messages"][-1].text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "What is 17*23 + 5?")
