"""Budgets through the server: per conversation (``user`` or ``X-Relay-Conversation``), per API
key pool, persisted in the budget store across requests and server restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from relay_agents import Budget
from relay_agents.server import ServerSettings
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config
from tests.server_support import sdk, serving
from tests.test_server import script


def relay_of(reply: Any) -> dict[str, Any]:
    return reply.usage.model_extra["relay"]


async def ask(client: openai.AsyncOpenAI, scripted: ScriptedServer, key: str, **kw: Any) -> Any:
    script(scripted, key)
    return await client.chat.completions.create(
        model="relay", messages=[{"role": "user", "content": key}], **kw
    )


def declined(reply: Any) -> int:
    return sum(e["kind"] == "declined_call" for e in reply.choices[0].model_extra["relay"]["events"])


async def test_a_conversation_budget_persists_across_requests(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    config = relay_config(
        scripted, budget=Budget(max_teacher_calls=3), budget_store=str(tmp_path / "budgets.sqlite")
    )
    async with serving(config) as url:
        client = sdk(url)
        first = await ask(client, scripted, "Q-b1", user="alice")
        second = await ask(client, scripted, "Q-b2", user="alice")
        third = await ask(client, scripted, "Q-b3", extra_headers={"X-Relay-Conversation": "alice"})
        other = await ask(client, scripted, "Q-b4", user="bob")
        anonymous = [await ask(client, scripted, f"Q-b5-{i}") for i in range(2)]
    assert [relay_of(r)["teacher_calls"] for r in (first, second, third)] == [2, 1, 0]
    assert [relay_of(r)["budget_remaining"]["teacher_calls"] for r in (first, second, third)] == [1, 0, 0]
    assert [declined(r) for r in (first, second, third)] == [0, 1, 1]
    assert relay_of(other)["teacher_calls"] == 2 and relay_of(other)["budget_remaining"]["teacher_calls"] == 1
    # without a conversation key every request is a conversation of its own
    assert [relay_of(r)["teacher_calls"] for r in anonymous] == [2, 2]
    # the store survives the server: a new app on the same store sees what alice spent
    async with serving(config) as url:
        again = await ask(sdk(url), scripted, "Q-b6", user="alice")
    assert relay_of(again)["teacher_calls"] == 0 and declined(again) == 1


async def test_each_api_key_has_its_own_pool(scripted: ScriptedServer, tmp_path: Path) -> None:
    config = relay_config(
        scripted, user_budget=Budget(max_teacher_calls=3), budget_store=str(tmp_path / "budgets.sqlite")
    )
    settings = ServerSettings.load(env={"RELAY_API_KEYS": "sk-a,sk-b"})
    async with serving(config, settings) as url:
        a, b = sdk(url, api_key="sk-a"), sdk(url, api_key="sk-b")
        a1 = await ask(a, scripted, "Q-p1", user="conv-1")
        a2 = await ask(a, scripted, "Q-p2", user="conv-2")  # another conversation, the same pool
        b1 = await ask(b, scripted, "Q-p3", user="conv-1")
    assert [relay_of(r)["teacher_calls"] for r in (a1, a2, b1)] == [2, 1, 2]
    assert relay_of(a1)["user_budget_remaining"] == {
        "teacher_tokens": None,
        "teacher_calls": 1,
        "cost_usd": None,
        "held_teacher_tokens": 0,
        "held_teacher_calls": 0,
        "held_cost_usd": 0.0,
    }
    assert relay_of(a2)["budget_remaining"]["teacher_calls"] == 0
    assert relay_of(b1)["user_budget_remaining"]["teacher_calls"] == 1


async def test_a_spent_budget_is_429_when_configured(scripted: ScriptedServer, tmp_path: Path) -> None:
    config = relay_config(
        scripted,
        budget=Budget(max_teacher_calls=0),
        on_budget_exhausted="raise",
        budget_store=str(tmp_path / "budgets.sqlite"),
    )
    async with serving(config) as url:
        client = sdk(url, max_retries=2)  # the SDK would retry a 429, but the server says not to
        with pytest.raises(openai.RateLimitError) as info:
            await ask(client, scripted, "Q-raise", user="carol")
        assert info.value.status_code == 429 and info.value.code == "insufficient_quota"
        assert "teacher-call budget is spent" in info.value.message
        assert len([r for r in scripted.requests() if r["model"] == "student"]) == 1
        # streamed, the student's text before the call is already out: the stream ends in the error
        stream = await ask(client, scripted, "Q-raise-stream", user="carol", stream=True)
        text = []
        with pytest.raises(openai.APIError) as streamed:
            async for chunk in stream:
                text.append(chunk.choices[0].delta.content or "")
    assert "".join(text) == "First 12*34 = "
    assert streamed.value.code == "insufficient_quota"
