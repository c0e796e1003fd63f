"""Progress of long steps on stderr: rich bars with steps, rate and ETA.

A model build takes minutes on a quiet machine and half an hour on a loaded one, a vLLM
start-up half a minute; one spinner cannot tell the two apart. These bars show a step count,
a rate and an ETA (builds) or the elapsed against the expected time (start-ups). They go to
stderr, and only when it is a terminal: CI logs and pipes keep the plain log lines.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

#: The console of every bar (and of ``python -m relay_agents.tiny``'s log lines, so that they
#: print above a live bar instead of through it).
STDERR = Console(stderr=True, highlight=False)


class RateColumn(ProgressColumn):
    """Steps per second (rich's own speed columns count bytes or "it")."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f} steps/s", style="progress.data.speed")


class ElapsedOfExpectedColumn(ProgressColumn):
    """``12 s of ~30 s``: a wait whose length is only known from earlier runs."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.elapsed or 0:.0f} s of ~{task.total or 0:.0f} s", style="progress.elapsed")


def _bars(console: Console | None, *columns: ProgressColumn) -> Progress:
    console = console or STDERR
    return Progress(*columns, console=console, disable=not console.is_terminal)


def step_bars(console: Console | None = None) -> Progress:
    """Bars for counted steps (training steps): ``teacher ━━━╸ 120/500 3.1 steps/s 0:00:39 ETA 0:02:03``."""
    return _bars(
        console,
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


def wait_bars(console: Console | None = None) -> Progress:
    """Bars for waits measured in seconds against an expected time (a server's start-up);
    a task's ``total`` is the expected seconds, its ``completed`` the seconds waited so far."""
    return _bars(
        console,
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        ElapsedOfExpectedColumn(),
    )
