"""``relay-agents tutor``: the chat page (or ``--cli``, the terminal) on the configured
endpoints, or, with none configured, on the tiny relay world served by vLLM on the CPU."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from relay_agents.cli.common import ConfigOption, configured, errors, fail, load, tiny_pair

if TYPE_CHECKING:
    from relay_agents.core.config import RelayConfig
    from relay_agents.tutor.service import TutorOptions

#: Teacher tokens per conversation on the tiny world: five problems' hard steps (4 tokens each).
TINY_MAX_TEACHER_TOKENS = 20


@contextlib.contextmanager
def tutor_setup(config_file: Path | None) -> Iterator[tuple[RelayConfig, TutorOptions]]:
    """The relay config and tutor options: the configured endpoints, or the tiny pair started
    here (and stopped when the block ends)."""
    from relay_agents.core.config import Budget
    from relay_agents.tutor.service import TutorOptions

    if configured(config_file):
        yield load(config_file), TutorOptions(world="configured endpoints")
        return
    from relay_agents.tiny import tasks

    with tiny_pair() as servers:
        # The tiny models know one task, without a system prompt or earlier turns.
        options = TutorOptions(
            system_prompt=None,
            history_messages=1,
            world="tiny relay world",
            suggestions=tuple(p.question for p in tasks.eval_problems(3)),
        )
        yield servers.relay_config(budget=Budget(max_teacher_tokens=TINY_MAX_TEACHER_TOKENS)), options


def tutor(
    host: Annotated[str, typer.Option(help="Address the page listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port the page listens on.")] = 8765,
    cli: Annotated[bool, typer.Option("--cli", help="Chat in this terminal instead of a web page.")] = False,
    config_file: ConfigOption = None,
    db: Annotated[
        Path | None,
        typer.Option(help="SQLite file of the conversations (default: tutor.sqlite in the state dir)."),
    ] = None,
    conversation: Annotated[
        str | None, typer.Option(help="With --cli: open this conversation instead of a new one.")
    ] = None,
    max_teacher_tokens: Annotated[
        int | None, typer.Option(min=0, help="Teacher tokens each conversation may spend.")
    ] = None,
    max_cost_usd: Annotated[
        float | None, typer.Option(min=0, help="Teacher cost (USD) each conversation may spend.")
    ] = None,
) -> None:
    """A maths tutor chat whose student relays hard steps to the teacher.

    The student explains step by step; teacher text is coloured.
    Each conversation's teacher budget is metered.
    With no endpoints configured, it runs on the tiny relay world (vLLM on the CPU).
    """
    try:
        import uvicorn

        from relay_agents.tutor.service import UnknownConversation
        from relay_agents.tutor.terminal import run_terminal
        from relay_agents.tutor.web import create_tutor_app, mathjax_dir
    except ImportError as exc:
        raise fail(
            f"the tutor needs its extra ({exc.name} is missing): pip install 'relay-agents[tutor]'"
        ) from None
    from relay_agents.core.config import Budget

    with tutor_setup(config_file) as (config, options):
        if max_teacher_tokens is not None or max_cost_usd is not None:
            budget = Budget(max_teacher_tokens=max_teacher_tokens, max_cost_usd=max_cost_usd)
            config = config.model_copy(update={"budget": budget})
        if cli:
            try:
                asyncio.run(run_terminal(config, options, db, conversation))
            except UnknownConversation as exc:
                raise fail(f"{exc}; /list in the terminal shows the conversations", 2) from None
            return
        if mathjax_dir() is None:
            errors.print(
                "[yellow]note:[/yellow] MathJax is not installed; formulas show as TeX "
                "(pip install 'relay-agents[tutor]')"
            )
        app = create_tutor_app(config, options, db)
        errors.print(
            f"tutor on http://{host}:{port}/ (student {config.student.model}, "
            f"teacher {config.teacher.model}); Ctrl+C stops it"
        )
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown
            raise typer.Exit(130) from None
