"""``relay-agents ask``: one question, answered on the configured endpoints."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from relay_agents.cli.common import (
    TEACHER_STYLE,
    ConfigOption,
    console,
    errors,
    fail,
    load,
    stream_answer,
    usage_line,
)


def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    config_file: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
) -> None:
    """Answer one question with relay decoding; teacher text is highlighted."""
    import openai

    config = load(config_file)
    try:
        result = asyncio.run(stream_answer(question, config, show=not as_json))
    except openai.APIError as exc:  # its message names the endpoint (student or teacher) and a hint
        errors.print()
        raise fail(f"{type(exc).__name__}: {exc}") from None
    if as_json:
        print(json.dumps(result.model_dump(mode="json", exclude={"message"}), indent=2))
        return
    console.print()
    for event in result.events:
        errors.print(f"[yellow]note:[/yellow] {event.message}")
    errors.print(f"[dim]{usage_line(result)}[/dim]  [{TEACHER_STYLE}]teacher text[/{TEACHER_STYLE}]")
