"""Running the relay server in the test's event loop on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import openai
import uvicorn

from relay_agents import RelayConfig
from relay_agents.server import ServerSettings, create_app
from relay_agents.server.listen import uvicorn_options


@contextlib.asynccontextmanager
async def serving(config: RelayConfig, settings: ServerSettings | None = None) -> AsyncIterator[str]:
    """Serve ``create_app(config, settings)`` with uvicorn on 127.0.0.1; yields the root URL."""
    settings = settings or ServerSettings()
    app = create_app(config, settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            backlog=2048,
            **uvicorn_options(settings),
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the startup error
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def sdk(url: str, api_key: str = "unused", **kw: object) -> openai.AsyncOpenAI:
    """The official client, as an application would configure it (no retries in tests)."""
    options: dict[str, object] = {"max_retries": 0, "timeout": 20.0}
    options.update(kw)
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, **options)  # type: ignore[arg-type]
