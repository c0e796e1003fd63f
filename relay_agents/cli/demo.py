"""``relay-agents demo``: held-out tiny-world problems relayed on screen."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from relay_agents.cli.common import (
    TEACHER_STYLE,
    ConfigOption,
    configured,
    console,
    load,
    stream_answer,
    tiny_pair,
    usage_line,
)

if TYPE_CHECKING:
    from relay_agents.core.config import RelayConfig


async def relay_problems(config: RelayConfig, count: int) -> tuple[int, int, int]:
    """Relay the first ``count`` evaluation problems; returns (correct, student tokens, teacher tokens)."""
    from relay_agents.tiny import tasks

    correct = student = teacher = 0
    for problem in tasks.eval_problems(count):
        console.rule(f"[bold]{problem.question}")
        result = await stream_answer(problem.question, config)
        console.print()
        ok = tasks.is_correct(result.text, problem.gold)
        correct += ok
        student += result.usage.student_tokens
        teacher += result.usage.teacher_tokens
        mark = "[green]correct[/green]" if ok else f"[red]wrong[/red] (expected {problem.gold})"
        console.print(f"{mark}  [dim]{usage_line(result)}[/dim]")
        for event in result.events:
            console.print(f"[yellow]note:[/yellow] {event.message}")
    return correct, student, teacher


def demo(
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="How many problems to relay.")] = 3,
    config_file: ConfigOption = None,
) -> None:
    """Relay a few held-out tiny-world problems.

    With no endpoints configured, it builds (or loads) the tiny student/teacher pair.
    It serves them with vLLM on the CPU and stops the servers when done.
    """
    if configured(config_file):
        correct, student, teacher = asyncio.run(relay_problems(load(config_file), count))
    else:
        with tiny_pair() as servers:
            console.print(
                f"[dim]student {servers.student.base_url}, teacher {servers.teacher.base_url}; "
                f"logs in {servers.student.log_path.parent if servers.student.log_path else '-'}[/dim]"
            )
            correct, student, teacher = asyncio.run(relay_problems(servers.relay_config(), count))
    console.rule()
    share = teacher / (student + teacher) if student + teacher else 0.0
    console.print(
        f"{correct}/{count} correct; the teacher wrote {share:.1%} of the answer tokens "
        f"([{TEACHER_STYLE}]highlighted[/{TEACHER_STYLE}])."
    )
