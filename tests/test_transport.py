"""Both transports raise what the openai SDK raises, for the same fault on the wire."""

from __future__ import annotations

import asyncio
import socket

import openai
import pytest

from relay_agents.testing import ScriptedServer
from relay_agents.transport import AsyncTransport, SyncTransport

BODY = {"model": "student", "prompt": "Q-transport", "max_tokens": 8}


def _sdk(server: ScriptedServer, base_url: str | None = None, timeout: float = 20) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url or server.base_url, api_key="k", max_retries=0, timeout=timeout
    )


async def _sdk_error(client: openai.AsyncOpenAI) -> openai.APIError:
    with pytest.raises(openai.APIError) as caught:
        await client.completions.create(model=BODY["model"], prompt=BODY["prompt"], max_tokens=8)
    await client.close()
    return caught.value


@pytest.fixture(params=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


async def _transport_error(url: str, kind: str, timeout: float = 20) -> openai.APIError:
    with pytest.raises(openai.APIError) as caught:
        if kind == "async":
            transport = AsyncTransport("k", timeout=timeout, connect_timeout=2)
            try:
                await transport.post_json(url, BODY)
            finally:
                await transport.aclose()
        else:
            sync = SyncTransport("k", timeout=timeout, connect_timeout=2)
            try:
                await asyncio.to_thread(sync.post_json, url, BODY)
            finally:
                sync.close()
    return caught.value


@pytest.mark.parametrize("status", ["400", "401", "403", "404", "409", "422", "429", "500", "503", "418"])
async def test_an_error_status_is_the_sdks_exception(
    scripted: ScriptedServer, status: str, kind: str
) -> None:
    scripted.faults("student", [status, status])
    expected = await _sdk_error(_sdk(scripted))
    got = await _transport_error(f"{scripted.base_url}/completions", kind)
    assert type(got) is type(expected)
    assert isinstance(got, openai.APIStatusError) and isinstance(expected, openai.APIStatusError)
    assert (got.status_code, got.message, got.body) == (expected.status_code, expected.message, expected.body)
    assert str(got.request.url) == str(expected.request.url)


async def test_a_hang_is_the_sdks_timeout(scripted: ScriptedServer, kind: str) -> None:
    scripted.faults("student", ["hang", "hang"])
    expected = await _sdk_error(_sdk(scripted, timeout=0.3))
    got = await _transport_error(f"{scripted.base_url}/completions", kind, timeout=0.3)
    assert type(expected) is type(got) is openai.APITimeoutError


async def test_a_refused_connection_is_the_sdks_connection_error(scripted: ScriptedServer, kind: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    expected = await _sdk_error(_sdk(scripted, base_url=dead))
    got = await _transport_error(f"{dead}/completions", kind)
    assert type(expected) is type(got) is openai.APIConnectionError


async def test_a_dropped_connection_is_the_sdks_connection_error(scripted: ScriptedServer, kind: str) -> None:
    scripted.faults("student", ["drop", "drop"])
    expected = await _sdk_error(_sdk(scripted))
    got = await _transport_error(f"{scripted.base_url}/completions", kind)
    assert type(expected) is type(got) is openai.APIConnectionError


async def test_requests_carry_the_api_key_and_share_one_pool(scripted: ScriptedServer) -> None:
    transport = AsyncTransport("secret-key", timeout=20, connect_timeout=2)
    url = f"{scripted.base_url}/completions"
    for _ in range(3):
        reply = await transport.post_json(url, BODY)
        assert reply["choices"][0]["text"]
    assert transport._session() is transport._session()
    assert [r["authorization"] for r in scripted.requests()] == ["Bearer secret-key"] * 3
    await transport.aclose()
