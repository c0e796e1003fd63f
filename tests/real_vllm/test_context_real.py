"""Conversations that fill the tiny pair's 512-token context, answered without an error.

The tiny student, under the tutor's system prompt, writes each answer up to its 256-token cap,
so the second question alone brings the conversation past 512 tokens.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver

from relay_agents.graph import relay_prompt
from relay_agents.tiny import tasks
from relay_agents.tiny.servers import TINY_MAX_ANSWER_TOKENS
from relay_agents.tutor import build_tutor_graph
from relay_agents.tutor.views import message_view
from tests.server_support import sdk, serving

pytestmark = pytest.mark.real_vllm

CONTEXT = 512


async def test_the_tutor_answers_turns_that_fill_the_context(tiny_servers) -> None:
    graph = build_tutor_graph(tiny_servers.relay_config(), checkpointer=InMemorySaver())
    run = {"configurable": {"thread_id": uuid.uuid4().hex}}
    replies = []
    for turn, problem in enumerate(tasks.eval_problems(4, seed=11)):
        question = {"messages": [HumanMessage(problem.question)]}
        if turn % 2:  # both paths: sync turns in a worker thread, async turns in the loop
            state = await asyncio.to_thread(graph.invoke, question, run)
        else:
            state = await graph.ainvoke(question, run)
        replies.append(message_view(state["messages"][-1]))

    assert all(r["finish_reason"] in ("stop", "length") and r["text"] for r in replies)
    written = sum(r["usage"]["student_tokens"] + r["usage"]["teacher_tokens"] for r in replies)
    assert written > CONTEXT  # the conversation outgrew the context
    # each student request's prompt (vLLM's own count) left the answer its cap
    for r in replies:
        turns = max(1, r["usage"]["teacher_calls"] + 1)
        assert r["usage"]["student_prompt_tokens"] / turns <= CONTEXT - TINY_MAX_ANSWER_TOKENS
    notices = [n["text"] for r in replies[1:] for n in r["notices"]]
    assert any("were left out of the prompt to fit the student's 512-token context" in n for n in notices)


def conversation(earlier: int, question: str) -> list[dict[str, str]]:
    """A conversation whose earlier answer has ``earlier`` sentences, then ``question``."""
    answer = " ".join(f"Step {i} adds {i} to the total." for i in range(earlier))
    return [
        {"role": "user", "content": "Explain the last problem in full."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": question},
    ]


def relay_prompt_tokens(servers, config, messages: list[dict[str, str]]) -> int:
    """The tokens of the relay's prompt for ``messages``, counted by the student's vLLM."""
    body = {"model": servers.student.model, "messages": relay_prompt(config, messages)}
    return httpx.post(f"{servers.student.root_url}/tokenize", json=body, timeout=30).json()["count"]


async def test_serve_answers_conversations_that_fill_the_context(tiny_servers, tmp_path: Path) -> None:
    config = tiny_servers.relay_config(budget_store=str(tmp_path / "budgets.sqlite"))
    question = tasks.eval_problems(1, seed=3)[0].question
    sentences = 0  # the longest conversation that leaves the answer fewer than 12 tokens
    while relay_prompt_tokens(tiny_servers, config, conversation(sentences + 1, question)) <= CONTEXT - 12:
        sentences += 1
    near = conversation(sentences, question)
    room = CONTEXT - relay_prompt_tokens(tiny_servers, config, near)
    over = conversation(sentences * 2, question)
    assert 12 <= room < TINY_MAX_ANSWER_TOKENS and relay_prompt_tokens(tiny_servers, config, over) > CONTEXT

    async with serving(config) as url:
        client = sdk(url, timeout=120.0)
        nearly = await client.chat.completions.create(model="relay", messages=near)
        full = await client.chat.completions.create(model="relay", messages=over)
        stream = await client.chat.completions.create(model="relay", messages=over, stream=True)
        chunks = [chunk async for chunk in stream]

    # a prompt that leaves a little room: the answer ends when the context is full
    assert nearly.choices[0].finish_reason == "length" and nearly.choices[0].message.content
    assert nearly.usage.completion_tokens <= room
    assert [e["kind"] for e in nearly.choices[0].model_extra["relay"]["events"]][-1:] == ["context_full"]
    # a prompt past the context: an empty answer that says so, not an error
    assert (full.choices[0].finish_reason, full.choices[0].message.content) == ("length", "")
    assert [e["kind"] for e in full.choices[0].model_extra["relay"]["events"]] == ["context_full"]
    assert chunks[-1].choices[0].finish_reason == "length"
