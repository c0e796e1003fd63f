"""``relay-agents tutor``: the chat page (or ``--cli``, the terminal) on the configured
endpoints, or, with none configured, on the tiny relay world served by vLLM on the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from relay_agents.config import CONFIG_FILE_VAR, ConfigError, load_config
from relay_agents.core.config import Budget, RelayConfig
from relay_agents.tutor.service import TutorOptions, UnknownConversation

#: Teacher tokens per conversation on the tiny world: five problems' hard steps (4 tokens each).
TINY_BUDGET = Budget(max_teacher_tokens=20)
errors = Console(stderr=True, highlight=False)


def _configured(config_file: Path | None) -> bool:
    return bool(config_file or os.environ.get(CONFIG_FILE_VAR) or os.environ.get("RELAY_STUDENT_BASE_URL"))


def _fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@contextlib.contextmanager
def tutor_setup(config_file: Path | None) -> Iterator[tuple[RelayConfig, TutorOptions]]:
    """The relay config and tutor options: the configured endpoints, or the tiny pair started
    here (and stopped when the block ends)."""
    if _configured(config_file):
        try:
            config = load_config(config_file)
        except ConfigError as exc:
            raise _fail(str(exc), 2) from None
        yield config, TutorOptions(world="configured endpoints")
        return
    from relay_agents.serving import VLLMServerError, vllm_available
    from relay_agents.tiny import tasks
    from relay_agents.tiny.servers import tiny_pair_servers

    if not vllm_available():
        raise _fail(
            "no endpoints are configured (RELAY_CONFIG, RELAY_STUDENT_BASE_URL or --config), and the "
            "embedded tiny world needs vLLM: pip install 'relay-agents[cpu]' (or bash scripts/install.sh)"
        )
    try:
        servers = tiny_pair_servers()  # the shipped models (a build, if needed, shows its bars)
        servers.start()  # shows both start-ups against their expected time
    except VLLMServerError as exc:
        raise _fail(str(exc)) from None
    with servers:
        # The tiny models know one task, without a system prompt or earlier turns.
        options = TutorOptions(
            system_prompt=None,
            history_messages=1,
            world="tiny relay world",
            suggestions=tuple(p.question for p in tasks.eval_problems(3)),
        )
        yield servers.relay_config(budget=TINY_BUDGET), options


def tutor(
    host: Annotated[str, typer.Option(help="Address the page listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port the page listens on.")] = 8765,
    cli: Annotated[bool, typer.Option("--cli", help="Chat in this terminal instead of a web page.")] = False,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file; RELAY_* environment variables override it."),
    ] = None,
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
    """A maths tutor chat: the student explains step by step and relays hard steps to the
    teacher; teacher text is coloured, and each conversation's teacher budget is metered.
    With no endpoints configured it runs on the tiny relay world (vLLM on the CPU)."""
    try:
        import uvicorn

        from relay_agents.tutor.terminal import run_terminal
        from relay_agents.tutor.web import create_tutor_app, mathjax_dir
    except ImportError as exc:
        raise _fail(
            f"the tutor needs its extra ({exc.name} is missing): pip install 'relay-agents[tutor]'"
        ) from None
    with tutor_setup(config_file) as (config, options):
        if max_teacher_tokens is not None or max_cost_usd is not None:
            budget = Budget(max_teacher_tokens=max_teacher_tokens, max_cost_usd=max_cost_usd)
            config = config.model_copy(update={"budget": budget})
        if cli:
            try:
                asyncio.run(run_terminal(config, options, db, conversation))
            except UnknownConversation as exc:
                raise _fail(f"{exc}; /list in the terminal shows the conversations", 2) from None
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
