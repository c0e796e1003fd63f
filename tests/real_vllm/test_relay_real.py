"""The relay engine on real tokens: the tiny pair on real vLLM servers.

Token accounting is checked against the servers' own counters (Prometheus ``/metrics``),
so nothing here trusts our own arithmetic.
"""

from __future__ import annotations

import re
import urllib.request

import pytest

from relay_agents import Budget, arelay, astream_relay, relay
from relay_agents.tiny import tasks

pytestmark = pytest.mark.real_vllm


def counter(server, name: str) -> float:
    """Sum of a Prometheus counter (all label sets) on one vLLM server."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


@pytest.fixture(scope="module")
def problems() -> list[tasks.Problem]:
    return tasks.eval_problems(6, seed=2)


async def test_relay_on_real_tokens(tiny_servers, problems) -> None:
    config = tiny_servers.relay_config()
    gen = "vllm:generation_tokens_total"
    prompt = "vllm:prompt_tokens_total"
    before = {
        "s_gen": counter(tiny_servers.student, gen),
        "t_gen": counter(tiny_servers.teacher, gen),
        "s_prompt": counter(tiny_servers.student, prompt),
        "t_prompt": counter(tiny_servers.teacher, prompt),
    }
    results = [await arelay(p.question, config) for p in problems]
    after = {
        "s_gen": counter(tiny_servers.student, gen),
        "t_gen": counter(tiny_servers.teacher, gen),
        "s_prompt": counter(tiny_servers.student, prompt),
        "t_prompt": counter(tiny_servers.teacher, prompt),
    }
    # Token accounting equals what the servers generated and read.
    assert sum(r.usage.student_tokens for r in results) == after["s_gen"] - before["s_gen"]
    assert sum(r.usage.teacher_tokens for r in results) == after["t_gen"] - before["t_gen"]
    assert sum(r.usage.student_prompt_tokens for r in results) == after["s_prompt"] - before["s_prompt"]
    assert sum(r.usage.teacher_prompt_tokens for r in results) == after["t_prompt"] - before["t_prompt"]

    for p, r in zip(problems, results, strict=True):
        assert tasks.is_correct(r.text, p.gold), r.text
        assert r.finish_reason == "stop" and r.finished_by == "student"
        assert "<call>" not in r.text and "</call>" not in r.text
        # Span boundaries: the student writes the hard step's left side, the teacher its result.
        hard = p.steps[0]
        assert [s.source for s in r.spans] == ["student", "teacher", "student"]
        assert r.spans[0].text == f"{hard.lhs} ="
        assert r.spans[1].text == f" {hard.result}"
        assert r.spans[1].tokens == r.usage.teacher_tokens == len(f" {hard.result}")
        assert r.usage.teacher_calls == 1 and 0 < r.usage.call_ratio < 0.15
        assert r.text == tasks.teacher_solution(p)


async def test_streaming_equals_non_streaming(tiny_servers, problems) -> None:
    config = tiny_servers.relay_config()
    for p in problems[:3]:
        whole = await arelay(p.question, config)
        stream = astream_relay(p.question, config)
        deltas = [d async for d in stream]
        assert "".join(d.text for d in deltas) == whole.text == stream.result.text
        assert "".join(d.text for d in deltas if d.source == "teacher") == whole.spans[1].text
        assert len(deltas) > 10  # token by token


async def test_sync_api_on_real_servers(tiny_servers, problems) -> None:
    import asyncio

    p = problems[0]
    result = await asyncio.to_thread(relay, p.question, tiny_servers.relay_config())
    assert tasks.is_correct(result.text, p.gold)


@pytest.mark.parametrize("suppression", ["bad_words", "logit_bias"])
async def test_declined_calls_are_really_suppressed(tiny_servers, problems, suppression: str) -> None:
    student = tiny_servers.relay_config().student.model_copy(update={"call_suppression": suppression})
    config = tiny_servers.relay_config(student=student, budget=Budget(max_teacher_calls=0))
    for p in problems[:3]:
        result = await arelay(p.question, config)
        assert [e.kind for e in result.events] == ["declined_call"]
        assert result.usage.teacher_calls == 0 and result.usage.teacher_tokens == 0
        assert result.finish_reason == "stop" and "<call>" not in result.text
        # The student was trained never to do the hard step itself: it writes something, then
        # carries on with the easy steps and boxes an answer.
        assert "\\boxed{" in result.text
        assert result.budget.exhausted


async def test_teacher_free_policy_blocks_calls_from_the_start(tiny_servers, problems) -> None:
    config = tiny_servers.relay_config(policy="teacher_free")
    result = await arelay(problems[0].question, config)
    assert result.events == [] and result.usage.teacher_calls == 0
    assert "\\boxed{" in result.text


async def test_budget_cuts_the_call_to_what_remains(tiny_servers, problems) -> None:
    config = tiny_servers.relay_config(budget=Budget(max_teacher_tokens=2))
    result = await arelay(problems[0].question, config)
    assert [e.kind for e in result.events] == ["truncated_call"]
    assert result.usage.teacher_tokens == 2
    assert result.spans[1].text == f" {problems[0].steps[0].result}"[:2]
    assert result.budget.remaining_teacher_tokens == 0


async def test_chat_mode_gives_the_same_answers(tiny_servers, problems) -> None:
    completions = tiny_servers.relay_config()
    chat = tiny_servers.relay_config(
        student=completions.student.model_copy(update={"api": "chat"}),
        teacher=completions.teacher.model_copy(update={"api": "chat"}),
    )
    for p in problems[:3]:
        a = await arelay(p.question, completions)
        b = await arelay(p.question, chat)
        assert b.text == a.text and [s.text for s in b.spans] == [s.text for s in a.spans]
        assert b.usage.teacher_tokens == a.usage.teacher_tokens


async def test_prompt_from_the_servers_template(tiny_servers, problems) -> None:
    local = tiny_servers.relay_config()
    remote = tiny_servers.relay_config(
        student=local.student.model_copy(update={"tokenizer_path": None}),
        teacher=local.teacher.model_copy(update={"tokenizer_path": None}),
    )
    a = await arelay(problems[1].question, local)
    b = await arelay(problems[1].question, remote)
    assert a.text == b.text and a.usage.student_prompt_tokens == b.usage.student_prompt_tokens


async def test_resume_requests_reuse_the_prefix_cache(tiny_servers) -> None:
    """Each resume re-sends the answer so far byte for byte, so vLLM serves it from its cache.

    CPU blocks hold 128 tokens, and a tiny-world prompt is ~40: an earlier solved problem as
    chat history pushes it past one block. That history confuses the tiny student (its sums go
    wrong and it calls less often), so the test takes the first conversation that calls.
    """
    config = tiny_servers.relay_config(max_answer_tokens=120)
    student = tiny_servers.student
    hits = "vllm:prefix_cache_hits_total"
    for seed in range(20, 40):
        prior = tasks.eval_problems(1, seed=seed)[0]
        messages = [
            {"role": "user", "content": prior.user_message},
            {"role": "assistant", "content": tasks.teacher_solution(prior)},
            {"role": "user", "content": tasks.eval_problems(1, seed=seed + 100)[0].question},
        ]
        before = counter(student, hits)
        result = await arelay(messages, config)
        if result.usage.teacher_calls:
            break
    else:
        pytest.fail("no conversation with history made the tiny student call")
    first_prompt = result.usage.student_prompt_tokens // (result.usage.teacher_calls + 1)
    assert first_prompt > 128  # past one block
    # The first request's prompt is new; every resume finds at least its first full block cached.
    assert counter(student, hits) - before >= 128 * result.usage.teacher_calls
