"""Shared fixtures: a scripted OpenAI-compatible server on 127.0.0.1 and configs that use it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay_agents import Endpoint, RelayConfig
from relay_agents.testing import ScriptedServer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def scripted_server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


@pytest.fixture
def scripted(scripted_server: ScriptedServer) -> ScriptedServer:
    """The scripted server, cleared for this test."""
    scripted_server.reset()
    return scripted_server


def endpoint(server: ScriptedServer, model: str, **kw: object) -> Endpoint:
    options: dict[str, object] = {
        "base_url": server.base_url,
        "model": model,
        "chat_template": CHATML,
        "timeout": 5.0,
        "retry_initial_delay": 0.01,
    }
    options.update(kw)
    return Endpoint.model_validate(options)


def relay_config(
    server: ScriptedServer,
    *,
    student: dict | None = None,
    teacher: dict | None = None,
    **kw: object,
) -> RelayConfig:
    return RelayConfig(
        student=endpoint(server, "student", **(student or {})),
        teacher=endpoint(server, "teacher", **(teacher or {})),
        **kw,
    )
