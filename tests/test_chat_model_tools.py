"""ChatRelay with tools against the scripted server: calls written across the relay, the loop
back, streaming, tool_choice, structured output and a create_agent agent with a checkpointer."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel

from relay_agents import Budget, ChatRelay, ToolChoiceUnmet, arelay
from relay_agents.testing import ScriptedServer
from tests.conftest import TOOLS_CHATML, relay_config


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def tools_chat(server: ScriptedServer, teacher: dict[str, Any] | None = None, **kw: Any) -> ChatRelay:
    config = relay_config(
        server,
        student={"chat_template": TOOLS_CHATML},
        teacher={"chat_template": TOOLS_CHATML, **(teacher or {})},
        **kw,
    )
    return ChatRelay(config=config)


def script_call(server: ScriptedServer, key: str) -> None:
    """The student names the tool and calls the teacher for the hard argument (5 tokens)."""
    server.script(
        "student",
        key,
        ['<tool_call>\n{"name": "multiply", "arguments": {"a": <call>5</call>', ' "b": 12}}\n</tool_call>'],
    )
    server.script("teacher", key, [" 1234, 99999"])


def test_a_call_written_across_the_relay(scripted: ScriptedServer) -> None:
    script_call(scripted, "Q-tool")
    reply = tools_chat(scripted).bind_tools([multiply]).invoke("Q-tool")
    assert reply.tool_calls == [
        {
            "name": "multiply",
            "args": {"a": 1234, "b": 12},
            "id": reply.tool_calls[0]["id"],
            "type": "tool_call",
        }
    ]
    assert reply.content == "" and reply.invalid_tool_calls == []
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    spans = reply.response_metadata["relay"]["spans"]
    assert [s["source"] for s in spans] == ["student", "teacher", "student"]
    assert spans[1]["text"] == " 1234,"  # the teacher's part stays recorded
    student = [r for r in scripted.requests() if r["model"] == "student"]
    teacher = [r for r in scripted.requests() if r["model"] == "teacher"]
    for request in (student[0], teacher[0]):  # both models see the tools through their template
        assert '"name": "multiply"' in request["prompt"] and "# Tools" in request["prompt"]
    assert "<call>" not in teacher[0]["prompt"].split("<|im_start|>assistant\n")[-1]


async def test_abatch_shows_the_tools_and_parses_each_answers_call(scripted: ScriptedServer) -> None:
    """The batch path (``ChatRelay.abatch``) relays with the bound tools as ``ainvoke`` does."""
    for key in ("Q-tool-a", "Q-tool-b"):
        script_call(scripted, key)
    replies = await tools_chat(scripted).bind_tools([multiply]).abatch(["Q-tool-a", "Q-tool-b"])
    for reply in replies:
        assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("multiply", {"a": 1234, "b": 12})]
        assert reply.response_metadata["finish_reason"] == "tool_calls"
    prompts = [r["prompt"] for r in scripted.requests() if r["model"] == "student"]
    shown = [p for prompt in prompts for p in (prompt if isinstance(prompt, list) else [prompt])]
    assert len(shown) == 4 and all('"name": "multiply"' in p for p in shown)


def test_a_malformed_call_is_an_invalid_tool_call(scripted: ScriptedServer) -> None:
    scripted.script(
        "student",
        "Q-bad",
        ['Let me compute. <tool_call>{"name": "multiply", "arguments": {"a": 2,, }}</tool_call>'],
    )
    reply = tools_chat(scripted).bind_tools([multiply]).invoke("Q-bad")
    assert reply.content == "Let me compute." and reply.tool_calls == []
    [invalid] = reply.invalid_tool_calls
    assert invalid["name"] == "multiply" and invalid["args"] == '{"a": 2,, }' and "JSON" in invalid["error"]


async def test_the_stream_carries_tool_call_chunks(scripted: ScriptedServer) -> None:
    model = tools_chat(scripted).bind_tools([multiply])
    script_call(scripted, "Q-stream")
    whole = await model.ainvoke("Q-stream")
    for run in ("sync", "async"):
        script_call(scripted, "Q-stream")
        if run == "sync":
            chunks = list(model.stream("Q-stream"))
        else:
            chunks = [c async for c in model.astream("Q-stream")]
        pieces = [c for c in chunks if c.tool_call_chunks]
        assert len(pieces) > 3  # the arguments arrive as they are written
        assert pieces[0].tool_call_chunks[0]["name"] == "multiply"
        assert all(p.tool_call_chunks[0]["name"] is None for p in pieces[1:])
        total: AIMessageChunk = chunks[0]
        for chunk in chunks[1:]:
            total += chunk
        assert [(c["name"], c["args"]) for c in total.tool_calls] == [("multiply", {"a": 1234, "b": 12})]
        assert total.content == whole.content == ""
        assert total.response_metadata["finish_reason"] == "tool_calls"
        sources = {c.response_metadata["relay_sources"][0] for c in pieces}
        assert sources == {"student", "teacher"}


def test_tool_results_reach_both_models(scripted: ScriptedServer) -> None:
    """The loop back: the call and its result are rendered by the student's template, and a
    chat-instruct teacher gets them as text, with the tools listed in its instruction."""
    scripted.script("student", "<tool_response>", ["The product is <call>5</call>", "."])
    scripted.script("teacher", "result of tool call", [" 14808 indeed"])
    model = tools_chat(scripted, teacher={"api": "chat-instruct"}).bind_tools([multiply])
    call = {"name": "multiply", "args": {"a": 1234, "b": 12}, "id": "call_1", "type": "tool_call"}
    history = [
        HumanMessage("Q-loop"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("14808", tool_call_id="call_1"),
    ]
    reply = model.invoke(history)
    assert reply.content == "The product is 14808." and reply.tool_calls == []
    student = next(r for r in scripted.requests() if r["model"] == "student")
    assert (
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 1234, "b": 12}}\n</tool_call>'
        in student["prompt"]
    )
    assert "<tool_response>\n14808\n</tool_response>" in student["prompt"]
    teacher = next(r for r in scripted.requests() if r["model"] == "teacher")
    messages = teacher["body"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "user"]
    assert "called tool multiply" in messages[1]["content"] and "14808" in messages[2]["content"]
    assert '"name": "multiply"' in messages[3]["content"] and "The product is" in messages[3]["content"]
    assert "tools" not in teacher["body"]


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_the_server_renders_the_tools_without_a_local_template(scripted: ScriptedServer, api: str) -> None:
    """A chat student gets ``tools`` (with ``tool_choice: "none"``: the relay parses) and its
    server renders them; a completions student without a local template has its prompt rendered
    by the server's /tokenize, tools, the call and the result included."""
    call = {"name": "multiply", "args": {"a": 2, "b": 3}, "id": "call_7", "type": "tool_call"}
    history = [
        HumanMessage("Q-server-render"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("6", tool_call_id="call_7"),
    ]
    scripted.script(
        "student",
        "Q-server-render",
        ['<tool_call>{"name": "multiply", "arguments": {"a": 6, "b": 7}}</tool_call>'],
    )
    config = relay_config(scripted, student={"api": api, "chat_template": None})
    reply = ChatRelay(config=config).bind_tools([multiply]).invoke(history)
    assert reply.tool_calls[0]["args"] == {"a": 6, "b": 7}
    request = next(r for r in scripted.requests() if r["model"] == "student" and r["path"].startswith("/v1/"))
    if api == "chat":
        assert request["body"]["tools"][0]["function"]["name"] == "multiply"
        assert request["body"]["tool_choice"] == "none"
    prompt = request["prompt"]
    assert '"name": "multiply"' in prompt and "# Tools" in prompt
    assert '<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in prompt
    assert "<tool_response>\n6\n</tool_response>" in prompt


def test_tool_choice(scripted: ScriptedServer) -> None:
    scripted.configure(default_response="Just text <tool_call>{}</tool_call>")
    scripted.script("student", "Q-text", ["Plain text, no call."] * 2)
    model = tools_chat(scripted)
    # none: the tools are not shown and nothing is parsed
    reply = model.bind_tools([multiply], tool_choice="none").invoke("Q-none")
    assert reply.content == "Just text <tool_call>{}</tool_call>" and reply.invalid_tool_calls == []
    assert "# Tools" not in scripted.requests()[-1]["prompt"]
    # required / named, unmet: reported, not asked again
    for choice in ("any", "multiply"):
        with pytest.raises(ToolChoiceUnmet, match="required"):
            model.bind_tools([multiply], tool_choice=choice).invoke("Q-text")
    with pytest.raises(ValueError, match="not among the tools"):
        model.bind_tools([multiply], tool_choice="divide")


def test_mistral_format(scripted: ScriptedServer) -> None:
    scripted.script(
        "student", "Q-mistral", ['[TOOL_CALLS][{"name": "multiply", "arguments": {"a": 6, "b": 7}}]']
    )
    model = tools_chat(scripted, tool_parser="mistral").bind_tools([multiply])
    assert model.invoke("Q-mistral").tool_calls[0]["args"] == {"a": 6, "b": 7}


class Product(BaseModel):
    """A product of two numbers."""

    value: int


def test_structured_output_through_a_tool_call(scripted: ScriptedServer) -> None:
    scripted.script(
        "student",
        "Q-struct",
        ['<tool_call>{"name": "Product", "arguments": {"value": <call>3</call>', "}}</tool_call>"],
    )
    scripted.script("teacher", "Q-struct", [" 408 ..."])
    structured = tools_chat(scripted).with_structured_output(Product, method="function_calling")
    assert structured.invoke("Q-struct") == Product(value=408)


def test_create_agent_with_a_checkpointer_budget_per_thread(scripted: ScriptedServer) -> None:
    """Two turns of one thread: question -> call (teacher writes an argument) -> tool -> answer;
    the conversation budget (2 teacher calls) spans every model call of the thread."""
    ran: list[tuple[int, int]] = []

    @tool
    def times(a: int, b: int) -> int:
        """Multiply two integers."""
        ran.append((a, b))
        return a * b

    def script_turn(turn: str) -> None:
        call = '<tool_call>{"name": "times", "arguments": {"a": <call>3</call>'
        scripted.script("student", f"{turn}-question", [call, ' "b": 2}}</tool_call>'])
        scripted.script("teacher", f"{turn}-question", [" 21, extra"])

    script_turn("T1")
    scripted.script("student", "<tool_response>\n42", ["It is <call>2</call>", " (computed)."])
    scripted.script("teacher", "<tool_response>\n42", [" 42 indeed"])
    model = tools_chat(scripted, budget=Budget(max_teacher_calls=2))
    agent = create_agent(model=model, tools=[times], checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": f"agent-{uuid.uuid4().hex}"}}
    first = agent.invoke({"messages": [HumanMessage("T1-question")]}, thread)
    names = [type(m).__name__ for m in first["messages"]]
    assert names == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert ran == [(21, 2)] and first["messages"][-1].content == "It is 42 (computed)."
    budgets = [m.response_metadata["relay"]["budget"] for m in first["messages"] if isinstance(m, AIMessage)]
    assert [b["remaining_teacher_calls"] for b in budgets] == [1, 0]
    # the second turn: the thread's budget is spent, so the student writes the argument itself
    script_turn("T2")
    second = agent.invoke({"messages": [HumanMessage("T2-question")]}, thread)
    assert len(second["messages"]) == 6
    call = second["messages"][5]
    assert isinstance(call, AIMessage) and call.invalid_tool_calls and not call.tool_calls
    assert json.dumps(call.invalid_tool_calls[0]["args"]).count("<call>") == 0
    assert call.response_metadata["relay"]["usage"]["teacher_calls"] == 0


async def test_arelay_shows_the_tools_and_leaves_the_calls_in_the_text(scripted: ScriptedServer) -> None:
    scripted.script(
        "student", "Q-api", ['<tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 3}}</tool_call>']
    )
    config = relay_config(scripted, student={"chat_template": TOOLS_CHATML})
    tools = [convert_to_openai_tool(multiply)]
    result = await arelay("Q-api", config, tools=tools)
    assert result.text == '<tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 3}}</tool_call>'
    assert '"name": "multiply"' in scripted.requests()[-1]["prompt"]
