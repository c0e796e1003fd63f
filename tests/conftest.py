"""Shared fixtures: a scripted OpenAI-compatible server on 127.0.0.1 and configs that use it."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_agents import Endpoint, RelayConfig
from relay_agents.testing import ScriptedServer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: ChatML with tools as Qwen 2.5's template writes them (tools in the system turn, calls in
#: ``<tool_call>`` with the arguments as an object, results in ``<tool_response>``).
TOOLS_CHATML = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'For each call write <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and tools %}"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


ROOT = Path(__file__).resolve().parents[1]

# The default budget store (a SQLite file under ~/.local/state) is kept out of the user's home.
_STATE = tempfile.TemporaryDirectory(prefix="relay-agents-state-")
os.environ["RELAY_AGENTS_STATE"] = _STATE.name


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server: ``RELAY_TEST_POSTGRES_URL`` (``.ci/run`` starts one), else a
    private one started here by ``scripts/postgres.sh`` (Debian's postgresql package)."""
    url = os.environ.get("RELAY_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if os.environ.get("RELAY_SKIP_POSTGRES") == "1":
        pytest.skip("RELAY_SKIP_POSTGRES=1")
    script = ROOT / "scripts" / "postgres.sh"
    env = {**os.environ, "RELAY_PG_PORT": "55433"}
    started = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, env=env)
    if started.returncode != 0:
        raise RuntimeError(f"could not start PostgreSQL for the tests:\n{started.stderr}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, env=env)


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
