"""The confidence policy on real vLLM: a student never taught to call gets the teacher exactly at
its unsure tokens.

The student is the tiny world's solo student (trained on full solutions, it never writes
``<call>``), the teacher the tiny teacher; SmolLM2-135M-Instruct (chat API) is the off-the-shelf
case. Each cut point is checked against the student server itself: the token the student would
have written where the teacher took over has probability below the threshold, and every token
the student did write has probability at or above it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from openai import AsyncOpenAI

from relay_agents import ConfidencePolicy, Endpoint, RelayConfig, RelayResult, arelay, astream_relay
from relay_agents.clients import EndpointClient
from relay_agents.core.types import Generation, Request
from relay_agents.prompts import protocol_messages
from relay_agents.tiny import tasks
from tests.real_vllm.smollm2.conftest import smollm2_model_dir, smollm2_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.real_vllm

THRESHOLD = 0.9  # the tiny solo student is sure of most tokens: a high bar makes it call


@pytest.fixture(scope="module")
def solo(tiny_servers) -> Iterator[object]:
    from relay_agents.tiny.servers import solo_server

    server = solo_server(tiny_servers)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def config(tiny_servers, solo) -> RelayConfig:
    student = Endpoint(
        base_url=solo.base_url, model=solo.model, tokenizer_path=solo.model_dir, temperature=0.0
    )
    policy = ConfidencePolicy(threshold=THRESHOLD, call_tokens=4, top_logprobs=1)
    return tiny_servers.relay_config(student=student, policy=policy, max_student_turns=32)


async def student_probs(config: RelayConfig, question: str, answer: str, n: int) -> list[tuple[str, float]]:
    """The student's greedy next ``n`` tokens after ``answer`` with their probabilities, asked
    of its server directly (the completions API over the same rendered prompt)."""
    ep = config.student
    messages = protocol_messages(
        [{"role": "user", "content": question}], user_template=config.user_template, system_prompt=None
    )
    prompt = EndpointClient(ep, "student").prompt_prefix(Request(messages=messages, answer="", max_tokens=1))
    client = AsyncOpenAI(base_url=ep.base_url, api_key="EMPTY", max_retries=0)
    reply = await client.completions.create(
        model=ep.model, prompt=prompt + answer, max_tokens=n, temperature=0, logprobs=1
    )
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    return [(t, math.exp(v)) for t, v in zip(lp.tokens, lp.token_logprobs, strict=True)]


def student_turns(result: RelayResult) -> Iterator[tuple[str, int, bool]]:
    """Each student span: the answer before it (the student's context: after a teacher span the
    view is the clean text), its token count, and whether the teacher took over after it."""
    text = ""
    for i, span in enumerate(result.spans):
        if span.source == "student":
            yield text, span.tokens, i + 1 < len(result.spans)
        text += span.text


def assert_cut_exactly_at_unsure_tokens(
    probs: list[tuple[str, float]], tokens: int, cut: bool, threshold: float
) -> None:
    kept = probs[:tokens]
    assert all(p >= threshold for _, p in kept), kept
    if cut:
        assert probs[tokens][1] < threshold, probs[tokens]


@pytest.fixture
def turns(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Request, Generation]]:
    """Every request the relay sends (the endpoint's model, the request, what came back)."""
    seen: list[tuple[str, Request, Generation]] = []
    agenerate = EndpointClient.agenerate

    async def spy(self: EndpointClient, request: Request, on_text=None, watch=None, **kwargs) -> Generation:
        gen = await agenerate(self, request, on_text, watch, **kwargs)
        seen.append((self.endpoint.model, request, gen))
        return gen

    monkeypatch.setattr(EndpointClient, "agenerate", spy)
    return seen


async def test_an_untrained_student_gets_the_teacher_at_its_unsure_tokens(
    config: RelayConfig, turns: list[tuple[str, Request, Generation]]
) -> None:
    called = 0
    for p in tasks.eval_problems(8, seed=3):
        turns.clear()
        result = await arelay(p.question, config)
        assert "<call>" not in result.text and result.finish_reason == "stop", result
        called += result.usage.teacher_calls
        # each call writes at most call_tokens (back-to-back calls join into one teacher span)
        calls = [gen for model, _, gen in turns if model == config.teacher.model]
        assert len(calls) == result.usage.teacher_calls
        assert all(0 < gen.completion_tokens <= 4 for gen in calls), calls
        teacher_tokens = sum(gen.completion_tokens for gen in calls)
        assert teacher_tokens == result.usage.teacher_tokens
        assert teacher_tokens == sum(s.tokens for s in result.spans if s.source == "teacher")
        # every student turn, one the teacher took over at its first token included
        student = [(req, gen) for model, req, gen in turns if model == config.student.model]
        assert sum(gen.completion_tokens for _, gen in student) == result.usage.student_tokens
        for req, gen in student:
            probs = await student_probs(config, p.question, req.answer, gen.completion_tokens + gen.cut)
            assert_cut_exactly_at_unsure_tokens(probs, gen.completion_tokens, gen.cut, THRESHOLD)
        for before, tokens, cut in student_turns(result):  # the spans say the same
            probs = await student_probs(config, p.question, before, tokens + cut)
            assert_cut_exactly_at_unsure_tokens(probs, tokens, cut, THRESHOLD)
    assert called > 0  # the solo student does hesitate on this set


async def test_streaming_cuts_where_whole_replies_do(config: RelayConfig) -> None:
    for p in tasks.eval_problems(3, seed=4):
        whole = await arelay(p.question, config)
        stream = astream_relay(p.question, config)
        text = "".join([d.text async for d in stream])
        assert stream.result is not None and text == whole.text == stream.result.text
        assert [(s.source, s.text) for s in stream.result.spans] == [(s.source, s.text) for s in whole.spans]


async def test_chat_api_cuts_where_completions_does(config: RelayConfig) -> None:
    chat = config.model_copy(
        update={
            "student": config.student.model_copy(update={"api": "chat"}),
            "teacher": config.teacher.model_copy(update={"api": "chat"}),
        }
    )
    for p in tasks.eval_problems(3, seed=5):
        a = await arelay(p.question, config)
        b = await arelay(p.question, chat)
        assert [(s.source, s.text) for s in a.spans] == [(s.source, s.text) for s in b.spans]


async def test_smollm2_gets_help_at_its_unsure_tokens(smollm2_server) -> None:  # noqa: F811
    ep = Endpoint(
        base_url=smollm2_server.base_url, model=smollm2_server.model, api="chat", temperature=0, max_retries=0
    )
    threshold = 0.5
    config = RelayConfig(
        student=ep,
        teacher=ep,
        policy=ConfidencePolicy(threshold=threshold, call_tokens=3, top_logprobs=1),
        max_answer_tokens=48,
        max_student_turns=20,
    )
    question = "Name three colours of the rainbow."
    result = await arelay(question, config)
    assert result.usage.teacher_calls > 0 and result.text.strip()
    client = AsyncOpenAI(base_url=ep.base_url, api_key="EMPTY", max_retries=0)
    messages = protocol_messages(
        [{"role": "user", "content": question}], user_template=config.user_template, system_prompt=None
    )
    for before, tokens, cut in student_turns(result):
        reply = await client.chat.completions.create(
            model=ep.model,
            messages=[*messages, {"role": "assistant", "content": before}] if before else messages,
            max_tokens=tokens + cut,
            temperature=0,
            logprobs=True,
            top_logprobs=1,
            extra_body={"continue_final_message": bool(before), "add_generation_prompt": not before},
        )
        content = reply.choices[0].logprobs.content or []
        probs = [(c.token, math.exp(c.logprob)) for c in content]
        assert_cut_exactly_at_unsure_tokens(probs, tokens, cut, threshold)
