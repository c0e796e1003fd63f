"""The tiny pair served by real vLLM: the features the relay relies on.

Plain ``openai`` SDK (``AsyncOpenAI``, ``max_retries=0``), temperature 0, held-out problems.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from openai import AsyncOpenAI

from relay_agents.tiny import tasks
from relay_agents.tiny.tokenizer import render_chat

pytestmark = pytest.mark.real_vllm

CALL_LINE = re.compile(r"^\d\d\*\d =<call>(\d+)</call>$")


def client(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=60)


def prompt(problem: tasks.Problem) -> str:
    return render_chat([{"role": "user", "content": problem.user_message}])


@pytest.fixture(scope="module")
def problems() -> list[tasks.Problem]:
    return tasks.eval_problems(8, seed=1)


async def test_student_stops_at_call_and_keeps_stop_string(student, problems):
    p = problems[0]
    r = await client(student).chat.completions.create(
        model=student.model,
        messages=[{"role": "user", "content": p.user_message}],
        temperature=0,
        max_tokens=64,
        stop=["</call>"],
        extra_body={"include_stop_str_in_output": True},
    )
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    m = CALL_LINE.match(text)
    assert m, text
    assert text == f"{p.steps[0].lhs} =<call>{m.group(1)}</call>"
    assert int(m.group(1)) == len(f" {p.steps[0].result}")


async def test_teacher_writes_exactly_n_tokens(teacher, problems):
    c = client(teacher)
    for p in problems[:4]:
        r = await c.completions.create(
            model=teacher.model,
            prompt=prompt(p) + f"{p.steps[0].lhs} =",
            temperature=0,
            max_tokens=4,
        )
        assert r.usage.completion_tokens == 4
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].text == f" {p.steps[0].result}"


async def test_teacher_collapses_double_space_of_answered_calls(teacher, problems):
    """The teacher view of an answered call has two spaces (``=  282``): same continuation."""
    p = problems[1]
    hard, first_easy = p.steps[0], p.steps[1]
    c = client(teacher)
    outs = []
    for view in (f"{hard.lhs} = {hard.result}\n", f"{hard.lhs} =  {hard.result}\n"):
        r = await c.completions.create(
            model=teacher.model, prompt=prompt(p) + view, temperature=0, max_tokens=12
        )
        outs.append(r.choices[0].text)
    assert outs[0] == outs[1]
    assert outs[0].startswith(first_easy.line)


async def test_stream_equals_non_stream(student, problems):
    c = client(student)
    text_prompt = prompt(problems[2]) + f"{problems[2].steps[0].lhs} =<call>4</call>"
    text_prompt += f" {problems[2].steps[0].result}"
    kw = {"model": student.model, "prompt": text_prompt, "temperature": 0, "max_tokens": 80}
    full = await c.completions.create(**kw)
    chunks, usage = [], None
    stream = await c.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices:
            chunks.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(chunks) == full.choices[0].text
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    # the student finishes the easy steps after the teacher's result
    assert tasks.is_correct(full.choices[0].text, problems[2].gold)


async def test_bad_words_suppresses_call(student, problems):
    c = client(student)
    p = problems[3]
    kw = {"model": student.model, "prompt": prompt(p), "temperature": 0, "max_tokens": 40}
    free = await c.completions.create(**kw, stop=["</call>"])
    assert "<call>" in free.choices[0].text
    banned = await c.completions.create(**kw, extra_body={"bad_words": ["<call>"]})
    assert "<call>" not in banned.choices[0].text
    assert banned.choices[0].text.startswith(f"{p.steps[0].lhs} =")
    # the alternative: logit_bias on the <call> token id
    call_id = json.loads((student.model_dir / "tokenizer.json").read_text())["added_tokens"]
    call_id = next(t["id"] for t in call_id if t["content"] == "<call>")
    biased = await c.completions.create(**kw, logit_bias={str(call_id): -100})
    assert "<call>" not in biased.choices[0].text


async def test_chat_continue_final_message(teacher, problems):
    p = problems[4]
    r = await client(teacher).chat.completions.create(
        model=teacher.model,
        messages=[
            {"role": "user", "content": p.user_message},
            {"role": "assistant", "content": f"{p.steps[0].lhs} ="},
        ],
        temperature=0,
        max_tokens=4,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert r.usage.completion_tokens == 4
    assert r.choices[0].message.content == f" {p.steps[0].result}"


def test_server_attributes(student, teacher):
    assert student.base_url.startswith("http://127.0.0.1:") and student.base_url.endswith("/v1")
    assert student.port != teacher.port
    assert (student.model, teacher.model) == ("tiny-student", "tiny-teacher")
    with urllib.request.urlopen(student.metrics_url, timeout=10) as r:
        assert r.status == 200 and b"vllm:" in r.read()
    assert student.log_path.is_file()
