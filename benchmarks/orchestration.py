"""Orchestration overhead and throughput of the relay graph against the scripted server.

The scripted OpenAI-compatible server (its own process, loopback HTTP, SSE streaming)
answers every request after a fixed simulated latency. Each answer is five model
requests: student (calls) -> teacher -> student (calls) -> teacher -> student (ends).

Reported, side by side in one run:
* overhead per round: (relay wall time - model-call time) / model requests, p50 and p99, where
  the model-call time is the same five requests (the bodies the relay sent) replayed right
  after on a bare aiohttp session, every byte read: the cheapest client there is, so the
  overhead is everything relay-agents adds to the HTTP requests themselves;
* wall time / model-call time at concurrency 1;
* both for whole replies (``arelay``) and for token streaming (``astream_relay``);
* answers/s at 1, 16, 64 and 256 concurrent conversations and the share of linear scaling.

    python benchmarks/orchestration.py [--latency-ms 100] [--answers 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from datetime import date
from itertools import count

import aiohttp

from relay_agents import Endpoint, RelayConfig, arelay, astream_relay
from relay_agents.testing import ScriptedServer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STUDENT = [
    "Step one: 12*34 = <call>3</call>",
    ". Then 408+1 = <call>3</call>",
    ". So the answer is \\boxed{409}.",
]
TEACHER = [" 408 and more", " 409 and more"]
REQUESTS_PER_ANSWER = 5
_keys = count()


def config(server: ScriptedServer) -> RelayConfig:
    def endpoint(model: str) -> Endpoint:
        return Endpoint(base_url=server.base_url, model=model, chat_template=CHATML)

    return RelayConfig(student=endpoint("student"), teacher=endpoint("teacher"))


def script(server: ScriptedServer, n: int) -> list[str]:
    keys = []
    for _ in range(n):
        key = f"Q{next(_keys)}:"
        server.script("student", key, STUDENT)
        server.script("teacher", key, TEACHER)
        keys.append(key)
    return keys


async def timed(key: str, cfg: RelayConfig, *, streamed: bool = False) -> float:
    """One answer: whole replies (``arelay``) or token streaming (``astream_relay``)."""
    started = time.perf_counter()
    if streamed:
        stream = astream_relay(key, cfg)
        async for _delta in stream:
            pass
        result = stream.result
    else:
        result = await arelay(key, cfg)
    elapsed = time.perf_counter() - started
    assert result is not None and result.usage.teacher_calls == 2, result
    assert result.text.endswith("\\boxed{409}."), result
    return elapsed


async def replay(
    server: ScriptedServer, session: aiohttp.ClientSession, key: str, bodies: list[dict]
) -> float:
    """Time the answer's model requests (the same bodies) sent on a bare aiohttp session."""
    server.script("student", key, STUDENT)
    server.script("teacher", key, TEACHER)
    started = time.perf_counter()
    for body in bodies:
        async with session.post(f"{server.base_url}/completions", json=body) as response:
            async for _line in response.content:
                pass
    return time.perf_counter() - started


async def sequential(server: ScriptedServer, cfg: RelayConfig, answers: int, *, streamed: bool) -> dict:
    session = aiohttp.ClientSession()
    walls, models = [], []
    for i, key in enumerate(script(server, answers + 1)):
        seen = len(server.requests())
        wall = await timed(key, cfg, streamed=streamed)
        bodies = [r["body"] for r in server.requests()[seen:]]
        assert len(bodies) == REQUESTS_PER_ANSWER
        model = await replay(server, session, key, bodies)
        if i:  # the first answer warms the connection pools
            walls.append(wall)
            models.append(model)
    await session.close()
    per_round = sorted((w - m) / REQUESTS_PER_ANSWER * 1000 for w, m in zip(walls, models, strict=True))
    return {
        "overhead_ms_p50": statistics.median(per_round),
        "overhead_ms_p99": per_round[min(len(per_round) - 1, int(0.99 * len(per_round)))],
        "wall_over_model": sum(walls) / sum(models),
    }


async def concurrent(server: ScriptedServer, cfg: RelayConfig, conversations: int, rounds: int) -> float:
    keys = script(server, conversations * rounds)
    queue = iter(keys)

    async def worker() -> None:
        for key in queue:
            await timed(key, cfg)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conversations)))
    return len(keys) / (time.perf_counter() - started)


async def main(latency_ms: float, answers: int) -> dict:
    latency = latency_ms / 1000
    with ScriptedServer() as server:
        server.configure(ttft_s=latency, latency_s=latency)
        cfg = config(server)
        seq = await sequential(server, cfg, answers, streamed=False)
        live = await sequential(server, cfg, answers, streamed=True)
        levels = {}
        for conversations in (1, 16, 64, 256):
            server.reset()
            server.configure(ttft_s=latency, latency_s=latency)
            rounds = max(2, 256 // conversations)
            levels[conversations] = await concurrent(server, cfg, conversations, rounds)
    base = levels[1]
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "latency_ms": latency_ms,
        **seq,
        "streamed": live,
        "throughput": {
            str(c): {"answers_per_s": tput, "linear_share": tput / (c * base)} for c, tput in levels.items()
        },
    }


def table(r: dict) -> str:
    lines = [
        f"Measured {r['date']} on {r['machine']}; simulated model latency {r['latency_ms']:.0f} ms "
        f"per request, {REQUESTS_PER_ANSWER} requests per answer.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| orchestration overhead per round, p50 | {r['overhead_ms_p50']:.2f} ms |",
        f"| orchestration overhead per round, p99 | {r['overhead_ms_p99']:.2f} ms |",
        f"| wall time / model-call time, concurrency 1 | {r['wall_over_model']:.3f} |",
        f"| streamed (`astream_relay`): overhead per round, p50 / p99 "
        f"| {r['streamed']['overhead_ms_p50']:.2f} / {r['streamed']['overhead_ms_p99']:.2f} ms |",
        f"| streamed: wall time / model-call time | {r['streamed']['wall_over_model']:.3f} |",
    ]
    for c, v in r["throughput"].items():
        lines.append(
            f"| {c} concurrent conversations | {v['answers_per_s']:.1f} answers/s "
            f"({v['linear_share']:.0%} of linear) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--answers", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = asyncio.run(main(args.latency_ms, args.answers))
    print(json.dumps(result, indent=2) if args.json else table(result))
