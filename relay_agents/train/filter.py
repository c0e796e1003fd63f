"""The teacher-pass filter: keep only problems the teacher can solve.

Training on problems the teacher fails teaches the student to call for help that does not come:
the RelayLLM paper's ablation without this filter called the teacher about three times as often
and lost accuracy. The teacher answers each problem ``k`` times (one request with the API's
``n`` where it has one), the evaluation grader grades each answer, and a rule keeps or drops the
problem. Every graded problem is written with its pass count as it finishes, kept ones to the
output and dropped ones beside it, so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay_agents.clients import EndpointClient, Sample
from relay_agents.core.config import Endpoint, RelayConfig
from relay_agents.core.types import Request
from relay_agents.eval.data import Dataset, Problem
from relay_agents.eval.grading import Grader
from relay_agents.prompts import protocol_messages

_MAX_FAILURES = re.compile(r"^max-failures:(?P<failures>\d+)/(?P<samples>\d+)$")


@dataclass(frozen=True)
class FilterRule:
    """Which pass counts keep a problem.

    ``any``: at least one of the ``k`` answers is correct (the published code's rule, with 16
    samples). ``max-failures:F/S``: at most ``F`` of every ``S`` answers fail (the paper's,
    ``5/10``: a problem the teacher fails more than 5 times in 10 is dropped); with ``k``
    samples the allowance is ``F * k / S`` failures.
    """

    text: str
    failures: int | None = None
    per: int | None = None

    def keeps(self, passes: int, samples: int) -> bool:
        if self.failures is None or self.per is None:
            return passes > 0
        return (samples - passes) * self.per <= self.failures * samples


def parse_rule(text: str) -> FilterRule:
    """``any`` or ``max-failures:F/S`` (``F <= S``, ``S >= 1``); ValueError otherwise."""
    text = text.strip()
    if text == "any":
        return FilterRule(text)
    match = _MAX_FAILURES.match(text)
    if match is None:
        raise ValueError(f"unknown rule {text!r}: use 'any' or 'max-failures:F/S' (e.g. max-failures:5/10)")
    failures, per = int(match["failures"]), int(match["samples"])
    if per < 1 or failures > per:
        raise ValueError(f"{text}: need 0 <= F <= S and S >= 1")
    return FilterRule(text, failures, per)


@dataclass(frozen=True)
class FilterOptions:
    """How the teacher is sampled and what is kept (the endpoint and prompt are the config's)."""

    k: int = 16
    rule: FilterRule = FilterRule("any")
    temperature: float = 0.7
    top_p: float = 0.95
    per_request: int | None = None
    """Answers asked for in one request (the API's ``n``); ``None``: all ``k``. 1 for an API
    without ``n``. With a seeded endpoint, request ``j`` of a problem is seeded ``seed + j``."""
    max_tokens: int | None = None
    """The cap on each answer (``None``: the config's ``max_answer_tokens``)."""
    concurrency: int = 8
    grade_workers: int = 2


@dataclass(frozen=True)
class FilterSummary:
    kept: int
    dropped: int
    resumed: int
    failed: dict[str, str]
    """Problems whose teacher requests failed (id: error): not written, a rerun tries them again."""


class FilterMismatch(ValueError):
    """The output holds problems filtered with another ``k`` or rule: resuming would mix them."""


def dropped_path(out: Path) -> Path:
    """Where the dropped problems go: beside the output, ``KEPT.dropped.jsonl``."""
    return out.with_name(f"{out.stem}.dropped{out.suffix or '.jsonl'}")


def _done(path: Path, options: FilterOptions) -> set[str]:
    """The ids already filtered into ``path``, checked against this run's ``k`` and rule."""
    if not path.exists():
        return set()
    ids = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue  # an interrupted write leaves at most a torn last line, which json refuses
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if (row.get("teacher_samples"), row.get("rule")) != (options.k, options.rule.text):
            raise FilterMismatch(
                f"{path}:{number} was filtered with k={row.get('teacher_samples')} and rule "
                f"{row.get('rule')!r}, this run uses k={options.k} and {options.rule.text!r}: "
                "use another --out, or the same settings to resume"
            )
        ids.add(str(row["id"]))
    return ids


def _row(problem: Problem, passes: int, options: FilterOptions, kept: bool) -> dict[str, Any]:
    """The problem as the data loaders read it, with its pass count and the rule's verdict."""
    row: dict[str, Any] = {"id": problem.id, "question": problem.question, "answer": problem.answer}
    if problem.choices:
        row["choices"] = list(problem.choices)
    return row | {
        "teacher_passes": passes,
        "teacher_samples": options.k,
        "rule": options.rule.text,
        "kept": kept,
    }


def teacher_endpoint(config: RelayConfig, options: FilterOptions) -> Endpoint:
    return config.teacher.model_copy(update={"temperature": options.temperature, "top_p": options.top_p})


async def _samples(client: EndpointClient, request: Request, options: FilterOptions) -> list[Sample]:
    """``k`` answers in requests of ``per_request`` each (the last one may ask for fewer); with
    a seeded endpoint, request ``j`` is seeded ``seed + j`` (the same seed would repeat them)."""
    per = options.per_request or options.k
    sizes = [min(per, options.k - start) for start in range(0, options.k, per)]
    seed = client.endpoint.seed
    clients = [
        client
        if seed is None or j == 0
        else EndpointClient(client.endpoint.model_copy(update={"seed": seed + j}), "teacher")
        for j in range(len(sizes))
    ]
    try:
        batches = await asyncio.gather(*(c.asample(request, n) for c, n in zip(clients, sizes, strict=True)))
    finally:
        for other in clients:
            if other is not client:
                await other.aclose()
    return [sample for batch in batches for sample in batch]


async def run_filter(
    config: RelayConfig,
    dataset: Dataset,
    out: Path,
    options: FilterOptions,
    *,
    on_start: Callable[[int], None] = lambda _total: None,
    on_done: Callable[[dict[str, Any]], None] = lambda _row: None,
) -> FilterSummary:
    """Filter ``dataset`` into ``out`` (kept) and :func:`dropped_path` (dropped), resuming both.

    ``on_start`` gets the number of problems left, ``on_done`` each written row.
    """
    dropped = dropped_path(out)
    done = _done(out, options) | _done(dropped, options)
    left = [p for p in dataset.problems if p.id not in done]
    on_start(len(left))
    out.parent.mkdir(parents=True, exist_ok=True)
    client = EndpointClient(teacher_endpoint(config, options), "teacher")
    semaphore = asyncio.Semaphore(options.concurrency)
    failed: dict[str, str] = {}
    counts = {True: 0, False: 0}
    with (
        Grader(options.grade_workers) as grader,
        out.open("a") as kept_file,
        dropped.open("a") as dropped_file,
    ):

        async def one(problem: Problem) -> None:
            messages = protocol_messages(
                [{"role": "user", "content": problem.prompt}],
                user_template=config.user_template,
                system_prompt=config.system_prompt,
            )
            request = Request(
                messages=messages,
                answer="",
                max_tokens=options.max_tokens or config.max_answer_tokens,
                enable_thinking=config.enable_thinking,
            )
            async with semaphore:
                try:
                    samples = await _samples(client, request, options)
                except Exception as exc:  # a problem that errors is reported, and the run goes on
                    failed[problem.id] = f"{type(exc).__name__}: {exc}"
                    return
            grades = await asyncio.gather(*(grader.grade(s.text, problem) for s in samples))
            passes = sum(g.correct for g in grades)
            kept = options.rule.keeps(passes, options.k)
            row = _row(problem, passes, options, kept)
            target = kept_file if kept else dropped_file
            target.write(json.dumps(row) + "\n")
            target.flush()
            counts[kept] += 1
            on_done(row)

        try:
            await asyncio.gather(*(one(p) for p in left))
        finally:
            await client.aclose()
    return FilterSummary(kept=counts[True], dropped=counts[False], resumed=len(done), failed=failed)
