"""The tutor on loopback for the tests: its app served by uvicorn, backed by the scripted upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from relay_agents import Budget, RelayConfig
from relay_agents.testing import ScriptedServer
from relay_agents.tutor.service import TutorOptions
from relay_agents.tutor.web import create_tutor_app
from tests.conftest import relay_config

#: Student and teacher scripts of one relayed answer (script_answer matches them by a key in the question).
STUDENT = [
    "To find 12*34, multiply: 12*34 =<call>3</call>",
    ". Then add 1: $408 + 1 = 409$. So \\boxed{409}.",
]
TEACHER = [" 408 and more"]
ANSWER = "To find 12*34, multiply: 12*34 = 408. Then add 1: $408 + 1 = 409$. So \\boxed{409}."


def script_answer(server: ScriptedServer, key: str) -> None:
    server.script("student", key, STUDENT)
    server.script("teacher", key, TEACHER)


def tutor_relay_config(server: ScriptedServer, tmp_path: Path, **budget: Any) -> RelayConfig:
    """The scripted pair with prices, a conversation budget and a private budget store."""
    return relay_config(
        server,
        teacher={"input_price": 1.0, "output_price": 10.0},
        budget=Budget(**(budget or {"max_teacher_tokens": 100, "max_cost_usd": 0.01})),
        budget_store=str(tmp_path / "budgets.sqlite"),
    )


def tutor_app(config: RelayConfig, tmp_path: Path, **options: Any) -> FastAPI:
    opts = TutorOptions(world="scripted upstreams", suggestions=("Q-suggest: what is 2+2?",), **options)
    return create_tutor_app(config, opts, tmp_path / "tutor.sqlite")


def _server(app: FastAPI) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))


def _url(server: uvicorn.Server) -> str:
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop (lifespan on); yields its root URL."""
    server = _server(app)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield _url(server)
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def serving_in_thread(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` from a thread of its own (for synchronous clients such as Playwright's)."""
    server = _server(app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.01)
    if not server.started:
        raise RuntimeError("the tutor did not start")
    try:
        yield _url(server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
