"""What every command shares: the ``--config`` option, loading the config, the consoles, and the
tiny student/teacher pair that stands in when no endpoints are configured.

Only light modules are imported here; a command imports the relay (LangGraph, LangChain, OpenAI)
when it runs, so ``relay-agents --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from relay_agents.api import RelayResult
    from relay_agents.core.config import RelayConfig
    from relay_agents.tiny.servers import TinyPairServers

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)

TEACHER_STYLE = "bold magenta"

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file; RELAY_* environment variables override it."),
]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` as an error (as written: no markup, no wrapping); the caller raises the
    returned exit."""
    errors.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def load(config_file: Path | None) -> RelayConfig:
    """The relay config from ``config_file`` and RELAY_* variables; a bad one exits 2."""
    from relay_agents.config import ConfigError, load_config

    try:
        return load_config(config_file)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None


def configured(config_file: Path | None) -> bool:
    """Whether endpoints are given (``--config``, RELAY_CONFIG or RELAY_STUDENT_BASE_URL)."""
    from relay_agents.config import CONFIG_FILE_VAR

    return bool(config_file or os.environ.get(CONFIG_FILE_VAR) or os.environ.get("RELAY_STUDENT_BASE_URL"))


@contextlib.contextmanager
def tiny_pair() -> Iterator[TinyPairServers]:
    """The tiny student/teacher pair built (or loaded) and served by vLLM on the CPU for the block."""
    from relay_agents.serving import VLLMServerError, vllm_available
    from relay_agents.tiny.servers import tiny_pair_servers

    if not vllm_available():
        raise fail(
            "no endpoints are configured (RELAY_CONFIG, RELAY_STUDENT_BASE_URL or --config), and the "
            "embedded tiny world needs vLLM: pip install 'relay-agents[cpu]' (or bash scripts/install.sh)"
        )
    try:
        with errors.status("Building or loading the tiny student/teacher pair (first run: ~3 min)"):
            servers = tiny_pair_servers()
        with errors.status("Starting two vLLM servers on the CPU (~30 s)"):
            servers.start()
    except VLLMServerError as exc:
        raise fail(str(exc)) from None
    with servers:
        yield servers


def plural(count: int, noun: str) -> str:
    """``1 call``, ``2 calls``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def usage_line(result: RelayResult) -> str:
    """One line of what an answer cost: tokens by side, teacher calls, finish reason, and the
    thinking mode and preset (results differ with them)."""
    u = result.usage
    line = (
        f"student {plural(u.student_tokens, 'token')}, teacher {plural(u.teacher_tokens, 'token')} in "
        f"{plural(u.teacher_calls, 'call')} ({u.call_ratio:.1%} teacher), finish: {result.finish_reason}, "
        f"thinking {'on' if result.enable_thinking else 'off'}"
    )
    if result.preset:
        line += f", preset {result.preset}"
    if u.cost_usd:
        line += f", cost ${u.cost_usd:.6f}"
    return line


async def stream_answer(question: str, config: RelayConfig, *, show: bool = True) -> RelayResult:
    """Relay ``question``, printing the text as it comes (teacher text highlighted)."""
    from relay_agents.api import astream_relay

    stream = astream_relay(question, config)
    async for delta in stream:
        if show:
            console.print(delta.text, style=TEACHER_STYLE if delta.source == "teacher" else None, end="")
    assert stream.result is not None
    return stream.result
