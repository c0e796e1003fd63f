"""The batch path on the tiny pair's real vLLM servers: the answers ``arelay`` gives."""

from __future__ import annotations

import asyncio

import pytest

from relay_agents import abatch_relay, arelay
from relay_agents.tiny import tasks

pytestmark = pytest.mark.real_vllm


async def test_the_same_answers_as_arelay_on_real_tokens(tiny_servers) -> None:
    config = tiny_servers.relay_config()
    questions = [p.question for p in tasks.eval_problems(48, seed=3)]
    alone = await asyncio.gather(*(arelay(q, config) for q in questions))
    together = await abatch_relay(questions, config)
    for a, b in zip(alone, together, strict=True):
        assert b.model_dump(exclude={"message"}) == a.model_dump(exclude={"message"})
    assert sum(r.usage.teacher_calls for r in together) > 0
