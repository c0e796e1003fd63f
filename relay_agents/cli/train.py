"""``relay-agents train``: the data steps of training a relay student (teacher-pass filter,
cold-start SFT data); each writes JSON Lines as it goes and resumes when run again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer

from relay_agents.cli.common import ConfigOption, configured, console, errors, fail, load, tiny_pair
from relay_agents.cli.train_grpo import grpo

if TYPE_CHECKING:
    from rich.progress import Progress

    from relay_agents.core.config import RelayConfig
    from relay_agents.eval import Dataset

train = typer.Typer(
    help="Train a relay student: teacher-pass filter, cold-start SFT data, GRPO with relay rollouts."
)

Result = TypeVar("Result")

DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="'tiny', 'reasoning-gym:TASK', a published set (math500, gsm8k@REVISION, ...) or a JSON "
        "Lines file of {id?, question, answer, choices?}.",
    ),
]
SizeOption = Annotated[int, typer.Option(min=1, help="Items drawn for 'tiny' and reasoning-gym sets.")]
SeedOption = Annotated[int, typer.Option(help="Seed of generated sets (and of random command positions).")]
ConcurrencyOption = Annotated[int, typer.Option(min=1, help="Problems answered at once.")]


def _dataset(spec: str, size: int, seed: int) -> Dataset:
    from relay_agents.eval import DataError, load_data

    try:
        return load_data(spec, size=size, seed=seed)
    except DataError as exc:
        raise fail(str(exc), 2) from None


@contextlib.contextmanager
def _config(config_file: Path | None) -> Iterator[RelayConfig]:
    """The configured endpoints, else the embedded tiny world's pair for the block."""
    if configured(config_file):
        yield load(config_file)
        return
    with tiny_pair() as servers:
        yield servers.relay_config()


def _run(label: str, out: Path, work: Callable[[Progress], Coroutine[Any, Any, Result]]) -> Result:
    """Run ``work`` under a step bar on stderr; Ctrl-C says how to resume."""
    from relay_agents.progress import step_bars

    try:
        with step_bars(errors) as bar:
            return asyncio.run(work(bar))
    except KeyboardInterrupt:
        errors.print(
            f"[yellow]interrupted:[/yellow] the finished problems are in {out}; run the same command "
            f"again to resume {label}"
        )
        raise typer.Exit(130) from None


def _failed(failed: dict[str, str]) -> None:
    if failed:
        for problem, error in sorted(failed.items())[:10]:
            errors.print(f"[red]{problem}[/red]: {error}", soft_wrap=True)
        raise fail(f"{len(failed)} problems failed; run the same command again to retry them")


@train.command(name="filter")
def filter_command(
    data: DataOption,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Kept problems (JSON Lines); dropped ones go beside it.")
    ],
    config_file: ConfigOption = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Teacher answers per problem.")] = 16,
    rule: Annotated[
        str,
        typer.Option(
            help="'any': keep a problem with any correct answer (the published code's); 'max-failures:F/S': "
            "keep one failed at most F times in S (the RelayLLM paper's: max-failures:5/10)."
        ),
    ] = "any",
    temperature: Annotated[float, typer.Option(min=0.0, help="The teacher's sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="The teacher's top-p.")] = 0.95,
    per_request: Annotated[
        int | None,
        typer.Option(min=1, help="Answers per request (the API's n; default k); 1 for an API without n."),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Cap on each answer (default: the config's max_answer_tokens).")
    ] = None,
    size: SizeOption = 200,
    seed: SeedOption = 0,
    concurrency: ConcurrencyOption = 8,
) -> None:
    """Keep the problems the teacher can solve: k answers each, graded, kept or dropped by a rule.

    Each problem is written with its pass count as it finishes (kept ones to --out, dropped ones
    to OUT.dropped.jsonl); the same command run again resumes. With no endpoints configured,
    the embedded tiny world's teacher answers.
    """
    from relay_agents.train.filter import FilterMismatch, FilterOptions, dropped_path, parse_rule, run_filter

    try:
        options = FilterOptions(
            k=k,
            rule=parse_rule(rule),
            temperature=temperature,
            top_p=top_p,
            per_request=per_request,
            max_tokens=max_tokens,
            concurrency=concurrency,
        )
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    dataset = _dataset(data, size, seed)
    with _config(config_file) as config:

        async def work(bar: Progress) -> Any:
            task = bar.add_task("teacher", total=None)
            return await run_filter(
                config,
                dataset,
                out,
                options,
                on_start=lambda total: bar.update(task, total=total),
                on_done=lambda _row: bar.advance(task),
            )

        try:
            summary = _run("the filter", out, work)
        except FilterMismatch as exc:
            raise fail(str(exc), 2) from None
    console.print(
        f"kept {summary.kept}, dropped {summary.dropped} (rule {options.rule.text}, k={k}); "
        f"{summary.resumed} filtered before. Kept: {out}, dropped: {dropped_path(out)}"
    )
    _failed(summary.failed)


@train.command(name="cold-start")
def cold_start_command(
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="SFT rows (chat-format JSON Lines).")],
    config_file: ConfigOption = None,
    method: Annotated[
        str,
        typer.Option(
            help="'confidence': commands where the student is unsure, the teacher's text spliced in; "
            "'random': commands at random token positions, no teacher text (the published variant)."
        ),
    ] = "confidence",
    threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="confidence: tokens below this probability call.")
    ] = 0.5,
    call_tokens: Annotated[
        int, typer.Option(min=1, help="confidence: most tokens per teacher call; random: each command's N.")
    ] = 8,
    calls: Annotated[int, typer.Option(min=1, help="random: commands per answer.")] = 1,
    only_correct: Annotated[
        bool, typer.Option("--only-correct/--keep-incorrect", help="Keep only answers graded correct.")
    ] = True,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="The student's tokenizer directory (default: the student endpoint's tokenizer_path): rows "
            "then carry input_ids and labels with the loss masks."
        ),
    ] = None,
    teacher_loss: Annotated[
        bool,
        typer.Option(
            "--teacher-loss/--no-teacher-loss",
            help="Train on the teacher's spans too (default: masked, -100, like the prompt).",
        ),
    ] = False,
    size: SizeOption = 200,
    seed: SeedOption = 0,
    concurrency: ConcurrencyOption = 8,
) -> None:
    """Write cold-start SFT rows: student answers with call commands in them.

    Rows are chat-format JSON Lines that TRL's SFTTrainer takes as they are ("messages"), with
    the teacher's spans marked ("teacher_spans"); the same command run again resumes. With no
    endpoints configured, the embedded tiny world's pair answers.
    """
    from relay_agents.train.cold_start import ColdStartOptions, run_cold_start, skipped_path

    if method not in ("confidence", "random"):
        raise fail(f"unknown method {method!r}: use 'confidence' or 'random'", 2)
    chosen: Literal["confidence", "random"] = "confidence" if method == "confidence" else "random"
    options = ColdStartOptions(
        method=chosen,
        threshold=threshold,
        call_tokens=call_tokens,
        calls=calls,
        only_correct=only_correct,
        teacher_loss=teacher_loss,
        seed=seed,
        concurrency=concurrency,
    )
    dataset = _dataset(data, size, seed)
    with _config(config_file) as config:
        directory = tokenizer or config.student.tokenizer_path
        loaded = _load_tokenizer(directory) if directory is not None else None

        async def work(bar: Progress) -> Any:
            task = bar.add_task("student", total=None)
            return await run_cold_start(
                config,
                dataset,
                out,
                options,
                tokenizer=loaded,
                on_start=lambda total: bar.update(task, total=total),
                on_done=lambda: bar.advance(task),
            )

        summary = _run("the cold start", out, work)
    console.print(
        f"wrote {summary.written} rows ({method}), skipped {summary.incorrect} incorrect answers; "
        f"{summary.resumed} done before. Rows: {out}, skipped: {skipped_path(out)}"
    )
    _failed(summary.failed)


def _load_tokenizer(directory: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise fail("--tokenizer needs transformers: pip install 'relay-agents[train]'", 2) from None
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise fail(f"cannot load the tokenizer in {directory}: {exc}", 2) from None


train.command(name="grpo")(grpo)
