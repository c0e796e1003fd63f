"""``relay-agents serve``: the relay as an OpenAI-compatible HTTP API."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from relay_agents.cli.common import ConfigOption, configured, errors, fail, load, plural, tiny_pair

if TYPE_CHECKING:
    from relay_agents.core.config import RelayConfig


@contextlib.contextmanager
def relay_config(config_file: Path | None, workers: int) -> Iterator[RelayConfig]:
    """The configured endpoints, or (with none configured) the tiny pair, served for the block."""
    if configured(config_file):
        yield load(config_file)
        return
    if workers > 1:
        raise fail("no endpoints are configured: the tiny world is served by one worker (drop --workers)", 2)
    errors.print("no endpoints are configured: serving the tiny relay world (vLLM on the CPU)")
    with tiny_pair() as servers:
        errors.print(f"tiny world: student {servers.student.base_url}, teacher {servers.teacher.base_url}")
        yield servers.relay_config()


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
    """Serve the relay as an OpenAI-compatible API.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics.
    RELAY_API_KEYS (comma-separated) turns on bearer keys.
    With no endpoints configured, it serves the tiny relay world (vLLM on the CPU).
    """
    try:
        import uvicorn

        from relay_agents.server import ServerSettings, create_app
        from relay_agents.server.listen import uvicorn_options
        from relay_agents.server.workers import WORKER_APP, worker_environment
    except ImportError as exc:
        raise fail(
            f"the server needs its extra ({exc.name} is missing):\n  pip install 'relay-agents[server]'"
        ) from None
    from relay_agents.config import ConfigError

    flags = {"host": host, "port": port, "log_level": log_level, "workers": workers}
    try:
        settings = ServerSettings.load(config_file=config_file, **flags)
    except (ConfigError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    with relay_config(config_file, settings.workers) as config:
        try:
            server_app = create_app(config, settings)  # the workers' config and settings are valid
        except (ConfigError, ValueError) as exc:
            raise fail(str(exc), 2) from None
        keys = plural(len(settings.api_keys), "API key") if settings.api_keys else "no API keys (open)"
        processes = f", {settings.workers} workers" if settings.workers > 1 else ""
        errors.print(
            f"serving model {settings.model!r} on http://{settings.host}:{settings.port}/v1 "
            f"(student {config.student.model}, teacher {config.teacher.model}; {keys}{processes})"
        )
        listen = {"host": settings.host, "port": settings.port, "log_level": settings.log_level}
        listen |= {
            "backlog": 2048,
            "timeout_graceful_shutdown": settings.drain_timeout_s,
            **uvicorn_options(settings),
        }
        try:
            if settings.workers == 1:
                uvicorn.run(server_app, **listen)
            else:
                with worker_environment(config_file, **flags):
                    uvicorn.run(WORKER_APP, factory=True, workers=settings.workers, **listen)
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown
            raise typer.Exit(130) from None
