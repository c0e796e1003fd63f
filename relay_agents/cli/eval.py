"""``relay-agents eval``: every setting on a data set, written to a resumable output folder."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from relay_agents.cli.common import ConfigOption, configured, console, errors, fail, load, tiny_pair

if TYPE_CHECKING:
    from relay_agents.core.config import Endpoint, RelayConfig
    from relay_agents.eval import Dataset, EvalOptions, Progress
    from relay_agents.tiny.servers import TinyPairServers


def _progress_bar() -> tuple[contextlib.AbstractContextManager[object], Progress]:
    """A rich progress bar on stderr (rate and ETA) and the harness's hooks into it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    from relay_agents.eval import Progress

    bar = Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("[dim]{task.fields[rate]}[/dim]"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=errors,
    )
    current: list[int] = []

    def start(label: str, total: int) -> None:
        if current:
            bar.update(current[-1], visible=False)
        current.append(bar.add_task(label, total=total or None, rate=""))

    def advance() -> None:
        bar.advance(current[-1])
        speed = bar.tasks[-1].speed
        bar.update(current[-1], rate=f"{speed:.2f} answers/s" if speed else "")

    return bar, Progress(start=start, advance=advance)


def _run(config: RelayConfig, datasets: list[Dataset], out: Path, options: EvalOptions) -> None:
    from relay_agents.eval import RunMismatch, run_eval

    bar, progress = _progress_bar()
    try:
        with bar:
            summary = asyncio.run(run_eval(config, datasets, out, options, progress=progress))
    except RunMismatch as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        errors.print(
            f"[yellow]interrupted:[/yellow] the finished answers are in {out / 'results.jsonl'}; "
            "run the same command again to resume"
        )
        raise typer.Exit(130) from None
    for name, row in summary["settings"].items():
        if "accuracy" in row:
            console.print(
                f"{name:>24}: accuracy {row['accuracy']:.1%}, teacher tokens {row['teacher_share']:.2%}, "
                f"{row['teacher_calls_per_answer']:.2f} calls/answer"
            )
    console.print(f"results, summary.json, report.md and pareto.png in {out}")


def eval_command(
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            "-d",
            help="'tiny', 'reasoning-gym:TASK', a published set (math500, gsm8k@REVISION, ...) or a "
            "JSON Lines file of {id?, question, answer, choices?}; repeat for several sets.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder; an existing one is resumed.")],
    config_file: ConfigOption = None,
    settings: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated rows (default: all): relay, student, teacher, teacher-free, interval, "
            "random, random-router@cost, random-router@accuracy."
        ),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", "-k", min=1, help="Answers per item (K).")] = 1,
    temperature: Annotated[
        float | None, typer.Option(min=0.0, help="Sampling temperature of both models (default: config).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of sample 0 (sample k: seed + k), of generated sets and draws.")
    ] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N items of each set.")] = None,
    size: Annotated[int, typer.Option(min=1, help="Items drawn for 'tiny' and reasoning-gym sets.")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, help="Answers relayed at once.")] = 8,
    calibration_items: Annotated[
        int, typer.Option(min=1, help="Items on which interval and random are matched to the relay's share.")
    ] = 50,
    student_alone_url: Annotated[
        str | None,
        typer.Option(
            help="API root of a separate model for the student row (and interval, random): e.g. the "
            "student before relay training. Its other settings are the student's."
        ),
    ] = None,
    student_alone_model: Annotated[
        str | None, typer.Option(help="The separate student's model id (with --student-alone-url).")
    ] = None,
    student_alone_tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="Its local model folder (tokenizer_config.json's chat template); default: the server's."
        ),
    ] = None,
    judge_url: Annotated[
        str | None,
        typer.Option(
            help="API root of a chat model that re-checks the answers the rules graded wrong "
            "(reported in its own column, never in the accuracy); key in RELAY_JUDGE_API_KEY."
        ),
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="The judge's model id (with --judge-url).")] = None,
) -> None:
    """Measure the relay against its baselines on a data set, with every setting pinned.

    Writes results.jsonl, summary.json, report.md and pareto.png into --out; the same command
    run again resumes it. With no endpoints configured, the embedded tiny world answers.
    """
    from relay_agents.eval import SETTINGS, DataError, EvalOptions, load_data, parse_settings

    judge = _endpoint(
        "judge", judge_url, judge_model, api="chat", api_key=os.environ.get(JUDGE_KEY_VAR, "EMPTY")
    )
    try:
        options = EvalOptions(
            settings=parse_settings(settings or SETTINGS),
            samples=samples,
            temperature=temperature,
            seed=seed,
            limit=limit,
            concurrency=concurrency,
            calibration_items=calibration_items,
            judge=judge,
        )
        datasets = [load_data(spec, size=size, seed=seed) for spec in data]
    except (DataError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    alone = {"model": student_alone_model, "tokenizer_path": student_alone_tokenizer}
    if configured(config_file):
        config = load(config_file)
        solo = _endpoint("student-alone", student_alone_url, **alone, like=config.student)
        _run(config, datasets, out, dataclasses.replace(options, student_alone=solo))
        return
    with tiny_pair() as servers:
        config = servers.relay_config()
        solo = _endpoint("student-alone", student_alone_url, **alone, like=config.student)
        if solo is not None:
            _run(config, datasets, out, dataclasses.replace(options, student_alone=solo))
            return
        with _tiny_student_alone(servers) as served:
            _run(config, datasets, out, dataclasses.replace(options, student_alone=served))


#: The judge's API key (never a command-line argument: those show in process lists).
JUDGE_KEY_VAR = "RELAY_JUDGE_API_KEY"


def _endpoint(
    option: str, url: str | None, model: str | None, *, like: Endpoint | None = None, **settings: Any
) -> Endpoint | None:
    """The endpoint ``--OPTION-url`` and ``--OPTION-model`` name (``None`` without them), with the
    other settings of ``like`` (a model's own ones, its template and context, are not copied) or
    else the defaults."""
    from pydantic import ValidationError

    from relay_agents.core.config import Endpoint

    if url is None and model is None:
        return None
    if url is None or model is None:
        raise fail(f"--{option}-url and --{option}-model go together", 2)
    given = {"base_url": url, "model": model} | settings
    if like is not None:
        own = {"chat_template": None, "tokenizer_path": None, "context_tokens": None}
        return like.model_copy(update=own | given)
    try:
        return Endpoint.model_validate(given)
    except ValidationError as exc:
        raise fail(f"--{option}-url/--{option}-model: {exc}", 2) from None


@contextlib.contextmanager
def _tiny_student_alone(servers: TinyPairServers) -> Iterator[Endpoint | None]:
    """The tiny world's solo student (trained without relay) served for the ``student`` row, as
    the RelayLLM paper's table compares the student before relay training; ``None`` for a build
    without one."""
    from relay_agents.core.config import Endpoint
    from relay_agents.serving import VLLMServerError
    from relay_agents.tiny.servers import solo_server

    if servers.pair.solo_dir is None:
        yield None
        return
    solo = solo_server(servers)
    try:
        with errors.status("Starting the solo student's vLLM server (~30 s)"):
            solo.start()
    except VLLMServerError as exc:
        raise fail(str(exc)) from None
    with solo:
        yield Endpoint(
            base_url=solo.base_url, model=solo.model, tokenizer_path=servers.pair.solo_dir, temperature=0.0
        )
