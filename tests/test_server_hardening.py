"""The server against hostile or careless clients: tenants kept apart, one decoding of
conversation ids, clients that leave or stall mid-request, guessed keys, and retries that
would pay the teacher twice. Each test talks to a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from relay_agents import Budget
from relay_agents.server import ServerSettings
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config
from tests.server_support import sdk, serving
from tests.test_server import STUDENT, TEACHER, generations, metric, script
from tests.test_server_budgets import ask, relay_of

KEYS = {"RELAY_API_KEYS": "sk-a,sk-b"}
QUESTION = [{"role": "user", "content": "Q"}]


def budgeted(scripted: ScriptedServer, tmp_path: Path) -> Any:
    return relay_config(
        scripted, budget=Budget(max_teacher_calls=3), budget_store=str(tmp_path / "budgets.sqlite")
    )


async def test_two_keys_never_share_a_conversation(scripted: ScriptedServer, tmp_path: Path) -> None:
    async with serving(budgeted(scripted, tmp_path), ServerSettings.load(env=KEYS)) as url:
        a, b = sdk(url, api_key="sk-a"), sdk(url, api_key="sk-b")
        a1 = await ask(a, scripted, "Q-t1", user="shared")
        # key B names A's conversation, by the header and by `user`: it gets its own
        b1 = await ask(b, scripted, "Q-t2", extra_headers={"X-Relay-Conversation": "shared"})
        b2 = await ask(b, scripted, "Q-t3", user="shared")
        a2 = await ask(a, scripted, "Q-t4", extra_headers={"X-Relay-Conversation": "shared"})
    assert [relay_of(r)["teacher_calls"] for r in (a1, b1, b2, a2)] == [2, 2, 1, 1]
    # what B reads is B's budget; A's is untouched by B's spending
    remaining = [relay_of(r)["budget_remaining"]["teacher_calls"] for r in (a1, b1, b2, a2)]
    assert remaining == [1, 1, 0, 0]


async def test_a_conversation_header_is_read_as_utf8(scripted: ScriptedServer, tmp_path: Path) -> None:
    conversation = "café-中"
    async with serving(budgeted(scripted, tmp_path)) as url:
        script(scripted, "Q-u1")
        async with httpx2.AsyncClient(timeout=20) as http:
            first = await http.post(
                f"{url}/v1/chat/completions",
                json={"model": "relay", "messages": [{"role": "user", "content": "Q-u1"}]},
                headers={"X-Relay-Conversation": conversation.encode()},
            )
            not_utf8 = await http.post(
                f"{url}/v1/chat/completions",
                json={"model": "relay", "messages": QUESTION},
                headers={"X-Relay-Conversation": b"caf\xe9"},
            )
        second = await ask(sdk(url), scripted, "Q-u2", user=conversation)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["relay"]["teacher_calls"] == 2
    # the same id in `user` is the same conversation: one call left
    assert (
        relay_of(second)["teacher_calls"] == 1 and relay_of(second)["budget_remaining"]["teacher_calls"] == 0
    )
    assert not_utf8.status_code == 400 and "UTF-8" in not_utf8.json()["error"]["message"]


async def raw_request(url: str, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    return reader, writer


def partial_post(length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
        + b'{"model": "relay", '
    )


async def scrape(url: str) -> str:
    async with httpx2.AsyncClient() as http:
        return (await http.get(f"{url}/metrics")).text


async def test_a_client_leaving_mid_upload_is_a_cancelled_request(
    scripted: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(relay_config(scripted)) as url:
        _, writer = await raw_request(url, partial_post(10_000))
        await asyncio.sleep(0.2)  # the handler is reading the body
        writer.close()
        deadline = time.monotonic() + 5
        while 'cancelled_requests_total{endpoint="chat.completions"} 1.0' not in (text := await scrape(url)):
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.05)
    assert 'relay_errors_total{endpoint="chat.completions",status="500"}' not in text
    assert metric(text, "relay_requests_in_flight") == 0
    assert "relay failed" not in caplog.text
    assert generations(scripted, "student") == []


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent before it closed the connection (fails if it stays open)."""
    return await asyncio.wait_for(reader.read(), seconds)


@pytest.mark.parametrize(
    "head",
    [
        b"",  # connected, sends nothing
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Ty",  # half a header
    ],
    ids=["idle", "partial-header"],
)
async def test_a_connection_without_complete_headers_is_closed(scripted: ScriptedServer, head: bytes) -> None:
    settings = ServerSettings(header_timeout_s=0.5)
    async with serving(relay_config(scripted), settings) as url:
        started = time.monotonic()
        reader, writer = await raw_request(url, head)
        for _ in range(3):  # dripping more header bytes does not extend the deadline
            await asyncio.sleep(0.1)
            if head:
                writer.write(b"x")
        assert await closed_within(reader, 3) == b""
        assert time.monotonic() - started < 2
        writer.close()


async def test_a_body_that_does_not_arrive_in_time_is_408(scripted: ScriptedServer) -> None:
    settings = ServerSettings(body_timeout_s=0.5)
    async with serving(relay_config(scripted), settings) as url:
        started = time.monotonic()
        reader, writer = await raw_request(url, partial_post(10_000))
        answer = await closed_within(reader, 3)
        writer.close()
        assert time.monotonic() - started < 2
        text = await scrape(url)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert metric(text, "relay_errors_total", endpoint="chat.completions", status="408") == 1
    assert generations(scripted, "student") == []


async def test_the_schema_and_docs_need_a_key(scripted: ScriptedServer) -> None:
    paths = ("/openapi.json", "/docs", "/redoc")
    async with (
        serving(relay_config(scripted), ServerSettings.load(env=KEYS)) as url,
        httpx2.AsyncClient() as http,
    ):
        bare = {path: (await http.get(f"{url}{path}")).status_code for path in paths}
        keyed = await http.get(f"{url}/openapi.json", headers={"Authorization": "Bearer sk-b"})
    assert bare == {"/openapi.json": 401, "/docs": 404, "/redoc": 404}
    assert keyed.status_code == 200 and "/v1/chat/completions" in keyed.json()["paths"]
    async with serving(relay_config(scripted)) as url, httpx2.AsyncClient() as http:  # no keys: all open
        assert {path: (await http.get(f"{url}{path}")).status_code for path in paths} == dict.fromkeys(
            paths, 200
        )


async def test_failed_authentication_is_limited_per_address(scripted: ScriptedServer) -> None:
    settings = ServerSettings.load(env=KEYS, auth_failure_burst=5, auth_failures_per_s=2.0)
    async with serving(relay_config(scripted), settings) as url, httpx2.AsyncClient() as http:

        async def models(key: str) -> httpx2.Response:
            return await http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})

        guesses = [await models(f"sk-guess-{i}") for i in range(20)]
        right_key = await models("sk-a")  # a blocked address is refused before its key is compared
        await asyncio.sleep(0.6)  # one failure earned back
        after_wait = await models("sk-a")
    assert [r.status_code for r in guesses] == [401] * 5 + [429] * 15
    limited = guesses[-1]
    assert (
        limited.json()["error"]["code"] == "rate_limit_exceeded" and int(limited.headers["retry-after"]) >= 1
    )
    assert right_key.status_code == 429
    assert after_wait.status_code == 200


async def test_a_student_failing_after_a_paid_teacher_call_is_not_retried(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-paid", [STUDENT[0], {"fault": "500"}], repeat=True)
    scripted.script("teacher", "Q-paid", TEACHER[:1], repeat=True)
    config = relay_config(scripted, student={"max_retries": 0})
    async with serving(config) as url:
        client = sdk(url, max_retries=2)  # the SDK retries a 503 unless told not to
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(
                model="relay", messages=[{"role": "user", "content": "Q-paid"}]
            )
    assert info.value.status_code == 503
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "teacher was already paid" in info.value.message
    assert len(generations(scripted, "teacher")) == 1  # paid once
