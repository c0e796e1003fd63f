"""Batch throughput on the tiny vLLM pair: a barrier loop, the batch path, and ``arelay``.

Four ways to relay the same held-out problems, side by side in one run on the same two vLLM
servers (``tiny_pair_servers()``: student on core 0, teacher on core 1, greedy, answer cap
256 tokens, up to 5 student turns):

* barrier loop (``BarrierLoop`` below, the structure of a published batch evaluation): every
  active answer's student turn is sent at once and awaited as a whole, then every pending
  teacher call at once, then every resume. Requests with the same ``max_tokens`` share one
  completions request with a list of prompts (per-choice token counts from vLLM's
  ``return_token_ids``); the protocol is relay-agents' (``teacher_view`` for the teacher's
  prompt, the call's ``N`` capped by the tokens left, a call ending the last turn unanswered);
* batch path: :func:`relay_agents.abatch_relay` over all problems;
* ``arelay`` at full concurrency: one ``arelay`` per problem, all at once, and the same
  answers through the LangGraph graph (``ainvoke`` of ``arelay``'s graph);
* at concurrency 1: the naive loop of ``benchmarks/naive_vs_relay.py`` and ``arelay`` one
  answer at a time, on ``--answers-1`` problems.

After one warm-up of each, ``--rounds`` rounds run each way once, the order rotating from
round to round. Reported per way: answers/s (median, min-max), accuracy, teacher tokens and
calls, and the client's CPU (``time.process_time`` of this process; the servers are other
processes) per answer.

    python benchmarks/batch_throughput.py [-n 256] [--answers-1 32] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp

from relay_agents import RelayConfig, abatch_relay, arelay
from relay_agents.api import RelayResult
from relay_agents.core.protocol import teacher_view
from relay_agents.graph import RelayContext, shared_relay_graph
from relay_agents.prompts import ChatTemplate, protocol_messages, to_openai_messages
from relay_agents.tiny.servers import TinyPairServers, tiny_pair_servers
from relay_agents.tiny.tasks import Problem, eval_problems, is_correct

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_vs_relay import NaiveLoop

_CALL = re.compile(r"<call>\s*(\d+)\s*</call>\s*$")


@dataclass
class Outcome:
    """One way's run: the answers' texts and teacher use."""

    texts: list[str]
    teacher_tokens: int
    teacher_calls: int


@dataclass
class _Answer:
    prompt: str
    view: str = ""
    tokens: int = 0  # student + teacher tokens so far
    turns: int = 0
    call: int | None = None  # tokens asked of the teacher, pending
    done: bool = False


class BarrierLoop:
    """Relay decoding with a barrier per turn (see the module's docstring)."""

    def __init__(self, servers: TinyPairServers, cfg: RelayConfig) -> None:
        self.cfg = cfg
        self.template = ChatTemplate.from_tokenizer_dir(servers.pair.student_dir)
        self.student = (servers.student.base_url, servers.student.model)
        self.teacher = (servers.teacher.base_url, servers.teacher.model)

    def _prompt(self, question: str) -> str:
        messages = protocol_messages(
            to_openai_messages(question),
            user_template=self.cfg.user_template,
            system_prompt=self.cfg.system_prompt,
        )
        return self.template.render(messages, add_generation_prompt=True, enable_thinking=False)

    async def _generate(
        self, session: aiohttp.ClientSession, server: tuple[str, str], jobs: list[tuple[str, int, bool]]
    ) -> list[tuple[str, int]]:
        """(text, tokens) for each (prompt, max_tokens, student) job: one request per distinct
        max_tokens, all sent at once, awaited as a whole."""
        by_max: dict[tuple[int, bool], list[int]] = {}
        for i, (_, max_tokens, student) in enumerate(jobs):
            by_max.setdefault((max_tokens, student), []).append(i)
        out: list[tuple[str, int]] = [("", 0)] * len(jobs)

        async def send(max_tokens: int, student: bool, indices: list[int]) -> None:
            body: dict[str, Any] = {
                "model": server[1],
                "prompt": [jobs[i][0] for i in indices],
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "return_token_ids": True,
            }
            if student:
                body |= {"stop": ["</call>"], "include_stop_str_in_output": True}
            async with session.post(f"{server[0]}/completions", json=body) as response:
                reply = await response.json()
            for choice in reply["choices"]:
                out[indices[choice["index"]]] = (choice["text"], len(choice["token_ids"]))

        await asyncio.gather(*(send(m, s, idx) for (m, s), idx in by_max.items()))
        return out

    async def run(self, questions: list[str]) -> Outcome:
        cap = self.cfg.max_answer_tokens
        answers = [_Answer(self._prompt(q)) for q in questions]
        teacher_tokens = teacher_calls = 0
        async with aiohttp.ClientSession() as session:
            while active := [a for a in answers if not a.done]:
                turns = await self._generate(
                    session, self.student, [(a.prompt + a.view, cap - a.tokens, True) for a in active]
                )
                for a, (text, tokens) in zip(active, turns, strict=True):
                    a.view += text
                    a.tokens += tokens
                    a.turns += 1
                    match = _CALL.search(text)
                    if match is None or int(match.group(1)) == 0:
                        a.done = match is None or a.turns >= self.cfg.max_student_turns or a.tokens >= cap
                    elif a.turns >= self.cfg.max_student_turns or a.tokens >= cap:
                        a.done = True
                    else:
                        limit = self.cfg.max_call_tokens or cap
                        a.call = min(int(match.group(1)), limit, cap - a.tokens)
                calling = [a for a in active if a.call]
                replies = await self._generate(
                    session,
                    self.teacher,
                    [(a.prompt + teacher_view(a.view), a.call or 0, False) for a in calling],
                )
                for a, (text, tokens) in zip(calling, replies, strict=True):
                    a.view += text
                    a.tokens += tokens
                    a.call = None
                    teacher_tokens += tokens
                    teacher_calls += 1
                    if a.tokens >= cap:
                        a.done = True
        return Outcome([a.view for a in answers], teacher_tokens, teacher_calls)


def _relayed(results: list[Any]) -> Outcome:
    return Outcome(
        [r.text for r in results],
        sum(r.usage.teacher_tokens for r in results),
        sum(r.usage.teacher_calls for r in results),
    )


async def run_batch(cfg: RelayConfig, questions: list[str]) -> Outcome:
    return _relayed(await abatch_relay(questions, cfg))


async def run_arelay(cfg: RelayConfig, questions: list[str]) -> Outcome:
    return _relayed(await asyncio.gather(*(arelay(q, cfg) for q in questions)))


async def run_graph(cfg: RelayConfig, questions: list[str]) -> Outcome:
    """``arelay``'s answers through the LangGraph graph (what ``arelay`` ran before it ran the
    nodes directly; it still does with a checkpointer or inside a LangChain run)."""
    graph = shared_relay_graph(cfg)
    context = RelayContext(stream_tokens=False)
    states = await asyncio.gather(
        *(graph.ainvoke({"messages": [{"role": "user", "content": q}]}, context=context) for q in questions)
    )
    return _relayed([RelayResult.from_message(s["messages"][-1]) for s in states])


async def run_arelay_one_by_one(cfg: RelayConfig, questions: list[str]) -> Outcome:
    return _relayed([await arelay(q, cfg) for q in questions])


def run_naive(loop: NaiveLoop, questions: list[str]) -> Outcome:
    return Outcome([loop.generate(q) for q in questions], 0, 0)  # the naive loop counts no tokens


def timed(run: Callable[[], Outcome], problems: list[Problem]) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    outcome = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    correct = sum(is_correct(t, p.gold) for t, p in zip(outcome.texts, problems, strict=True))
    return {
        "answers_per_s": len(problems) / wall,
        "accuracy": correct / len(problems),
        "teacher_tokens": outcome.teacher_tokens,
        "teacher_calls": outcome.teacher_calls,
        "cpu_ms_per_answer": cpu / len(problems) * 1000,
    }


def main(n: int, answers_1: int, rounds: int, only: list[str] | None = None) -> dict[str, Any]:
    problems = eval_problems(n)
    few = problems[:answers_1]
    questions, few_questions = [p.question for p in problems], [p.question for p in few]
    with tiny_pair_servers() as servers:
        cfg = servers.relay_config()
        barrier, naive = BarrierLoop(servers, cfg), NaiveLoop(servers, cfg)

        def sync(coro: Callable[[], Awaitable[Outcome]]) -> Callable[[], Outcome]:
            return lambda: asyncio.run(coro())

        ways: dict[str, tuple[Callable[[], Outcome], list[Problem]]] = {
            "barrier loop": (sync(lambda: barrier.run(questions)), problems),
            "batch path": (sync(lambda: run_batch(cfg, questions)), problems),
            f"{n} x arelay": (sync(lambda: run_arelay(cfg, questions)), problems),
            f"{n} x the LangGraph graph": (sync(lambda: run_graph(cfg, questions)), problems),
            "naive loop, concurrency 1": (lambda: run_naive(naive, few_questions), few),
            "arelay, concurrency 1": (sync(lambda: run_arelay_one_by_one(cfg, few_questions)), few),
        }
        if only:
            ways = {name: way for name, way in ways.items() if any(o in name for o in only)}
        for run, subset in ways.values():  # warm-up
            timed(run, subset)
        measured: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
        names = list(ways)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                run, subset = ways[name]
                measured[name].append(timed(run, subset))
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
        f"Python {platform.python_version()}",
        "load_average": os.getloadavg(),
        "problems": n,
        "answers_1": answers_1,
        "rounds": rounds,
        "runs": measured,
    }


def _median_range(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Measured {result['date']} on {result['machine']}; load average after the run "
        f"{', '.join(f'{x:.2f}' for x in result['load_average'])}; {result['rounds']} rounds.",
        "",
        "| way | answers | answers/s, median (min-max) | accuracy | teacher tokens / calls "
        "| client CPU ms per answer, median (min-max) |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in result["runs"].items():
        answers = result["answers_1"] if "concurrency 1" in name else result["problems"]
        first = runs[0]
        teacher = "n/a" if "naive" in name else f"{first['teacher_tokens']:,} / {first['teacher_calls']:,}"
        lines.append(
            f"| {name} | {answers} | {_median_range([r['answers_per_s'] for r in runs], '.1f')} "
            f"| {runs[0]['accuracy']:.1%} | {teacher} "
            f"| {_median_range([r['cpu_ms_per_answer'] for r in runs], '.2f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=256, help="problems for the batch ways")
    parser.add_argument("--answers-1", type=int, default=32, help="problems at concurrency 1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="run only the ways whose names hold one of these")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = main(args.n, args.answers_1, args.rounds, args.only)
    print(json.dumps(result, indent=2) if args.json else table(result))
