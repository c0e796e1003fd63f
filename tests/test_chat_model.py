"""ChatRelay against the scripted server: invoke, ainvoke, stream, astream, stop, bind, errors."""

from __future__ import annotations

import asyncio

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph

from relay_agents import ChatRelay, arelay
from relay_agents.testing import ScriptedServer
from tests.conftest import endpoint, relay_config


def script(server: ScriptedServer, key: str = "Q-chat") -> None:
    server.script("student", key, ["First <call>3</call>", " then done."])
    server.script("teacher", key, [" 1 2 3 4"])


def chat(server: ScriptedServer, **kw: object) -> ChatRelay:
    return ChatRelay(config=relay_config(server), **kw)


async def expected(server: ScriptedServer, key: str = "Q-chat") -> str:
    script(server, key)
    result = await arelay(key, relay_config(server))
    return result.text


async def test_invoke_returns_the_relay_text_usage_and_metadata(scripted: ScriptedServer) -> None:
    text = await expected(scripted)
    script(scripted)
    reply = chat(scripted).invoke("Q-chat")
    assert isinstance(reply, AIMessage)
    assert reply.text == text and "<call>" not in text and " 1 2 3" in text
    relay = reply.response_metadata["relay"]
    assert [s["source"] for s in relay["spans"]] == ["student", "teacher", "student"]
    usage = relay["usage"]
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] == usage["student_tokens"] + usage["teacher_tokens"]
    assert (
        reply.usage_metadata["input_tokens"]
        == usage["student_prompt_tokens"] + usage["teacher_prompt_tokens"]
    )
    assert usage["teacher_tokens"] == 3
    assert reply.response_metadata["model_name"] == "student"


async def test_ainvoke_matches(scripted: ScriptedServer) -> None:
    text = await expected(scripted)
    script(scripted)
    reply = await chat(scripted).ainvoke([SystemMessage("Be brief."), HumanMessage("Q-chat")])
    assert reply.text == text
    assert reply.response_metadata["relay"]["usage"]["teacher_calls"] == 1


def _check_chunks(chunks: list[AIMessageChunk], text: str) -> None:
    assert "".join(c.text for c in chunks) == text
    sources = [c.response_metadata["relay_sources"][0] for c in chunks if c.text]
    assert "teacher" in sources and sources[0] == "student"
    teacher_text = "".join(
        c.text for c in chunks if c.text and c.response_metadata["relay_sources"] == ["teacher"]
    )
    assert teacher_text == " 1 2 3"
    with_usage = [c for c in chunks if c.usage_metadata]
    assert with_usage == [chunks[-1]]
    last = chunks[-1]
    assert last.chunk_position == "last" and "relay" in last.response_metadata
    usage = last.response_metadata["relay"]["usage"]
    assert last.usage_metadata["output_tokens"] == usage["student_tokens"] + usage["teacher_tokens"]
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.text == text and full.usage_metadata == last.usage_metadata


async def test_stream_yields_marked_chunks_that_add_up(scripted: ScriptedServer) -> None:
    text = await expected(scripted)
    script(scripted)
    chunks = list(chat(scripted).stream("Q-chat"))
    assert len([c for c in chunks if c.text]) > 3  # token by token, not one whole reply
    _check_chunks(chunks, text)


async def test_astream_yields_marked_chunks_that_add_up(scripted: ScriptedServer) -> None:
    text = await expected(scripted)
    script(scripted)
    chunks = [c async for c in chat(scripted).astream("Q-chat")]
    _check_chunks(chunks, text)


async def test_streaming_true_invoke_gives_the_same_reply(scripted: ScriptedServer) -> None:
    text = await expected(scripted)
    script(scripted)
    reply = await chat(scripted, streaming=True).ainvoke("Q-chat")
    assert reply.text == text and "relay" in reply.response_metadata


async def test_stop_sequences_cut_the_reply_and_the_stream(scripted: ScriptedServer) -> None:
    text = await expected(scripted)
    cut = text[: text.index(" 2")]
    script(scripted)
    reply = chat(scripted).invoke("Q-chat", stop=[" 2"])
    assert reply.text == cut and reply.response_metadata["stop_sequence"] == " 2"
    script(scripted)
    chunks = [c async for c in chat(scripted, stop=[" 2", "zzz"]).astream("Q-chat")]
    assert "".join(c.text for c in chunks) == cut
    assert chunks[-1].response_metadata["finish_reason"] == "stop"
    assert chunks[-1].response_metadata["relay"]["usage"]["teacher_tokens"] == 3  # whole relay ran


async def test_bind_reaches_the_call(scripted: ScriptedServer) -> None:
    scripted.configure(default_response="Hi there.")
    model = chat(scripted).bind(conversation_id="conv-7")
    reply = await model.ainvoke("hello")
    assert reply.response_metadata["conversation_id"] == "conv-7"
    chunks = list(model.stream("hello"))
    assert chunks[-1].response_metadata["conversation_id"] == "conv-7"


async def test_model_override_per_call(scripted: ScriptedServer) -> None:
    scripted.configure(default_response="Hi there.")
    reply = await chat(scripted).ainvoke("hello", model="other-student")
    assert reply.response_metadata["model_name"] == "other-student"
    assert [r["model"] for r in scripted.requests() if "completions" in r["path"]] == ["other-student"]
    ls = chat(scripted)._get_ls_params(model="other-student")
    assert ls["ls_model_name"] == "other-student" and ls["ls_provider"] == "relay"


def test_fields_build_the_config(scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_STUDENT_API_KEY", "from-env")
    teacher = endpoint(scripted, "teacher")
    model = ChatRelay(
        model="student",
        base_url=scripted.base_url,
        teacher=teacher,
        temperature=0.3,
        max_tokens=50,
        timeout=7,
        max_retries=1,
        student_options={"chat_template": "{{ messages[-1]['content'] }}"},
        relay_options={"user_template": "{question}"},
    )
    config = model.relay_config
    assert config is not None
    assert config.student.api_key.get_secret_value() == "from-env"
    assert (config.student.temperature, config.student.timeout, config.student.max_retries) == (0.3, 7, 1)
    assert config.max_answer_tokens == 50 and config.teacher == teacher
    assert config.user_template == "{question}"
    scripted.configure(default_response="Plain answer.")
    assert model.invoke("hi").text == "Plain answer."
    # explicit fields override a given config
    over = ChatRelay(config=relay_config(scripted), model="s2", max_tokens=9, api_key="k")
    assert over.relay_config.student.model == "s2" and over.relay_config.max_answer_tokens == 9
    assert over.relay_config.student.api_key.get_secret_value() == "k"
    with pytest.raises(ValueError, match="teacher"):
        ChatRelay(model="s", base_url=scripted.base_url)


async def test_student_errors_propagate(scripted: ScriptedServer) -> None:
    scripted.faults("student", ["400"])
    with pytest.raises(openai.BadRequestError):
        await chat(scripted).ainvoke("hello")
    scripted.faults("student", ["400"])
    with pytest.raises(openai.BadRequestError):
        list(chat(scripted).stream("hello"))


async def test_inside_a_user_graph_with_a_checkpointer(scripted: ScriptedServer) -> None:
    """The relay graph stays private to the call: no subgraph checkpoints, no duplicated history."""
    scripted.configure(default_response="Noted.")
    model = chat(scripted)

    async def call(state: MessagesState) -> dict:
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("call", call)
    builder.add_edge(START, "call")
    graph = builder.compile(checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "t"}}
    await graph.ainvoke({"messages": [HumanMessage("one")]}, thread)
    state = await graph.ainvoke({"messages": [HumanMessage("two")]}, thread)
    assert [m.text for m in state["messages"]] == ["one", "Noted.", "two", "Noted."]
    student = [r for r in scripted.requests() if r["model"] == "student"]
    assert student[-1]["prompt"].count("one") == 1
    tokens = [
        chunk.content
        async for chunk, _ in graph.astream(
            {"messages": [HumanMessage("three")]}, thread, stream_mode="messages"
        )
    ]
    assert "".join(tokens) == "Noted."


async def test_leaving_an_astream_early_cancels_the_upstream_request(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-leave", [" ".join(f"w{i}" for i in range(400))])
    scripted.configure(token_interval_s=0.01)
    stream = chat(scripted).astream("Q-leave")
    first = await anext(stream)
    assert first.text and first.response_metadata["relay_sources"] == ["student"]
    await stream.aclose()
    deadline = asyncio.get_running_loop().time() + 2
    student = [r for r in scripted.requests() if r["model"] == "student"]
    while not student[0]["disconnected"]:
        assert asyncio.get_running_loop().time() < deadline, "the upstream request was not cancelled"
        await asyncio.sleep(0.02)
        student = [r for r in scripted.requests() if r["model"] == "student"]
