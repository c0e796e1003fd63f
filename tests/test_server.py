"""The relay server through the official ``openai`` client, against the scripted upstreams."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx2
import openai
import pytest

from relay_agents.server import ServerSettings
from relay_agents.testing import ScriptedServer, tokenize
from tests.conftest import relay_config
from tests.server_support import sdk, serving

STUDENT = [
    "First 12*34 = <call>3</call> never reached",
    ". Then 408+1 = <call>3</call>",
    ". So \\boxed{409}.",
]
TEACHER = [" 408 and more", " 409 and more"]
ANSWER = "First 12*34 = 408. Then 408+1 = 409. So \\boxed{409}."


def script(server: ScriptedServer, key: str) -> None:
    server.script("student", key, STUDENT)
    server.script("teacher", key, TEACHER)


def generations(server: ScriptedServer, model: str) -> list[dict]:
    return [r for r in server.requests() if r["model"] == model and r["path"].startswith("/v1/")]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text format."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + label_text + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name} {labels} not in metrics"
    return float(match.group(1))


async def test_a_chat_completion_is_relayed(scripted: ScriptedServer) -> None:
    script(scripted, "Q-chat")
    async with serving(relay_config(scripted)) as url:
        client = sdk(url)
        reply = await client.chat.completions.create(
            model="relay", messages=[{"role": "user", "content": "Q-chat: what is 12*34+1?"}]
        )
    assert reply.object == "chat.completion" and reply.model == "relay"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    relay = choice.model_extra["relay"]
    assert [(s["source"], s["text"]) for s in relay["spans"]] == [
        ("student", "First 12*34 ="),
        ("teacher", " 408"),
        ("student", ". Then 408+1 ="),
        ("teacher", " 409"),
        ("student", ". So \\boxed{409}."),
    ]
    assert relay["finish_reason"] == "stop" and relay["finished_by"] == "student"
    usage = reply.usage
    assert usage is not None
    extra = usage.model_extra["relay"]
    assert (extra["teacher_tokens"], extra["teacher_calls"]) == (6, 2)
    assert usage.completion_tokens == extra["student_tokens"] + extra["teacher_tokens"]
    assert extra["call_ratio"] == pytest.approx(6 / usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    sent = [r["prompt"] for r in generations(scripted, "student")] + [
        r["prompt"] for r in generations(scripted, "teacher")
    ]
    assert usage.prompt_tokens == sum(len(tokenize(p)) for p in sent)
    assert extra["budget_remaining"] == {
        "teacher_tokens": None,
        "teacher_calls": None,
        "cost_usd": None,
        "held_teacher_tokens": 0,
        "held_teacher_calls": 0,
        "held_cost_usd": 0.0,
    }
    # whole replies: the upstream requests are not streamed either
    assert not any(r["body"].get("stream") for r in generations(scripted, "student"))


async def test_a_streamed_chat_completion_tags_every_delta(scripted: ScriptedServer) -> None:
    script(scripted, "Q-stream")
    scripted.configure(token_interval_s=0.001)
    async with serving(relay_config(scripted)) as url:
        stream = await sdk(url).chat.completions.create(
            model="relay",
            messages=[{"role": "user", "content": "Q-stream"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == "relay" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    *choices, last = chunks
    assert choices[0].choices[0].delta.role == "assistant"
    texts = [(c.choices[0].model_extra["relay"]["source"], c.choices[0].delta.content) for c in choices]
    assert all(source in ("student", "teacher") for source, _ in texts)
    assert "".join(text or "" for _, text in texts) == ANSWER
    assert "".join(text or "" for source, text in texts if source == "teacher") == " 408 409"
    assert len(texts) > 10  # token by token
    finish = choices[-1].choices[0]
    assert finish.finish_reason == "stop" and finish.model_extra["relay"]["finish_reason"] == "stop"
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_extra["relay"]["teacher_calls"] == 2
    assert last.usage.completion_tokens == last.usage.model_extra["relay"]["student_tokens"] + 6
    assert all(r["body"]["stream"] for r in generations(scripted, "student"))


async def test_a_stream_without_include_usage_has_no_usage_chunk(scripted: ScriptedServer) -> None:
    script(scripted, "Q-nousage")
    async with serving(relay_config(scripted)) as url:
        stream = await sdk(url).chat.completions.create(
            model="relay", messages=[{"role": "user", "content": "Q-nousage"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.choices and c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER


async def test_text_completions_whole_and_streamed(scripted: ScriptedServer) -> None:
    script(scripted, "Q-text:")
    script(scripted, "Q-text-stream:")
    async with serving(relay_config(scripted)) as url:
        client = sdk(url)
        whole = await client.completions.create(model="relay", prompt="Q-text: 12*34+1?")
        stream = await client.completions.create(
            model="relay",
            prompt=["Q-text-stream: 12*34+1?"],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert whole.object == "text_completion" and whole.choices[0].text == ANSWER
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.model_extra["relay"]["teacher_calls"] == 2
    *choices, last = chunks
    assert "".join(c.choices[0].text for c in choices) == ANSWER
    teacher = "".join(
        c.choices[0].text for c in choices if c.choices[0].model_extra["relay"]["source"] == "teacher"
    )
    assert teacher == " 408 409"
    assert last.usage is not None and last.usage.completion_tokens == whole.usage.completion_tokens
    # the prompt is the question, answered as one user message with the protocol's template
    first = generations(scripted, "student")[0]["prompt"]
    assert "<|im_start|>user\nQ-text: 12*34+1?\nPlease reason step by step" in first


async def test_max_tokens_caps_the_answer(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-cap", ["one two three four five six seven eight nine ten"])
    async with serving(relay_config(scripted)) as url:
        reply = await sdk(url).chat.completions.create(
            model="relay", messages=[{"role": "user", "content": "Q-cap"}], max_tokens=4
        )
    assert reply.choices[0].message.content == "one two three four"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 4


async def test_models_health_and_metrics(scripted: ScriptedServer) -> None:
    script(scripted, "Q-metrics")
    async with serving(relay_config(scripted), ServerSettings(model="relay-tiny")) as url:
        client = sdk(url)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["relay-tiny"]
        assert (await client.models.retrieve("relay-tiny")).id == "relay-tiny"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-4o")
        await client.chat.completions.create(
            model="relay-tiny", messages=[{"role": "user", "content": "Q-metrics"}]
        )
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="relay-tiny", messages=[])
        async with httpx2.AsyncClient() as http:
            health = await http.get(f"{url}/health")
            text = (await http.get(f"{url}/metrics")).text
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert metric(text, "relay_requests_total", endpoint="chat.completions", stream="false") == 2
    assert metric(text, "relay_errors_total", endpoint="chat.completions", status="400") == 1
    assert metric(text, "relay_teacher_tokens_total") == 6
    assert metric(text, "relay_teacher_calls_total") == 2
    assert metric(text, "relay_student_tokens_total") > 0
    assert metric(text, "relay_declined_calls_total") == 0
    assert metric(text, "relay_requests_in_flight") == 0
    assert (
        metric(text, "relay_request_duration_seconds_count", endpoint="chat.completions", stream="false") == 2
    )


async def test_api_keys(scripted: ScriptedServer) -> None:
    script(scripted, "Q-auth")
    settings = ServerSettings.load(env={"RELAY_API_KEYS": "sk-one, sk-two"})
    question = [{"role": "user", "content": "Q-auth"}]
    async with serving(relay_config(scripted), settings) as url:
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk(url, api_key="sk-three").chat.completions.create(model="relay", messages=question)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await sdk(url, api_key="sk-three").models.list()
        async with httpx2.AsyncClient() as http:
            bare = await http.post(
                f"{url}/v1/chat/completions", json={"model": "relay", "messages": question}
            )
            assert (await http.get(f"{url}/health")).status_code == 200
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in bare.json()["error"]["message"]
        assert generations(scripted, "student") == []  # refused before any model was asked
        reply = await sdk(url, api_key="sk-two").chat.completions.create(model="relay", messages=question)
    assert reply.choices[0].message.content == ANSWER


async def test_a_failing_student_answers_503_and_the_server_goes_on(scripted: ScriptedServer) -> None:
    script(scripted, "Q-after")
    scripted.faults("student", ["500", "500", "500"])
    async with serving(relay_config(scripted)) as url:
        client = sdk(url)
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(
                model="relay", messages=[{"role": "user", "content": "Q-down"}]
            )
        assert info.value.status_code == 503
        assert "upstream model server is unavailable (HTTP 500)" in info.value.message
        assert info.value.response.headers["x-should-retry"] == "true"
        reply = await client.chat.completions.create(
            model="relay", messages=[{"role": "user", "content": "Q-after"}]
        )
    assert reply.choices[0].message.content == ANSWER


async def test_a_student_that_refuses_answers_502(scripted: ScriptedServer) -> None:
    scripted.faults("student", ["400"])
    async with serving(relay_config(scripted)) as url:
        for stream in (False, True):
            if stream:
                scripted.faults("student", ["400"])
            with pytest.raises(openai.APIStatusError) as info:
                await sdk(url).chat.completions.create(
                    model="relay", messages=[{"role": "user", "content": "Q-400"}], stream=stream
                )
            assert info.value.status_code == 502
            assert "refused the request (HTTP 400): student endpoint http://127.0.0.1:" in info.value.message
            assert info.value.message.endswith("Error code: 400 - scripted fault 400")
            assert info.value.response.headers["x-should-retry"] == "false"


async def test_an_unreachable_student_answers_503(scripted: ScriptedServer) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    config = relay_config(scripted, student={"base_url": dead, "max_retries": 0})
    async with serving(config) as url:
        with pytest.raises(openai.InternalServerError) as info:
            await sdk(url).chat.completions.create(model="relay", messages=[{"role": "user", "content": "Q"}])
    assert info.value.status_code == 503 and info.value.code == "upstream_unreachable"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failing_teacher_degrades_to_the_student(scripted: ScriptedServer, stream: bool) -> None:
    scripted.script("student", "Q-degrade", ["So 12*34 = <call>3</call>", " about 400."])
    scripted.faults("teacher", ["503", "503", "503"])
    async with serving(relay_config(scripted)) as url:
        client = sdk(url)
        if stream:
            chunks = [
                c
                async for c in await client.chat.completions.create(
                    model="relay", messages=[{"role": "user", "content": "Q-degrade"}], stream=True
                )
            ]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            events = chunks[-1].choices[0].model_extra["relay"]["events"]
        else:
            reply = await client.chat.completions.create(
                model="relay", messages=[{"role": "user", "content": "Q-degrade"}]
            )
            text = reply.choices[0].message.content
            events = reply.choices[0].model_extra["relay"]["events"]
    assert text == "So 12*34 =  about 400."  # the student's own text around the failed call
    assert [e["kind"] for e in events] == ["teacher_failure"]


async def test_a_teacher_failure_is_an_error_when_configured(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-strict", ["So 12*34 = <call>3</call>", " about 400."])
    scripted.faults("teacher", ["503", "503", "503"])
    async with serving(relay_config(scripted, on_teacher_failure="raise")) as url:
        with pytest.raises(openai.InternalServerError) as info:
            await sdk(url).chat.completions.create(
                model="relay", messages=[{"role": "user", "content": "Q-strict"}]
            )
    assert info.value.status_code == 503


async def test_a_stream_that_breaks_ends_with_an_error_event(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-drop", ["one two three four five six"])
    scripted.faults("student", ["drop"])
    async with serving(relay_config(scripted)) as url:
        stream = await sdk(url).chat.completions.create(
            model="relay", messages=[{"role": "user", "content": "Q-drop"}], stream=True
        )
        received = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "one two"  # what arrived before the upstream broke
    assert "upstream model server" in info.value.message


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_cancels_a_hanging_upstream(
    scripted: ScriptedServer, stream: bool
) -> None:
    scripted.faults("student", ["hang"])
    script(scripted, "Q-next")
    async with serving(relay_config(scripted)) as url:
        client = sdk(url)
        request = asyncio.create_task(
            client.chat.completions.create(
                model="relay", messages=[{"role": "user", "content": "Q-hang"}], stream=stream
            )
        )
        await until(lambda: len(generations(scripted, "student")) == 1)
        request.cancel()  # the SDK closes the connection
        await until(lambda: generations(scripted, "student")[0]["disconnected"], timeout=2.0)
        reply = await client.chat.completions.create(
            model="relay", messages=[{"role": "user", "content": "Q-next"}]
        )
        assert reply.choices[0].message.content == ANSWER
        async with httpx2.AsyncClient() as http:
            text = (await http.get(f"{url}/metrics")).text
    assert metric(text, "relay_cancelled_requests_total", endpoint="chat.completions") == 1
    assert metric(text, "relay_requests_in_flight") == 0


async def test_a_client_that_closes_a_stream_cancels_the_upstream_stream(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-long", [" ".join(f"w{i}" for i in range(400))])
    scripted.configure(token_interval_s=0.01)
    async with serving(relay_config(scripted)) as url:
        stream = await sdk(url).chat.completions.create(
            model="relay", messages=[{"role": "user", "content": "Q-long"}], stream=True
        )
        seen = 0
        async for chunk in stream:
            seen += bool(chunk.choices[0].delta.content)
            if seen == 5:
                break
        await stream.close()
        await until(lambda: generations(scripted, "student")[0]["disconnected"], timeout=2.0)
    assert len(generations(scripted, "student")) == 1


async def test_explicit_nulls_are_defaults(scripted: ScriptedServer) -> None:
    script(scripted, "Q-nulls")
    body = {"model": "relay", "messages": [{"role": "user", "content": "Q-nulls"}]}
    body |= dict.fromkeys(["n", "stream", "stream_options", "max_tokens", "stop", "user", "temperature"])
    async with serving(relay_config(scripted)) as url, httpx2.AsyncClient() as http:
        response = await http.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == ANSWER
