"""A bounded load test on loopback: 200 concurrent streams through the server, no errors,
nothing lost, and the conversation budgets exact under contention."""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from pathlib import Path

import httpx2

from relay_agents import Budget
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config
from tests.server_support import sdk, serving
from tests.test_server import ANSWER, script

STREAMS = 200
CONVERSATIONS = 20
CALLS_PER_CONVERSATION = 15  # each answer asks for 2 calls: 10 answers want 20, 15 are granted
TEACHER_TEXT = {2: " 408 409", 1: " 408", 0: ""}


async def test_200_concurrent_streams(scripted: ScriptedServer, tmp_path: Path) -> None:
    scripted.configure(ttft_s=0.05, latency_s=0.05)
    keys = [f"Q-load-{i}:" for i in range(STREAMS)]
    for key in keys:
        script(scripted, key)
    config = relay_config(
        scripted,
        budget=Budget(max_teacher_calls=CALLS_PER_CONVERSATION),
        budget_store=str(tmp_path / "budgets.sqlite"),
    )
    async with serving(config) as url:
        client = sdk(url, timeout=120.0)

        async def one(i: int) -> dict:
            stream = await client.chat.completions.create(
                model="relay",
                messages=[{"role": "user", "content": keys[i]}],
                stream=True,
                stream_options={"include_usage": True},
                user=f"conversation-{i % CONVERSATIONS}",
            )
            text, teacher, usage = [], [], None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    piece = choice.delta.content or ""
                    text.append(piece)
                    if choice.model_extra["relay"]["source"] == "teacher":
                        teacher.append(piece)
            assert usage is not None, f"stream {i} lost its usage chunk"
            return {"text": "".join(text), "teacher": "".join(teacher), "usage": usage.model_extra["relay"]}

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(STREAMS)))
        elapsed = time.perf_counter() - started
        async with httpx2.AsyncClient() as http:
            metrics = (await http.get(f"{url}/metrics")).text

    calls: dict[int, int] = defaultdict(int)
    texts: dict[int, set[str]] = defaultdict(set)
    for i, r in enumerate(results):
        granted = r["usage"]["teacher_calls"]
        calls[i % CONVERSATIONS] += granted
        texts[granted].add(r["text"])
        assert r["teacher"] == TEACHER_TEXT[granted], (i, r)
    assert dict(calls) == dict.fromkeys(range(CONVERSATIONS), CALLS_PER_CONVERSATION)
    # streams that got the same calls carry the same text, to the byte; whole answers are exact
    assert all(len(t) == 1 for t in texts.values()), texts
    assert texts[2] == {ANSWER}

    def sample(name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", metrics, re.M)
        assert match, name
        return float(match.group(1))

    assert sample("relay_teacher_calls_total") == CONVERSATIONS * CALLS_PER_CONVERSATION
    assert sample("relay_teacher_tokens_total") == sum(r["usage"]["teacher_tokens"] for r in results)
    assert sample("relay_student_tokens_total") == sum(r["usage"]["student_tokens"] for r in results)
    assert 'relay_requests_total{endpoint="chat.completions",stream="true"} 200.0' in metrics
    assert "relay_errors_total{" not in metrics
    assert sample("relay_requests_in_flight") == 0
    # one at a time this would take STREAMS x (up to 5 requests x 100 ms): they really overlapped
    assert elapsed < 30, elapsed
