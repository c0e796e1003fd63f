"""examples/agent_pipeline.py against the scripted server: chain, agent, subgraph, the script itself."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from relay_agents import ChatRelay
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config
from tests.test_entry_points import relay_env, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "agent_pipeline_example", ROOT / "examples/agent_pipeline.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script(server: ScriptedServer, key: str) -> None:
    server.script("student", key, ["So 12*34 = <call>3</call>", ". \\boxed{408}"])
    server.script("teacher", key, [" 408 and so on"])


ANSWER = "So 12*34 = 408. \\boxed{408}"


async def test_chain(example: ModuleType, scripted: ScriptedServer) -> None:
    script(scripted, "Q-chain")
    chain = example.build_chain(ChatRelay(config=relay_config(scripted)))
    assert await chain.ainvoke({"question": "Q-chain"}) == ANSWER
    script(scripted, "Q-chain")
    assert "".join(chain.stream({"question": "Q-chain"})) == ANSWER
    student = [r for r in scripted.requests() if r["model"] == "student"]
    assert "careful tutor" in student[0]["prompt"]


async def test_agent_without_tools(example: ModuleType, scripted: ScriptedServer) -> None:
    script(scripted, "Q-agent")
    agent = example.build_agent(ChatRelay(config=relay_config(scripted)))
    state = await agent.ainvoke({"messages": [HumanMessage("Q-agent")]})
    reply = state["messages"][-1]
    assert isinstance(reply, AIMessage) and reply.text == ANSWER
    assert reply.response_metadata["relay"]["usage"]["teacher_calls"] == 1
    # tokens reach the agent's "messages" stream as the models write them
    script(scripted, "Q-agent")
    parts = [
        chunk.text
        async for chunk, _ in agent.astream({"messages": [HumanMessage("Q-agent")]}, stream_mode="messages")
        if chunk.text
    ]
    assert len(parts) > 1 and "".join(parts) == ANSWER


async def test_relay_graph_as_a_subgraph_node(example: ModuleType, scripted: ScriptedServer, capsys) -> None:
    script(scripted, "Q-sub")
    app = example.build_app(relay_config(scripted))
    state = await app.ainvoke({"messages": [HumanMessage("Q-sub")]})
    assert [type(m).__name__ for m in state["messages"]] == ["HumanMessage", "AIMessage"]
    assert state["messages"][-1].text == ANSWER
    assert "teacher wrote 3 tokens" in capsys.readouterr().err
    # the subgraph's streamed text reaches the parent's custom stream mode
    script(scripted, "Q-sub")
    pieces = [
        payload
        async for _, payload in app.astream(
            {"messages": [HumanMessage("Q-sub")]}, stream_mode="custom", subgraphs=True
        )
    ]
    assert "".join(p["text"] for p in pieces) == ANSWER
    assert {p["source"] for p in pieces} == {"student", "teacher"}


def test_the_example_runs(scripted: ScriptedServer, tmp_path: Path) -> None:
    scripted.configure(default_response="Scripted answer.")
    out = run([sys.executable, "examples/agent_pipeline.py", "Q-main"], relay_env(scripted, tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "chain: Scripted answer.",
        "agent: Scripted answer.",
        "subgraph: Scripted answer.",
    ]
