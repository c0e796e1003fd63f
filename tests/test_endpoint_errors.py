"""Endpoint failures name the role, the URL and what to do, against real servers on 127.0.0.1:
the scripted OpenAI-compatible server, a plain HTTP server that is no OpenAI API, a closed port."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator

import openai
import pytest

from relay_agents import RelayResult, arelay, relay
from relay_agents.core.config import RelayConfig
from relay_agents.testing import ScriptedServer
from tests.conftest import endpoint, relay_config
from tests.server_support import sdk, serving

#: No retries: each failure is met once.
ONCE = {"max_retries": 0}


async def run(config: RelayConfig, question: str, sync: bool) -> RelayResult:
    """One relay, through the sync path (httpx2) or the async one (aiohttp)."""
    return relay(question, config) if sync else await arelay(question, config)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Requests are not logged to the test's output."""


@contextlib.contextmanager
def plain_http_server() -> Iterator[str]:
    """Python's own HTTP server: it answers GET with files and POST with 501, as no OpenAI API does."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_base_url_without_v1_says_to_add_it(scripted: ScriptedServer, sync: bool) -> None:
    root = scripted.base_url.removesuffix("/v1")
    config = relay_config(scripted, student={"base_url": root, **ONCE})
    with pytest.raises(openai.NotFoundError) as info:
        await run(config, "Q-root", sync)
    message = str(info.value)
    assert message.startswith(f"student endpoint {root} (model 'student'): Error code: 404")
    assert (
        f"Hint: OpenAI-compatible servers answer under /v1: try {root}/v1 (RELAY_STUDENT_BASE_URL)" in message
    )
    assert info.value.message == message and info.value.status_code == 404


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_wrong_model_lists_the_served_ones(scripted: ScriptedServer, sync: bool) -> None:
    scripted.configure(strict_models=True)
    scripted.script("student", "Q-model", ["unused"])
    scripted.script("teacher", "Q-model", ["unused"])
    config = relay_config(scripted, student=ONCE).model_copy(
        update={"student": endpoint(scripted, "studnet", **ONCE)}
    )
    with pytest.raises(openai.NotFoundError) as info:
        await run(config, "Q-model", sync)
    message = str(info.value)
    assert message.startswith(f"student endpoint {scripted.base_url} (model 'studnet'): Error code: 404")
    assert "The model `studnet` does not exist" in message
    assert (
        "Hint: the server does not serve 'studnet'; it serves 'student', 'teacher' (student.model, "
        in message
    )
    assert message.endswith("RELAY_STUDENT_MODEL)")
    asked = [r for r in scripted.requests() if r["path"].endswith("/completions")]
    assert len(asked) == 1  # a 404 is not tried again


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_server_that_is_no_openai_api_is_named_so(scripted: ScriptedServer, sync: bool) -> None:
    with plain_http_server() as url:
        config = relay_config(scripted, student={"base_url": url, **ONCE})
        with pytest.raises(openai.InternalServerError) as info:
            await run(config, "Q-plain", sync)
    message = str(info.value)
    assert message.startswith(f"student endpoint {url} (model 'student'): Error code: 501")
    assert "Hint: this is not an OpenAI-compatible API (HTTP 501, an answer that is not JSON)" in message


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_refused_connection_says_nothing_listens(scripted: ScriptedServer, sync: bool) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    config = relay_config(scripted, student={"base_url": url, **ONCE})
    with pytest.raises(openai.APIConnectionError) as info:
        await run(config, "Q-refused", sync)
    message = str(info.value)
    host = url.removeprefix("http://").removesuffix("/v1")
    assert message == (
        f"student endpoint {url} (model 'student'): Connection error: {host} refused the connection. "
        "Hint: nothing listens there: start the model server, or fix student.base_url (RELAY_STUDENT_BASE_URL)"
    )
    assert "ssl:default" not in message


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_failed_teacher_is_reported_with_its_url_and_hint(
    scripted: ScriptedServer, sync: bool
) -> None:
    scripted.script("student", "Q-teacher", ["So x = <call>4</call>", "5 by myself."])
    url = f"http://127.0.0.1:{closed_port()}/v1"
    result = await run(relay_config(scripted, teacher={"base_url": url, **ONCE}), "Q-teacher", sync)
    assert result.text == "So x = 5 by myself."
    [event] = result.events
    assert event.kind == "teacher_failure"
    assert event.message.startswith(
        f"teacher unavailable, the student goes on alone: APIConnectionError: teacher endpoint {url} "
        "(model 'teacher'): Connection error:"
    )
    assert event.message.endswith("or fix teacher.base_url (RELAY_TEACHER_BASE_URL)")


async def test_the_server_passes_the_role_url_and_hint_on(scripted: ScriptedServer) -> None:
    root = scripted.base_url.removesuffix("/v1")
    async with serving(relay_config(scripted, student={"base_url": root, **ONCE})) as url:
        with pytest.raises(openai.InternalServerError) as info:
            await sdk(url).chat.completions.create(model="relay", messages=[{"role": "user", "content": "Q"}])
    assert info.value.status_code == 502
    message = info.value.message
    assert f"the upstream model server refused the request (HTTP 404): student endpoint {root} " in message
    assert f"try {root}/v1 (RELAY_STUDENT_BASE_URL)" in message
