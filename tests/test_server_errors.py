"""Bad input: every case answers an OpenAI error object with a 4xx status, asks no model, and
the server goes on serving."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest

from relay_agents.server import ServerSettings
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config
from tests.server_support import sdk, serving
from tests.test_server import ANSWER, script

USER = [{"role": "user", "content": "Q"}]

# (case, keyword arguments of chat.completions.create, status, param, words in the message)
SDK_CASES: list[tuple[str, dict[str, Any], int, str | None, str]] = [
    ("no messages", {"messages": []}, 400, "messages", "at least 1 item"),
    ("no user message", {"messages": [{"role": "system", "content": "be brief"}]}, 400, None, "user message"),
    ("empty question", {"messages": [{"role": "user", "content": "  "}]}, 400, None, "empty"),
    ("missing role", {"messages": [{"content": "hi"}]}, 400, "messages", "role"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "role"),
    (
        "tool message without its call id",
        {"messages": [*USER, {"role": "tool", "content": "42"}]},
        400,
        "messages",
        "tool_call_id",
    ),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages",
        "only text content parts",
    ),
    ("content not text", {"messages": [{"role": "user", "content": 42}]}, 400, "messages", "content"),
    ("unknown model", {"model": "gpt-4o"}, 404, "model", "does not exist"),
    ("n > 1", {"n": 2}, 400, "n", "only n=1"),
    ("negative max_tokens", {"max_tokens": -5}, 400, "max_tokens", "greater than or equal to 1"),
    ("zero max_tokens", {"max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("absurd max_tokens", {"max_tokens": 10**12}, 400, "max_tokens", "answer cap"),
    ("absurd max_completion_tokens", {"max_completion_tokens": 10**6}, 400, "max_tokens", "answer cap"),
    ("max_tokens not a number", {"extra_body": {"max_tokens": "ten"}}, 400, "max_tokens", "integer"),
    (
        "prompt over the limit",
        {"messages": [{"role": "user", "content": "x" * 2001}]},
        400,
        "messages",
        "limit",
    ),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400, None, "stream"),
    ("tool_choice without tools", {"tool_choice": "required"}, 400, "tool_choice", "tool_choice needs tools"),
    (
        "tool_choice names no tool",
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        400,
        "tool_choice",
        "not among the tools",
    ),
    ("functions", {"functions": [{"name": "f"}]}, 400, "functions", "use tools"),
    ("stop", {"stop": ["\n"]}, 400, "stop", "stop sequences"),
    ("logprobs", {"logprobs": True}, 400, "logprobs", "logprobs"),
    ("json mode", {"response_format": {"type": "json_object"}}, 400, "response_format", "text"),
    ("user too long", {"user": "u" * 300}, 400, "user", "at most 256"),
    ("stream not a bool", {"extra_body": {"stream": "yes"}}, 400, "stream", "boolean"),
]


@pytest.fixture
async def url(scripted: ScriptedServer) -> Any:
    config = relay_config(scripted, max_answer_tokens=4096)
    async with serving(config, ServerSettings(max_prompt_chars=2000, max_body_bytes=50_000)) as root:
        yield root


async def assert_still_serving(url: str, scripted: ScriptedServer) -> None:
    script(scripted, "Q-alive")
    reply = await sdk(url).chat.completions.create(
        model="relay", messages=[{"role": "user", "content": "Q-alive"}]
    )
    assert reply.choices[0].message.content == ANSWER


@pytest.mark.parametrize(
    ("case", "kwargs", "status", "param", "words"), SDK_CASES, ids=[c[0] for c in SDK_CASES]
)
async def test_bad_chat_requests(
    url: str, scripted: ScriptedServer, case: str, kwargs: dict, status: int, param: str | None, words: str
) -> None:
    request = {"model": "relay", "messages": USER, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(url).chat.completions.create(**request)
    error = info.value
    assert error.status_code == status, error.message
    assert isinstance(error.body, dict) and error.body["type"] == "invalid_request_error"
    assert error.param == param
    assert words in error.message
    assert scripted.requests() == []  # no model was asked
    await assert_still_serving(url, scripted)


TEXT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("two prompts", {"prompt": ["a", "b"]}, "exactly one prompt"),
    ("empty prompt", {"prompt": ""}, "empty"),
    ("token ids", {"prompt": [1, 2, 3]}, "prompt"),
    ("echo", {"prompt": "Q", "echo": True}, "echo"),
    ("best_of", {"prompt": "Q", "best_of": 3}, "best_of"),
    ("prompt over the limit", {"prompt": "x" * 2001}, "limit"),
]


@pytest.mark.parametrize(("case", "kwargs", "words"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
async def test_bad_completion_requests(
    url: str, scripted: ScriptedServer, case: str, kwargs: dict, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(url).completions.create(model="relay", **kwargs)
    assert words in info.value.message
    assert scripted.requests() == []


RAW_CASES: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("malformed JSON", b'{"model": "relay", "messages": [', {}, 400, "could not parse the JSON"),
    ("not an object", b"[1, 2, 3]", {}, 400, "must be a JSON object"),
    ("empty body", b"", {}, 400, "could not parse the JSON"),
    (
        "missing model",
        b'{"messages": [{"role": "user", "content": "Q"}]}',
        {},
        400,
        "missing required parameter",
    ),
    ("text/plain", b'{"model": "relay"}', {"content-type": "text/plain"}, 415, "application/json"),
    ("form", b"model=relay", {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ("too large", b'{"model": "' + b"x" * 60_000 + b'"}', {}, 413, "larger than 50000 bytes"),
    ("not UTF-8", b'{"model": "\xff\xfe"}', {}, 400, "JSON"),
]


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "words"), RAW_CASES, ids=[c[0] for c in RAW_CASES]
)
async def test_bad_bodies(
    url: str, scripted: ScriptedServer, case: str, body: bytes, headers: dict, status: int, words: str
) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            f"{url}/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json", **headers},
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    await assert_still_serving(url, scripted)


async def test_unknown_routes_and_methods(url: str) -> None:
    async with httpx2.AsyncClient() as http:
        missing = await http.post(f"{url}/v1/embeddings", json={"model": "relay", "input": "x"})
        wrong = await http.get(f"{url}/v1/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert wrong.status_code == 405 and "error" in wrong.json()


async def test_a_flood_of_bad_requests_leaves_the_server_serving(url: str, scripted: ScriptedServer) -> None:
    import asyncio

    async with httpx2.AsyncClient() as http:
        bad = [
            http.post(
                f"{url}/v1/chat/completions",
                content=b"{" * (i % 7),
                headers={"content-type": "application/json"},
            )
            for i in range(100)
        ]
        statuses = {r.status_code for r in await asyncio.gather(*bad)}
        metrics = (await http.get(f"{url}/metrics")).text
    assert statuses == {400}
    assert 'relay_errors_total{endpoint="chat.completions",status="400"} 100.0' in metrics
    await assert_still_serving(url, scripted)
