"""Relay rollouts for GRPO: the shipped tiny student writes in process, the scripted server is
the teacher on the wire; teacher tokens are spliced in and masked, grants and budgets apply."""

from __future__ import annotations

import pytest
import transformers

from relay_agents.core.config import Budget, Endpoint
from relay_agents.testing import ScriptedServer
from relay_agents.tiny import tasks
from relay_agents.tiny.build import build_tiny_pair
from relay_agents.train.rollouts import RelayRollouts, RolloutSettings


@pytest.fixture(scope="module")
def student():
    student_dir = build_tiny_pair().student_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(student_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(student_dir)
    return student_dir, model, tokenizer


def _teacher(scripted: ScriptedServer, student_dir) -> Endpoint:
    return Endpoint(
        base_url=scripted.base_url, model="teacher", api="completions", tokenizer_path=student_dir
    )


def _relay(student, scripted, problems, *, teacher_ends: bool = False, **settings):
    """The scripted teacher writes the product, then ends (``teacher_ends``) or goes on past
    the grant (the scripted server cuts it at ``max_tokens`` of its own tokens)."""
    student_dir, model, tokenizer = student
    for p in problems:
        result = p.steps[0].result
        reply = f" {result}" if teacher_ends else f" {result}\n{result} and on"
        scripted.script("teacher", p.question, [reply], repeat=True)
    rollouts = RelayRollouts(
        _teacher(scripted, student_dir), RolloutSettings(max_answer_tokens=96, **settings)
    )
    return rollouts.run(
        model, tokenizer, [[{"role": "user", "content": p.user_message}] for p in problems], temperature=None
    )


def test_teacher_tokens_are_spliced_after_the_call_and_masked(student, scripted: ScriptedServer) -> None:
    _, _, tokenizer = student
    problems = tasks.eval_problems(3)
    rollouts = _relay(student, scripted, problems)
    prompts = [r["prompt"] for r in scripted.requests() if r["model"] == "teacher"]
    assert len(prompts) == 3
    for r, p in zip(rollouts, problems, strict=True):
        hard = p.steps[0]
        result_ids = tokenizer.encode(f" {hard.result}", add_special_tokens=False)
        call_end = r.completion_ids.index(tokenizer.convert_tokens_to_ids("</call>")) + 1
        assert r.env_mask == [1] * call_end + [0] * len(result_ids) + [1] * (
            len(r.env_mask) - call_end - len(result_ids)
        )
        assert r.completion_ids[call_end : call_end + len(result_ids)] == result_ids
        assert r.logprobs[call_end : call_end + len(result_ids)] == [0.0] * len(result_ids)
        assert all(lp <= 0.0 for lp in r.logprobs)
        assert r.requested == [4] and r.teacher_tokens == len(result_ids)
        assert tasks.is_correct(r.text, p.gold), r.text
        assert r.completion_ids[-1] == tokenizer.eos_token_id
        # the teacher continues the protocol's teacher view: the command removed, stripped
        assert any(prompt.endswith(f"assistant\n{hard.lhs} =") for prompt in prompts)


def test_budget_and_turn_cap_limit_the_teacher(student, scripted: ScriptedServer) -> None:
    problem = tasks.eval_problems(1)
    (capped,) = _relay(student, scripted, problem, budget=Budget(max_teacher_tokens=2))
    (request,) = [r["body"] for r in scripted.requests() if r["model"] == "teacher"]
    assert request["max_tokens"] == 2
    assert capped.teacher_tokens <= 2 and capped.requested == [4]
    scripted.reset()
    (ended,) = _relay(student, scripted, problem, teacher_ends=True)
    assert ended.done and ended.text.endswith(f"=<call>4</call> {problem[0].steps[0].result}")
    scripted.reset()
    (one_turn,) = _relay(student, scripted, problem, max_turns=1)
    assert not [r for r in scripted.requests() if r["model"] == "teacher"]
    assert one_turn.text.endswith("</call>") and one_turn.teacher_tokens == 0
