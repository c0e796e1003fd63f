"""Per-conversation, per-turn and per-user budgets through the relay, against the scripted
server and real budget stores (a SQLite file; PostgreSQL for the concurrency proof)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph

from relay_agents import Budget, ChatRelay, RelayConfig, arelay, astream_relay, build_relay_graph, relay
from relay_agents.budgets import BudgetExceeded, open_budget_store
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config

# The student calls once for 8 tokens, then finishes; the teacher has more than 8 to give.
STUDENT = ["Step one = <call>8</call>", " so \\boxed{1}."]
TEACHER = [" a b c d e f g h i j k l"]


def script_calls(server: ScriptedServer, key: str, times: int = 1) -> None:
    server.script("student", key, STUDENT * times)
    server.script("teacher", key, TEACHER * times)


def config_with(server: ScriptedServer, tmp_path: Path, **kw: object) -> RelayConfig:
    return relay_config(server, budget_store=f"sqlite:///{tmp_path / 'budgets.sqlite'}", **kw)


async def test_a_conversation_budget_persists_across_calls(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_calls(scripted, "Q-conv", times=3)
    config = config_with(scripted, tmp_path, budget=Budget(max_teacher_tokens=12))

    first = await arelay("Q-conv 1", config, conversation_id="c1")
    assert first.usage.teacher_tokens == 8
    assert (first.budget.spent_teacher_tokens, first.budget.remaining_teacher_tokens) == (8, 4)

    second = await arelay("Q-conv 2", config, conversation_id="c1")
    assert second.usage.teacher_tokens == 4
    assert [e.kind for e in second.events] == ["truncated_call"]
    assert second.budget.exhausted

    third = await arelay("Q-conv 3", config, conversation_id="c1")
    assert third.usage.teacher_tokens == 0
    assert [(e.kind, e.reason) for e in third.events] == [("declined_call", "budget_tokens")]
    assert "the conversation's teacher-token budget is spent" in third.events[0].message
    assert third.text == "Step one =  so \\boxed{1}."  # the student finished alone

    # Another conversation has its own budget; the store has the truth.
    script_calls(scripted, "Q-other")
    assert (await arelay("Q-other", config, conversation_id="c2")).usage.teacher_tokens == 8
    store = open_budget_store(config.budget_store)
    spent = store.spent(["conversation:c1", "conversation:c2"])
    assert (spent["conversation:c1"].teacher_tokens, spent["conversation:c2"].teacher_tokens) == (12, 8)


async def test_the_thread_id_is_the_conversation_key_inside_langgraph(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_calls(scripted, "Q-thread", times=2)
    config = config_with(scripted, tmp_path, budget=Budget(max_teacher_tokens=10))
    graph = build_relay_graph(config, checkpointer=InMemorySaver())
    run = {"configurable": {"thread_id": "t-1"}}
    await graph.ainvoke({"messages": [("user", "Q-thread 1")]}, run)
    state = await graph.ainvoke({"messages": [("user", "Q-thread 2")]}, run)
    assert state["messages"][-1].response_metadata["relay"]["budget"]["spent_teacher_tokens"] == 10
    assert (
        open_budget_store(config.budget_store).spent(["conversation:t-1"])["conversation:t-1"].teacher_tokens
        == 10
    )


def test_a_user_pool_spans_conversations(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_calls(scripted, "Q-pool", times=3)
    config = config_with(scripted, tmp_path, user_budget=Budget(max_teacher_calls=2))
    results = [relay(f"Q-pool {i}", config, conversation_id=f"p{i}", user="alice") for i in range(3)]
    assert [r.usage.teacher_calls for r in results] == [1, 1, 0]
    assert "the user's pooled teacher-call budget is spent" in results[2].events[0].message
    meta = results[2].message.response_metadata["relay"]
    assert (meta["user_budget"]["spent_teacher_calls"], meta["user_budget"]["exhausted"]) == (2, True)
    # Another user's pool is untouched.
    script_calls(scripted, "Q-bob")
    assert relay("Q-bob", config, conversation_id="b", user="bob").usage.teacher_calls == 1


async def test_a_turn_budget_caps_each_answer(scripted: ScriptedServer, tmp_path: Path) -> None:
    scripted.script("student", "Q-turn", ["A <call>8</call>", " B <call>8</call>", " done."])
    scripted.script("teacher", "Q-turn", TEACHER * 2)
    config = config_with(scripted, tmp_path, turn_budget=Budget(max_teacher_tokens=10))
    result = await arelay("Q-turn", config)
    assert result.usage.teacher_tokens == 10
    assert [(e.kind, e.granted) for e in result.events] == [("truncated_call", 2)]
    assert result.message.response_metadata["relay"]["turn_budget"]["remaining_teacher_tokens"] == 0


async def test_the_cost_budget_uses_the_teacher_prices(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_calls(scripted, "Q-cost", times=2)
    teacher = {"input_price": 0.0, "output_price": 1000.0}  # USD per million: 0.001 per token
    config = config_with(scripted, tmp_path, teacher=teacher, budget=Budget(max_cost_usd=0.012))
    first = await arelay("Q-cost 1", config, conversation_id="money")
    assert first.usage.teacher_cost_usd == pytest.approx(0.008)
    second = await arelay("Q-cost 2", config, conversation_id="money")
    assert second.usage.teacher_tokens == 4
    assert second.budget.spent_cost_usd == pytest.approx(0.012)
    assert second.budget.remaining_cost_usd == pytest.approx(0.0)


async def test_budget_exceeded_is_raised_when_asked(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_calls(scripted, "Q-raise", times=2)
    config = config_with(scripted, tmp_path, budget=Budget(max_teacher_calls=1), on_budget_exhausted="raise")
    await arelay("Q-raise 1", config, conversation_id="r")
    with pytest.raises(BudgetExceeded, match="teacher-call budget is spent") as info:
        await arelay("Q-raise 2", config, conversation_id="r")
    assert (info.value.scope, info.value.reason) == ("conversation", "budget_calls")


async def test_a_failed_teacher_call_releases_its_hold(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_calls(scripted, "Q-fail", times=2)
    scripted.faults("teacher", ["500", "500", "500"])
    config = config_with(scripted, tmp_path, budget=Budget(max_teacher_tokens=8))
    failed = await arelay("Q-fail 1", config, conversation_id="f")
    assert [e.kind for e in failed.events] == ["teacher_failure"]
    assert failed.budget.spent_teacher_tokens == 0
    # Nothing was received, nothing charged, and nothing still held: the next call gets all 8.
    ok = await arelay("Q-fail 2", config, conversation_id="f")
    assert ok.usage.teacher_tokens == 8


async def test_streaming_reports_the_same_budget(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_calls(scripted, "Q-stream")
    config = config_with(scripted, tmp_path, budget=Budget(max_teacher_tokens=5))
    stream = astream_relay("Q-stream", config, conversation_id="s")
    sources = [delta.source async for delta in stream]
    assert "teacher" in sources
    assert stream.result is not None
    assert (stream.result.usage.teacher_tokens, stream.result.budget.remaining_teacher_tokens) == (5, 0)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_64_concurrent_requests_in_one_conversation_never_overspend(
    scripted: ScriptedServer, tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    """Every request reads the same remainder at the same time; only reservations keep the sum
    within the budget (remove them and this overspends about eight-fold)."""
    url = (
        f"sqlite:///{tmp_path / 'c.sqlite'}" if store == "sqlite" else request.getfixturevalue("postgres_url")
    )
    scripted.configure(latency_s=0.05)
    for i in range(64):
        script_calls(scripted, f"Q-many-{i:02d}.")
    conversation = f"many-{store}-{uuid.uuid4().hex}"  # unique in a reused PostgreSQL database
    config = relay_config(
        scripted, budget_store=url, budget=Budget(max_teacher_tokens=60, max_teacher_calls=20)
    )
    results = await asyncio.gather(
        *(arelay(f"Q-many-{i:02d}. go", config, conversation_id=conversation) for i in range(64))
    )
    teacher_tokens = sum(r.usage.teacher_tokens for r in results)
    teacher_calls = sum(r.usage.teacher_calls for r in results)
    assert teacher_tokens == 60 and teacher_calls == 8  # seven full calls of 8, one cut to 4
    spent = open_budget_store(url).spent([f"conversation:{conversation}"])[f"conversation:{conversation}"]
    assert (spent.teacher_tokens, spent.teacher_calls) == (60, 8)
    declined = [r for r in results if any(e.kind == "declined_call" for e in r.events)]
    assert len(declined) == 64 - 8
    assert all(r.finish_reason == "stop" for r in results)


async def test_chat_relay_budgets_by_conversation_id(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_calls(scripted, "Q-chat", times=2)
    config = config_with(scripted, tmp_path, budget=Budget(max_teacher_tokens=10))
    model = ChatRelay(config=config).bind(conversation_id="chat-1")
    first = await model.ainvoke("Q-chat 1")
    second = model.invoke("Q-chat 2")  # sync and async share the store
    assert first.response_metadata["conversation_id"] == "chat-1"
    spent = [m.response_metadata["relay"]["budget"]["spent_teacher_tokens"] for m in (first, second)]
    assert spent == [8, 10]
    assert second.response_metadata["relay"]["events"][0]["kind"] == "truncated_call"


async def test_chat_relay_uses_the_langgraph_thread_as_the_conversation(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_calls(scripted, "Q-node", times=3)
    config = config_with(scripted, tmp_path, budget=Budget(max_teacher_calls=2))
    model = ChatRelay(config=config)

    async def answer(state: MessagesState) -> dict:
        return {"messages": [await model.ainvoke(state["messages"][-1:])]}

    builder = StateGraph(MessagesState)
    builder.add_node("answer", answer)
    builder.add_edge(START, "answer")
    graph = builder.compile(checkpointer=InMemorySaver())
    run = {"configurable": {"thread_id": "node-thread"}}
    calls = []
    for i in range(3):
        state = await graph.ainvoke({"messages": [("user", f"Q-node {i}")]}, run)
        reply = state["messages"][-1]
        assert reply.response_metadata["conversation_id"] == "node-thread"
        calls.append(reply.response_metadata["relay"]["usage"]["teacher_calls"])
    assert calls == [1, 1, 0]
    store = open_budget_store(config.budget_store)
    assert store.spent(["conversation:node-thread"])["conversation:node-thread"].teacher_calls == 2


def test_chat_relay_streams_within_a_user_pool(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_calls(scripted, "Q-chat-pool", times=2)
    config = config_with(scripted, tmp_path, user_budget=Budget(max_teacher_tokens=9))
    model = ChatRelay(config=config)
    first = model.invoke("Q-chat-pool 1", user="carol", conversation_id="x")
    chunks = list(model.stream("Q-chat-pool 2", user="carol", conversation_id="y"))
    last = chunks[-1]
    assert first.response_metadata["relay"]["user_budget"]["spent_teacher_tokens"] == 8
    assert last.response_metadata["relay"]["usage"]["teacher_tokens"] == 1
    assert last.response_metadata["relay"]["user_budget"]["remaining_teacher_tokens"] == 0
