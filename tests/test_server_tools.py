"""Tool calling through the relay server with the official ``openai`` client: the whole and the
streamed flow (call -> tool result -> answer), malformed calls and ``tool_choice``."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from relay_agents.testing import ScriptedServer
from tests.conftest import TOOLS_CHATML, relay_config
from tests.server_support import sdk, serving

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "multiply",
            "description": "Multiply two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]
QUESTION = [{"role": "user", "content": "Q-tools: what is 1234 * 12?"}]


def config(scripted: ScriptedServer) -> Any:
    return relay_config(
        scripted, student={"chat_template": TOOLS_CHATML}, teacher={"chat_template": TOOLS_CHATML}
    )


def script_call(scripted: ScriptedServer) -> None:
    """The student writes the call; the teacher writes the hard argument (5 tokens)."""
    call = '<tool_call>\n{"name": "multiply", "arguments": {"a": <call>5</call>'
    scripted.script("student", "Q-tools", [call, ' "b": 12}}\n</tool_call>'])
    scripted.script("teacher", "Q-tools", [" 1234, 99999"])


def script_answer(scripted: ScriptedServer) -> None:
    scripted.script("student", "<tool_response>\n14808", ["1234 * 12 = <call>5</call>", "."])
    scripted.script("teacher", "<tool_response>\n14808", [" 14808 indeed"])


def history(call_id: str, arguments: str) -> list[Any]:
    call = {"id": call_id, "type": "function", "function": {"name": "multiply", "arguments": arguments}}
    return [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "14808"},
    ]


async def test_the_tool_calling_flow_whole(scripted: ScriptedServer) -> None:
    async with serving(config(scripted)) as url:
        client = sdk(url)
        script_call(scripted)
        reply = await client.chat.completions.create(model="relay", messages=QUESTION, tools=TOOLS)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name == "multiply"
        assert json.loads(call.function.arguments) == {"a": 1234, "b": 12}
        spans = choice.model_extra["relay"]["spans"]
        assert [(s["source"], s["text"]) for s in spans][1] == ("teacher", " 1234,")
        student = next(r for r in scripted.requests() if r["model"] == "student")
        assert '"name": "multiply"' in student["prompt"]  # the tools reached its template
        # the result goes back; the relay answers in text
        script_answer(scripted)
        final = await client.chat.completions.create(
            model="relay", messages=history(call.id, call.function.arguments), tools=TOOLS
        )
        assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
        assert final.choices[0].message.content == "1234 * 12 = 14808."
        prompt = [r for r in scripted.requests() if r["model"] == "student"][-1]["prompt"]
        assert '"arguments": {"a": 1234, "b": 12}' in prompt and "<tool_response>\n14808" in prompt


async def test_the_tool_calling_flow_streamed(scripted: ScriptedServer) -> None:
    async with serving(config(scripted)) as url:
        client = sdk(url)
        script_call(scripted)
        stream = await client.chat.completions.create(
            model="relay", messages=QUESTION, tools=TOOLS, stream=True
        )
        calls: dict[int, dict[str, str]] = {}
        pieces, finish = 0, None
        async for chunk in stream:
            choice = chunk.choices[0]
            for delta in choice.delta.tool_calls or []:
                pieces += 1
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += (delta.function and delta.function.name) or ""
                call["arguments"] += (delta.function and delta.function.arguments) or ""
            assert not choice.delta.content
            finish = choice.finish_reason or finish
        assert finish == "tool_calls" and pieces > 3  # the arguments stream as they are written
        [call] = calls.values()
        assert call["name"] == "multiply" and json.loads(call["arguments"]) == {"a": 1234, "b": 12}
        script_answer(scripted)
        stream = await client.chat.completions.create(
            model="relay", messages=history(call["id"], call["arguments"]), tools=TOOLS, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "1234 * 12 = 14808."


MALFORMED = 'Computing. <tool_call>{"name": "multiply", "arguments": {"a": 2,, "b": 3}}</tool_call>'


async def test_a_malformed_call_whole_and_streamed(scripted: ScriptedServer) -> None:
    async with serving(config(scripted)) as url:
        client = sdk(url)
        scripted.script("student", "Q-tools", [MALFORMED, MALFORMED])
        reply = await client.chat.completions.create(model="relay", messages=QUESTION, tools=TOOLS)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Computing."
        [call] = choice.message.tool_calls or []
        assert call.function.name == "multiply" and call.function.arguments == '{"a": 2,, "b": 3}'
        [invalid] = choice.model_extra["relay"]["invalid_tool_calls"]
        assert invalid["id"] == call.id and "JSON" in invalid["error"]
        stream = await client.chat.completions.create(
            model="relay", messages=QUESTION, tools=TOOLS, stream=True
        )
        arguments, text, last = "", "", None
        async for chunk in stream:
            choice = chunk.choices[0]
            text += choice.delta.content or ""
            arguments += "".join(
                (d.function and d.function.arguments) or "" for d in choice.delta.tool_calls or []
            )
            last = choice
        assert text == "Computing." and arguments == '{"a": 2,, "b": 3}'
        assert last is not None and last.finish_reason == "tool_calls"
        assert last.model_extra["relay"]["invalid_tool_calls"][0]["args"] == arguments
        # sent back with the tool's error, the malformed call reaches the student as written
        scripted.script("student", "not JSON", ["Sorry, the call was malformed."])
        reply = await client.chat.completions.create(
            model="relay",
            messages=[
                *QUESTION,
                reply.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "Error: the arguments are not JSON"},
            ],
            tools=TOOLS,
        )
        assert reply.choices[0].message.content == "Sorry, the call was malformed."
        prompt = [r for r in scripted.requests() if r["model"] == "student"][-1]["prompt"]
        assert '"arguments": "{\\"a\\": 2,, \\"b\\": 3}"' in prompt  # the raw text, as a JSON string


async def test_tool_choice(scripted: ScriptedServer) -> None:
    scripted.configure(default_response="Plain text <tool_call>{}</tool_call>")
    async with serving(config(scripted)) as url:
        client = sdk(url)
        # none: the tools are not shown, nothing is parsed
        reply = await client.chat.completions.create(
            model="relay", messages=QUESTION, tools=TOOLS, tool_choice="none"
        )
        assert reply.choices[0].message.content == "Plain text <tool_call>{}</tool_call>"
        assert reply.choices[0].message.tool_calls is None
        assert "multiply" not in scripted.requests()[-1]["prompt"]
        # required, unmet: reported (502), whole and streamed
        scripted.script("student", "Q-tools", ["No call here."] * 2)
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(
                model="relay", messages=QUESTION, tools=TOOLS, tool_choice="required"
            )
        assert info.value.status_code == 502 and info.value.code == "tool_choice_unmet"
        stream = await client.chat.completions.create(
            model="relay", messages=QUESTION, tools=TOOLS, tool_choice="required", stream=True
        )
        with pytest.raises(openai.APIError, match="tool_choice"):
            async for _ in stream:
                pass
