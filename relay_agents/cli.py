"""The ``relay-agents`` command line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import openai
import typer
from rich.console import Console

from relay_agents.api import RelayResult, astream_relay
from relay_agents.config import ConfigError, RelayConfig, load_config

app = typer.Typer(help="Relay decoding: a small student model calls a large teacher for hard steps.")
console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)

TEACHER_STYLE = "bold magenta"

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file; RELAY_* environment variables override it."),
]


def _load(config_file: Path | None) -> RelayConfig:
    try:
        return load_config(config_file)
    except ConfigError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def usage_line(result: RelayResult) -> str:
    u = result.usage
    line = (
        f"student {u.student_tokens} tokens, teacher {u.teacher_tokens} tokens in "
        f"{u.teacher_calls} calls ({u.call_ratio:.1%} teacher), finish: {result.finish_reason}"
    )
    if u.cost_usd:
        line += f", cost ${u.cost_usd:.6f}"
    return line


async def _ask(question: str, config: RelayConfig, as_json: bool) -> RelayResult:
    stream = astream_relay(question, config)
    async for delta in stream:
        if not as_json:
            console.print(delta.text, style=TEACHER_STYLE if delta.source == "teacher" else None, end="")
    assert stream.result is not None
    return stream.result


@app.callback()
def main() -> None:
    """Relay decoding: a small student model calls a large teacher for hard steps."""


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    config_file: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
) -> None:
    """Answer one question with relay decoding; teacher text is highlighted."""
    config = _load(config_file)
    try:
        result = asyncio.run(_ask(question, config, as_json))
    except openai.APIError as exc:
        errors.print(f"\n[red]error:[/red] the student endpoint failed: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(result.model_dump(mode="json", exclude={"message"}), indent=2))
        return
    console.print()
    for event in result.events:
        errors.print(f"[yellow]note:[/yellow] {event.message}")
    errors.print(f"[dim]{usage_line(result)}[/dim]  [{TEACHER_STYLE}]teacher text[/{TEACHER_STYLE}]")


if __name__ == "__main__":  # pragma: no cover
    app()
