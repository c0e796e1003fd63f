"""``relay-agents calibrate``: the confidence threshold for a target teacher-token share."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from relay_agents.cli.common import ConfigOption, console, fail, load

if TYPE_CHECKING:
    from relay_agents.calibrate import Point
    from relay_agents.core.config import RelayConfig


def calibrate_threshold(
    config: RelayConfig,
    *,
    target_share: float,
    dev: str,
    count: int | None,
    thresholds: Sequence[float] | None,
    refine: int,
    output: Path | None,
    concurrency: int,
) -> None:
    """Print the share/accuracy curve as it is measured, then save the chosen threshold."""
    from rich.table import Table

    import relay_agents.calibrate as calibration

    problems = calibration.load_dev_set(dev, count)
    grid = sorted(thresholds or calibration.DEFAULT_THRESHOLDS)
    console.print(
        f"calibrating the confidence threshold to {target_share:.1%} teacher tokens on "
        f"{len(problems)} development problems ({dev}); {len(grid)} thresholds, {refine} refinements"
    )

    def progress(point: Point) -> None:
        console.print(
            f"  threshold {point.value:.4g}: share {point.share:.1%}, accuracy {point.accuracy:.1%}",
            style="dim",
        )

    curve, chosen = asyncio.run(
        calibration.calibrate(
            calibration.confidence_builder(config),
            grid,
            target_share,
            problems,
            refine=refine,
            concurrency=concurrency,
            on_point=progress,
        )
    )
    table = Table(title="teacher-token share and accuracy by threshold")
    for name in ("threshold", "teacher share", "accuracy", "calls", "errors"):
        table.add_column(name, justify="right")
    for point in curve:
        mark = " <" if point is chosen else ""
        table.add_row(
            f"{point.value:.4g}{mark}",
            f"{point.share:.1%}",
            f"{point.accuracy:.1%}",
            str(point.teacher_calls),
            str(point.errors),
        )
    console.print(table)
    policy = calibration.confidence_builder(config)(chosen.value).policy
    console.print(
        f"chosen: threshold {chosen.value:.4g} (share {chosen.share:.1%}, target {target_share:.1%}, "
        f"accuracy {chosen.accuracy:.1%})"
    )
    if output is None:
        console.print(calibration.policy_table(policy), markup=False)
        console.print("[yellow]no config file to save into: pass --output or --config[/yellow]")
        return
    calibration.write_policy(output, policy)
    console.print(f"saved into {output} (\\[policy] table)")


def calibrate(
    target_share: Annotated[
        float, typer.Option("--target-share", "-t", min=0.0, max=1.0, help="Teacher-token share to reach.")
    ],
    config_file: ConfigOption = None,
    dev: Annotated[
        str, typer.Option(help="Development set: 'tiny' or a JSON Lines file of {question, answer}.")
    ] = "tiny",
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Use the first N problems.")
    ] = None,
    thresholds: Annotated[
        str | None, typer.Option(help="Comma-separated thresholds to sweep (default: 0.02 ... 0.95).")
    ] = None,
    refine: Annotated[int, typer.Option(min=0, help="Bisection steps after the sweep.")] = 3,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Config file to save into (default: --config).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Answers relayed at once.")] = 16,
) -> None:
    """Pick the confidence threshold that reaches a target teacher-token share.

    The share is measured on a development set and printed as a share/accuracy curve.
    The chosen threshold is saved into the config file's \\[policy] table.
    """
    config = load(config_file)
    try:
        grid = [float(v) for v in thresholds.split(",")] if thresholds else None
        calibrate_threshold(
            config,
            target_share=target_share,
            dev=dev,
            count=count,
            thresholds=grid,
            refine=refine,
            output=output or config_file,
            concurrency=concurrency,
        )
    except (OSError, ValueError) as exc:
        raise fail(str(exc), 2) from None
