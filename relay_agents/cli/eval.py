"""``relay-agents eval``: every setting on a data set, written to a resumable output folder."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
) -> None:
    """Measure the relay against its baselines on a data set, with every setting pinned.

    Writes results.jsonl, summary.json, report.md and pareto.png into --out; the same command
    run again resumes it. With no endpoints configured, the embedded tiny world answers.
    """
    from relay_agents.eval import SETTINGS, DataError, EvalOptions, load_data, parse_settings

    try:
        options = EvalOptions(
            settings=parse_settings(settings or SETTINGS),
            samples=samples,
            temperature=temperature,
            seed=seed,
            limit=limit,
            concurrency=concurrency,
            calibration_items=calibration_items,
        )
        datasets = [load_data(spec, size=size, seed=seed) for spec in data]
    except (DataError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    if configured(config_file):
        _run(load(config_file), datasets, out, options)
        return
    with tiny_pair() as servers, _tiny_student_alone(servers) as solo:
        _run(servers.relay_config(), datasets, out, dataclasses.replace(options, student_alone=solo))


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
