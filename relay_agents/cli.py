"""The ``relay-agents`` command line."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated

import openai
import typer
from rich.console import Console

from relay_agents.api import RelayResult, astream_relay
from relay_agents.calibrate import calibrate_command
from relay_agents.config import CONFIG_FILE_VAR, ConfigError, load_config
from relay_agents.core.config import RelayConfig
from relay_agents.tutor.command import tutor as tutor_command

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


async def _stream(question: str, config: RelayConfig, *, show: bool = True) -> RelayResult:
    stream = astream_relay(question, config)
    async for delta in stream:
        if show:
            console.print(delta.text, style=TEACHER_STYLE if delta.source == "teacher" else None, end="")
    assert stream.result is not None
    return stream.result


def _configured() -> bool:
    return bool(os.environ.get(CONFIG_FILE_VAR) or os.environ.get("RELAY_STUDENT_BASE_URL"))


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
        result = asyncio.run(_stream(question, config, show=not as_json))
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


async def _demo(config: RelayConfig, count: int) -> tuple[int, int, int]:
    from relay_agents.tiny import tasks

    correct = student = teacher = 0
    for problem in tasks.eval_problems(count):
        console.rule(f"[bold]{problem.question}")
        result = await _stream(problem.question, config)
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


@app.command()
def demo(
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="How many problems to relay.")] = 3,
    config_file: ConfigOption = None,
) -> None:
    """Relay a few held-out tiny-world problems. With no endpoints configured, this builds (or
    loads) the tiny student/teacher pair, serves them with vLLM on the CPU, and shuts down after."""
    from relay_agents.serving import VLLMServerError, vllm_available
    from relay_agents.tiny.servers import tiny_pair_servers

    if config_file is not None or _configured():
        config = _load(config_file)
        correct, student, teacher = asyncio.run(_demo(config, count))
    else:
        if not vllm_available():
            errors.print("[red]error:[/red] the embedded demo serves its models with vLLM; install it with")
            errors.print("  pip install 'relay-agents[cpu]'   (or: bash scripts/install.sh)")
            raise typer.Exit(1)
        try:
            servers = tiny_pair_servers()  # the shipped models (a build, if needed, shows its bars)
            servers.start()  # shows both start-ups against their expected time
        except VLLMServerError as exc:
            errors.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        with servers:
            console.print(
                f"[dim]student {servers.student.base_url}, teacher {servers.teacher.base_url}; "
                f"logs in {servers.student.log_path.parent if servers.student.log_path else '-'}[/dim]"
            )
            correct, student, teacher = asyncio.run(_demo(servers.relay_config(), count))
    console.rule()
    share = teacher / (student + teacher) if student + teacher else 0.0
    console.print(
        f"{correct}/{count} correct; the teacher wrote {share:.1%} of the answer tokens "
        f"([{TEACHER_STYLE}]highlighted[/{TEACHER_STYLE}])."
    )


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (RELAY_SERVER_HOST; default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (RELAY_SERVER_PORT; default 8000).")
    ] = None,
    config_file: ConfigOption = None,
    log_level: Annotated[
        str | None, typer.Option(help="uvicorn log level (RELAY_SERVER_LOG_LEVEL; default info).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Server processes sharing the port (RELAY_SERVER_WORKERS; default 1)."),
    ] = None,
) -> None:
    """Serve the relay as an OpenAI-compatible API: /v1/chat/completions, /v1/completions,
    /v1/models, /health and /metrics. RELAY_API_KEYS (comma-separated) turns on bearer keys."""
    try:
        import uvicorn

        from relay_agents.server import ServerSettings, create_app
        from relay_agents.server.workers import WORKER_APP, worker_environment
    except ImportError as exc:
        errors.print(f"[red]error:[/red] the server needs its extra ({exc.name} is missing):")
        errors.print("  pip install 'relay-agents[server]'")
        raise typer.Exit(1) from None
    config = _load(config_file)
    try:
        flags = {"host": host, "port": port, "log_level": log_level, "workers": workers}
        settings = ServerSettings.load(config_file=config_file, **flags)
        server_app = create_app(config, settings)  # the workers' config and settings are valid
    except (ConfigError, ValueError) as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    keys = f"{len(settings.api_keys)} API keys" if settings.api_keys else "no API keys (open)"
    processes = f", {settings.workers} workers" if settings.workers > 1 else ""
    errors.print(
        f"serving model {settings.model!r} on http://{settings.host}:{settings.port}/v1 "
        f"(student {config.student.model}, teacher {config.teacher.model}; {keys}{processes})"
    )
    listen = {"host": settings.host, "port": settings.port, "log_level": settings.log_level}
    listen |= {"backlog": 2048, "timeout_graceful_shutdown": 5}
    try:
        if settings.workers == 1:
            uvicorn.run(server_app, **listen)
        else:
            with worker_environment(config_file, **flags):
                uvicorn.run(WORKER_APP, factory=True, workers=settings.workers, **listen)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown
        raise typer.Exit(130) from None


app.command(name="tutor")(tutor_command)
app.command(name="calibrate")(calibrate_command)


if __name__ == "__main__":  # pragma: no cover
    app()
