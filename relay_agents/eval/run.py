"""The harness: every (setting, item, sample) answered through :func:`relay_agents.api.arelay`
under one semaphore, graded, and written to the output folder as it finishes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.metadata
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay_agents.api import arelay
from relay_agents.calibrate import DevProblem, calibrate
from relay_agents.core.config import Endpoint, RelayConfig
from relay_agents.eval.data import Dataset, Problem
from relay_agents.eval.grading import Grader
from relay_agents.eval.judge import JUDGE_PROMPT, Judge
from relay_agents.eval.metrics import Router, average, setting_metrics
from relay_agents.eval.report import write_outputs
from relay_agents.eval.settings import (
    DIRECT,
    GRIDS,
    MATCHED,
    RELAY,
    ROUTER_ACCURACY,
    ROUTER_COST,
    SETTINGS,
    STUDENT,
    TEACHER,
    parse_settings,
    setting_config,
)
from relay_agents.eval.store import ResultStore


@dataclass(frozen=True)
class EvalOptions:
    """How a run samples and what it compares (the endpoints and relay settings are the config's)."""

    settings: tuple[str, ...] = SETTINGS
    samples: int = 1
    """K: answers per item and setting (accuracy is their mean; pass@K counts any correct)."""
    temperature: float | None = None
    """Overrides both endpoints' temperature when set."""
    seed: int = 0
    """Sample k is drawn with seed ``seed + k``; also the routers' draw."""
    limit: int | None = None
    concurrency: int = 8
    calibration_items: int = 50
    """Items (the first of each data set) on which interval and random are calibrated."""
    student_alone: Endpoint | None = None
    """The model of the ``student`` row when it is not the relay's student (see settings)."""
    judge: Endpoint | None = None
    """A chat model that re-checks the answers the rules graded wrong (its own column, never
    the score; see :mod:`relay_agents.eval.judge`)."""
    grade_workers: int = 2


@dataclass
class Progress:
    """What the caller shows while a run goes: ``start(label, total)`` once per batch (total 0:
    unknown, as while calibrating), ``advance()`` per answer."""

    start: Callable[[str, int], None] = lambda _label, _total: None
    advance: Callable[[], None] = lambda: None


@dataclass
class _Run:
    config: RelayConfig
    options: EvalOptions
    store: ResultStore
    grader: Grader
    progress: Progress
    semaphore: asyncio.Semaphore
    judge: Judge | None = None
    answered: int = 0
    wall_s: float = 0.0
    calibrated: dict[str, Any] = field(default_factory=dict)


def _version() -> str:
    try:
        return importlib.metadata.version("relay-agents")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _file_sha256(directory: Path | None, name: str) -> str | None:
    """The hash of a model directory's file (where its chat template lives): the same model
    pins the same value wherever it is stored."""
    if directory is None or not (directory / name).is_file():
        return None
    return hashlib.sha256((directory / name).read_bytes()).hexdigest()


def _endpoint_pins(endpoint: Endpoint, options: EvalOptions) -> dict[str, Any]:
    template = endpoint.chat_template
    return {
        "model": endpoint.model,
        "api": endpoint.api,
        "temperature": options.temperature if options.temperature is not None else endpoint.temperature,
        "top_p": endpoint.top_p,
        "extra_body": endpoint.extra_body,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "tokenizer_config_sha256": _file_sha256(endpoint.tokenizer_path, "tokenizer_config.json"),
        "input_price_per_million": endpoint.input_price_per_million,
        "output_price_per_million": endpoint.output_price_per_million,
    }


def _judge_pins(judge: Endpoint) -> dict[str, Any]:
    return {
        "model": judge.model,
        "temperature": judge.temperature or 0.0,
        "seed": judge.seed,
        "extra_body": judge.extra_body,
        "prompt_sha256": hashlib.sha256(JUDGE_PROMPT.encode()).hexdigest(),
    }


def pinned_settings(config: RelayConfig, options: EvalOptions, datasets: Sequence[Dataset]) -> dict[str, Any]:
    """Everything the results depend on, printed in the report and compared on a rerun (the
    servers' addresses are not: the same models may be served elsewhere)."""
    return {
        "relay_agents_version": _version(),
        "student": _endpoint_pins(config.student, options),
        "teacher": _endpoint_pins(config.teacher, options),
        "student_alone": _endpoint_pins(options.student_alone, options) if options.student_alone else None,
        "judge": _judge_pins(options.judge) if options.judge else None,
        "policy": config.policy.model_dump(),
        "enable_thinking": config.enable_thinking,
        "chat_template_kwargs": {"enable_thinking": config.enable_thinking},
        "preset": config.preset,
        "system_prompt": config.system_prompt,
        "user_template": config.user_template,
        "max_answer_tokens": config.max_answer_tokens,
        "max_call_tokens": config.max_call_tokens,
        "max_student_turns": config.max_student_turns,
        "min_tokens_between_calls": config.min_tokens_between_calls,
        "target_teacher_share": config.target_teacher_share,
        "on_malformed_call": config.on_malformed_call,
        "turn_budget": config.turn_budget.model_dump(),
        "samples": options.samples,
        "seed": options.seed,
        "calibration_items": options.calibration_items,
        "data": {
            d.name: {"sha256": d.sha256, "source": d.source, "items": len(d.problems)} for d in datasets
        },
    }


def _sampled(config: RelayConfig, options: EvalOptions, sample: int) -> RelayConfig:
    def endpoint(e: Endpoint) -> Endpoint:
        update: dict[str, Any] = {"seed": options.seed + sample}
        if options.temperature is not None:
            update["temperature"] = options.temperature
        return e.model_copy(update=update)

    return config.model_copy(
        update={"student": endpoint(config.student), "teacher": endpoint(config.teacher)}
    )


async def _answer(
    run: _Run, dataset: str, setting: str, config: RelayConfig, problem: Problem, sample: int
) -> None:
    async with run.semaphore:
        started = time.perf_counter()
        line: dict[str, Any] = {"dataset": dataset, "id": problem.id, "setting": setting, "sample": sample}
        try:
            result = await arelay(problem.prompt, config)
            latency = time.perf_counter() - started
            graded = await run.grader.grade(result.text, problem)
            recheck = (
                await run.judge.recheck(problem, result.text) if run.judge and not graded.correct else None
            )
        except Exception as exc:  # an item that errors is recorded, and the run goes on
            line |= {
                "text": "",
                "spans": [],
                "extracted": None,
                "correct": False,
                "student_tokens": 0,
                "teacher_tokens": 0,
                "teacher_calls": 0,
                "latency_s": time.perf_counter() - started,
                "cost_usd": 0.0,
                "malformed": 0,
                "teacher_failures": 0,
                "student_model": None,
                "teacher_model": None,
                "error": f"{type(exc).__name__}: {exc}",
            }
        else:
            kinds = [e.kind for e in result.events]
            line |= {
                "text": result.text,
                "spans": [s.model_dump() for s in result.spans],
                "extracted": graded.extracted,
                "correct": graded.correct,
                "student_tokens": result.usage.student_tokens,
                "teacher_tokens": result.usage.teacher_tokens,
                "teacher_calls": result.usage.teacher_calls,
                "latency_s": latency,
                "cost_usd": result.usage.cost_usd,
                "malformed": kinds.count("malformed_call"),
                "teacher_failures": kinds.count("teacher_failure"),
                "student_model": result.student_model,
                "teacher_model": result.teacher_model,
                "error": None,
            }
            if run.judge is not None:
                line |= {
                    "recheck": recheck.accepted if recheck else None,
                    "recheck_reply": recheck.reply if recheck else None,
                    "recheck_error": recheck.error if recheck else None,
                }
    run.store.add(line)
    run.answered += 1
    run.progress.advance()


async def _batch(run: _Run, label: str, jobs: list[Callable[[], Awaitable[None]]]) -> None:
    if not jobs:
        return
    run.progress.start(label, len(jobs))
    started = time.perf_counter()
    try:
        await asyncio.gather(*(job() for job in jobs))
    finally:
        run.wall_s += time.perf_counter() - started


def _jobs(
    run: _Run, dataset: Dataset, problems: Sequence[Problem], setting: str, config: RelayConfig
) -> list[Callable[[], Awaitable[None]]]:
    done = run.store.done()
    jobs: list[Callable[[], Awaitable[None]]] = []
    for sample in range(run.options.samples):
        sampled = _sampled(config, run.options, sample)
        for problem in problems:
            if (dataset.name, setting, problem.id, sample) not in done:
                jobs.append(
                    lambda s=setting, c=sampled, p=problem, k=sample: _answer(run, dataset.name, s, c, p, k)
                )
    return jobs


def _lines(run: _Run, dataset: str, setting: str, ids: set[str]) -> list[dict[str, Any]]:
    return [
        x
        for x in run.store.lines
        if x["dataset"] == dataset
        and x["setting"] == setting
        and x["id"] in ids
        and x["sample"] < run.options.samples
    ]


async def _calibrated_knob(
    run: _Run, dataset: Dataset, problems: Sequence[Problem], setting: str, target: float
) -> float:
    """The interval or rate whose teacher-token share on the first items is nearest ``target``
    (kept in the output folder, so a resumed run does not calibrate again)."""
    key = f"{dataset.name}|{setting}|{target!r}"
    found = run.store.calibration()
    if key not in found:
        grid, integer = GRIDS[setting]
        dev = [DevProblem(p.prompt, p.answer) for p in problems[: run.options.calibration_items]]
        alone = run.options.student_alone
        build = lambda knob: setting_config(setting, run.config, student_alone=alone, knob=knob)  # noqa: E731
        run.progress.start(f"{dataset.name}: calibrating {setting}", 0)
        _curve, chosen = await calibrate(
            build, grid, target, dev, integer=integer, concurrency=run.options.concurrency
        )
        found[key] = {"knob": chosen.value, "share": chosen.share, "target": target}
        run.store.save_calibration(found)
    run.calibrated[f"{dataset.name}/{setting}"] = found[key]
    return float(found[key]["knob"])


async def _run_dataset(run: _Run, dataset: Dataset) -> dict[str, Any]:
    problems = list(dataset.problems[: run.options.limit])
    ids = {p.id for p in problems}
    wanted = run.options.settings
    direct = [s for s in wanted if s in DIRECT]
    jobs = []
    for setting in direct:
        config = setting_config(setting, run.config, student_alone=run.options.student_alone)
        jobs += _jobs(run, dataset, problems, setting, config)
    await _batch(run, f"{dataset.name}: {', '.join(direct)}", jobs)

    rows: dict[str, Any] = {s: setting_metrics(_lines(run, dataset.name, s, ids)) for s in direct}
    relay = rows.get(RELAY)
    for setting in (s for s in wanted if s in MATCHED):
        assert relay is not None
        if relay["teacher_share"] == 0:
            rows[setting] = {"skipped": "the relay wrote no teacher tokens: there is no share to match"}
            continue
        knob = await _calibrated_knob(run, dataset, problems, setting, relay["teacher_share"])
        config = setting_config(setting, run.config, student_alone=run.options.student_alone, knob=knob)
        await _batch(run, f"{dataset.name}: {setting}", _jobs(run, dataset, problems, setting, config))
        rows[setting] = setting_metrics(_lines(run, dataset.name, setting, ids)) | {"knob": knob}
    if any(s in wanted for s in (ROUTER_COST, ROUTER_ACCURACY)):
        assert relay is not None
        router = Router(_lines(run, dataset.name, STUDENT, ids), _lines(run, dataset.name, TEACHER, ids))
        if ROUTER_COST in wanted:
            rows[ROUTER_COST] = router.row(router.p_at_share(relay["teacher_share"]), run.options.seed)
        if ROUTER_ACCURACY in wanted:
            rows[ROUTER_ACCURACY] = router.row(router.p_at_accuracy(relay["accuracy"]), run.options.seed)
    return rows


async def run_eval(
    config: RelayConfig,
    datasets: Sequence[Dataset],
    out: str | Path,
    options: EvalOptions | None = None,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate every setting on every data set; writes ``results.jsonl``, ``summary.json``,
    ``report.md`` and ``pareto.png`` into ``out`` and returns the summary.

    A rerun with the same ``out`` answers only what is missing; one whose pinned settings or
    data differ raises :class:`~relay_agents.eval.store.RunMismatch`.
    """
    options = options or EvalOptions()
    options = dataclasses.replace(options, settings=parse_settings(options.settings))
    out = Path(out)
    store = ResultStore(out, pinned_settings(config, options, datasets))
    run = _Run(
        config=config,
        options=options,
        store=store,
        grader=Grader(options.grade_workers),
        progress=progress or Progress(),
        semaphore=asyncio.Semaphore(options.concurrency),
        judge=Judge(options.judge) if options.judge else None,
    )
    try:
        per_dataset = {d.name: await _run_dataset(run, d) for d in datasets}
    finally:
        run.grader.close()
        store.close()
        if run.judge is not None:
            await run.judge.aclose()
    settings = {
        s: average([rows[s] for rows in per_dataset.values() if s in rows and "skipped" not in rows[s]])
        for s in options.settings
    }
    models = {
        "student": sorted({x["student_model"] for x in store.lines if x["student_model"]}),
        "teacher": sorted({x["teacher_model"] for x in store.lines if x["teacher_model"]}),
    }
    summary = {
        "settings": settings,
        "datasets": per_dataset,
        "pinned": store.pinned | {"models_as_served": models, "calibrated": run.calibrated},
        "throughput": {
            "answers_this_run": run.answered,
            "wall_s": run.wall_s,
            "answers_per_s": run.answered / run.wall_s if run.wall_s else None,
            "concurrency": options.concurrency,
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_outputs(out, summary)
    return summary
