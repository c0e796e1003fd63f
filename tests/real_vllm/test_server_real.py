"""The relay server in front of the tiny pair on real vLLM servers, through the openai SDK.

Token counts are checked against the vLLM servers' own counters (Prometheus ``/metrics``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relay_agents import Budget
from relay_agents.tiny import tasks
from tests.real_vllm.test_relay_real import counter
from tests.server_support import sdk, serving

pytestmark = pytest.mark.real_vllm


@pytest.fixture(scope="module")
def problems() -> list[tasks.Problem]:
    return tasks.eval_problems(4, seed=5)


async def test_openai_clients_get_relayed_answers(tiny_servers, problems, tmp_path: Path) -> None:
    config = tiny_servers.relay_config(budget_store=str(tmp_path / "budgets.sqlite"))
    gen = "vllm:generation_tokens_total"
    async with serving(config) as url:
        client = sdk(url, timeout=120.0)
        before = counter(tiny_servers.student, gen) + counter(tiny_servers.teacher, gen)
        replies = [
            await client.chat.completions.create(
                model="relay", messages=[{"role": "user", "content": p.question}]
            )
            for p in problems
        ]
        after = counter(tiny_servers.student, gen) + counter(tiny_servers.teacher, gen)
        streamed = []
        for p in problems[:2]:
            stream = await client.chat.completions.create(
                model="relay",
                messages=[{"role": "user", "content": p.question}],
                stream=True,
                stream_options={"include_usage": True},
            )
            streamed.append([chunk async for chunk in stream])
        text = await client.completions.create(model="relay", prompt=problems[0].question)
    assert sum(r.usage.completion_tokens for r in replies) == after - before
    for p, reply in zip(problems, replies, strict=True):
        relay = reply.usage.model_extra["relay"]
        assert reply.choices[0].message.content == tasks.teacher_solution(p)
        assert tasks.is_correct(reply.choices[0].message.content, p.gold)
        assert relay["teacher_calls"] == 1 and relay["teacher_tokens"] == len(f" {p.steps[0].result}")
        spans = reply.choices[0].model_extra["relay"]["spans"]
        assert [s["source"] for s in spans] == ["student", "teacher", "student"]
    for p, reply, chunks in zip(problems, replies, streamed, strict=False):
        *choices, last = chunks
        assert "".join(c.choices[0].delta.content or "" for c in choices) == reply.choices[0].message.content
        teacher = [
            c.choices[0].delta.content
            for c in choices
            if c.choices[0].model_extra["relay"]["source"] == "teacher"
        ]
        assert "".join(teacher) == f" {p.steps[0].result}"
        assert last.usage.completion_tokens == reply.usage.completion_tokens
    assert text.choices[0].text == replies[0].choices[0].message.content


async def test_a_conversation_budget_holds_on_real_servers(tiny_servers, problems, tmp_path: Path) -> None:
    config = tiny_servers.relay_config(
        budget=Budget(max_teacher_calls=1), budget_store=str(tmp_path / "budgets.sqlite")
    )
    async with serving(config) as url:
        client = sdk(url, timeout=120.0)
        first, second = [
            await client.chat.completions.create(
                model="relay", messages=[{"role": "user", "content": p.question}], user="dana"
            )
            for p in problems[:2]
        ]
    assert first.usage.model_extra["relay"]["teacher_calls"] == 1
    assert first.usage.model_extra["relay"]["budget_remaining"]["teacher_calls"] == 0
    assert second.usage.model_extra["relay"]["teacher_calls"] == 0
    events = second.choices[0].model_extra["relay"]["events"]
    assert [e["kind"] for e in events] == ["declined_call"]
    assert "\\boxed{" in second.choices[0].message.content
