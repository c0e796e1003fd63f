"""Requests sized to the model's context window, on the scripted server (real HTTP on 127.0.0.1).

Each test gives its models their own names: a client reads an endpoint's context once, and
clients are shared by endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import httpx
import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver

from relay_agents import arelay, relay
from relay_agents.testing import ScriptedServer
from relay_agents.testing.scripted.tokens import tokenize
from relay_agents.tutor import build_tutor_graph
from relay_agents.tutor.views import message_view
from tests.conftest import endpoint, relay_config

LONG = " ".join(f"word{i}" for i in range(400))


def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"student-{tag}", f"teacher-{tag}"


def generations(server: ScriptedServer, model: str) -> list[dict]:
    return [r for r in server.requests() if r["model"] == model]


def room(request: dict, context: int) -> int:
    return context - len(tokenize(request["prompt"]))


def small_config(server: ScriptedServer, student: str, teacher: str, **kw: object):
    return relay_config(server, **kw).model_copy(
        update={"student": endpoint(server, student), "teacher": endpoint(server, teacher)}
    )


# ---- the scripted server answers as vLLM 0.32 does ------------------------------------------


def test_the_scripted_server_lists_and_enforces_a_models_context(scripted: ScriptedServer) -> None:
    scripted.context_window("small", 20)
    scripted.script("small", "", ["x"])
    listed = {m["id"]: m["max_model_len"] for m in httpx.get(f"{scripted.base_url}/models").json()["data"]}
    assert listed["small"] == 20

    def post(prompt: str, max_tokens: int) -> httpx.Response:
        body = {"model": "small", "prompt": prompt, "max_tokens": max_tokens}
        return httpx.post(f"{scripted.base_url}/completions", json=body)

    too_many = post("a b", 21)
    assert too_many.status_code == 400
    assert too_many.json()["error"] == {
        "message": "max_tokens=21 cannot be greater than max_model_len=20. Please request fewer output "
        "tokens. (parameter=max_tokens, value=21)",
        "type": "BadRequestError",
        "param": "max_tokens",
        "code": 400,
    }
    full = post(" a" * 20, 1)
    assert full.status_code == 400 and full.json()["error"]["message"] == (
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
    )
    over = post(" a" * 21, 1)
    assert over.status_code == 400
    assert "your prompt contains 21 input tokens, which exceeds this limit" in over.json()["error"]["message"]
    cut = post(" a" * 18, 20)  # vLLM cuts max_tokens to the room after the prompt
    assert cut.status_code == 200 and cut.json()["usage"]["completion_tokens"] <= 2


# ---- the student ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_answer_that_fills_the_context_ends_as_length(scripted: ScriptedServer, mode: str) -> None:
    student, teacher = names()
    scripted.context_window(student, 120)
    scripted.script(student, "Q-fill", [LONG])
    config = small_config(scripted, student, teacher)
    question = "Q-fill: tell me everything."
    result = await (
        asyncio.to_thread(relay, question, config) if mode == "sync" else arelay(question, config)
    )

    assert result.finish_reason == "length"
    assert [e.kind for e in result.events] == ["context_full"]
    assert "context window is full" in result.events[0].message
    assert result.text and LONG.startswith(result.text.strip())
    (request,) = generations(scripted, student)
    assert 1 <= request["body"]["max_tokens"] == room(request, 120)


async def test_a_prompt_that_fills_the_context_sends_nothing(scripted: ScriptedServer) -> None:
    student, teacher = names()
    scripted.context_window(student, 30)
    config = small_config(scripted, student, teacher)
    result = await arelay("Q-long: " + "many words " * 40, config)

    assert (result.text, result.finish_reason) == ("", "length")
    assert [e.kind for e in result.events] == ["context_full"]
    assert generations(scripted, student) == []


async def test_each_turn_is_sized_to_the_room_left(scripted: ScriptedServer) -> None:
    student, teacher = names()
    scripted.context_window(student, 100)
    scripted.script(student, "Q-turns", ["Let me ask. <call>8</call>", LONG])
    scripted.script(teacher, "Q-turns", [" the teacher writes more than eight tokens here, and more"])
    config = small_config(scripted, student, teacher, max_answer_tokens=90)
    result = await arelay("Q-turns: go on.", config)

    assert result.finish_reason == "length" and result.usage.teacher_calls == 1
    assert result.events[-1].kind == "context_full"
    first, second = generations(scripted, student)
    assert 1 <= first["body"]["max_tokens"] == room(first, 100) < 90
    left = 90 - result.usage.teacher_tokens - result.spans[0].tokens
    assert 1 <= second["body"]["max_tokens"] == room(second, 100) < left


async def test_the_configured_context_overrides_the_listed_one(scripted: ScriptedServer) -> None:
    student, teacher = names()
    scripted.script(student, "Q-set", [LONG])
    config = small_config(scripted, student, teacher)
    config = config.model_copy(update={"student": endpoint(scripted, student, max_model_len=90)})
    result = await arelay("Q-set: go.", config)

    assert result.finish_reason == "length" and result.events[-1].kind == "context_full"
    (request,) = generations(scripted, student)
    assert request["body"]["max_tokens"] == room(request, 90)


async def test_a_cap_above_the_context_is_cut_with_one_warning(
    scripted: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    student, teacher = names()
    scripted.context_window(student, 200)
    scripted.script(student, "Q-cap", ["A short answer."], repeat=True)
    config = small_config(scripted, student, teacher)  # max_answer_tokens: 8192
    with caplog.at_level(logging.WARNING, logger="relay_agents.clients"):
        for _ in range(3):
            result = await arelay("Q-cap: hi", config)
            assert result.text == "A short answer." and result.finish_reason == "stop"
    warnings = [r.getMessage() for r in caplog.records if r.name == "relay_agents.clients"]
    assert len(warnings) == 1
    assert "context of 200 tokens, fewer than the 8192" in warnings[0]
    assert "RELAY_MAX_ANSWER_TOKENS" in warnings[0]
    assert all(r["body"]["max_tokens"] == room(r, 200) for r in generations(scripted, student))


# ---- the teacher ---------------------------------------------------------------------------


async def test_a_call_cut_by_the_teachers_context_is_reported(scripted: ScriptedServer) -> None:
    student, teacher = names()
    scripted.script(student, "Q-cut", ["Ask: <call>50</call>", " done."])
    scripted.script(teacher, "Q-cut", [LONG])
    scripted.context_window(teacher, 70)  # room for fewer than 50 after the teacher's prompt
    config = small_config(scripted, student, teacher)
    result = await arelay("Q-cut: ask.", config)

    (request,) = generations(scripted, teacher)
    fitted = room(request, 70)
    assert 1 <= request["body"]["max_tokens"] == fitted < 50
    cut = next(e for e in result.events if e.kind == "truncated_call")
    assert (cut.requested, cut.granted, cut.reason) == (50, fitted, "context_tokens")
    assert result.usage.teacher_tokens == fitted


async def test_a_call_the_teachers_context_has_no_room_for_is_declined(scripted: ScriptedServer) -> None:
    student, teacher = names()
    scripted.script(student, "Q-none", ["Ask: <call>5</call>", " alone then."])
    scripted.script(teacher, "Q-none", [" never"])
    scripted.context_window(teacher, 10)
    result = await arelay("Q-none: ask.", small_config(scripted, student, teacher))

    assert generations(scripted, teacher) == []
    declined = next(e for e in result.events if e.kind == "declined_call")
    assert declined.reason == "context_full" and "the teacher's context is full" in declined.message
    assert result.text == "Ask:  alone then." and result.usage.teacher_calls == 0  # as a failed call


# ---- the tutor -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_the_tutor_drops_the_oldest_turns_to_fit_the_context(
    scripted: ScriptedServer, mode: str
) -> None:
    student, teacher = names()
    scripted.context_window(student, 160)
    scripted.script(student, "", [" ".join(["step"] * 30) + " done."], repeat=True)
    config = small_config(scripted, student, teacher, max_answer_tokens=60)
    graph = build_tutor_graph(config, checkpointer=InMemorySaver(), system_prompt=None)
    run = {"configurable": {"thread_id": uuid.uuid4().hex}}
    replies = []
    for turn in range(4):
        question = {"messages": [HumanMessage(f"Question {turn}: what is {turn} + {turn}?")]}
        state = await (
            asyncio.to_thread(graph.invoke, question, run) if mode == "sync" else graph.ainvoke(question, run)
        )
        replies.append(message_view(state["messages"][-1]))

    assert all(r["finish_reason"] == "stop" for r in replies)
    prompts = [r["prompt"] for r in generations(scripted, student)]
    assert all(len(tokenize(p)) <= 160 - 60 for p in prompts)
    assert "Question 0" in prompts[1] and "Question 0" not in prompts[-1]
    notices = [n["text"] for r in replies for n in r["notices"]]
    assert any(
        "oldest messages of this conversation were left out" in n and "160-token" in n for n in notices
    )
    assert replies[0]["notices"] == []
