"""All state in PostgreSQL: with a ``postgresql://`` budget store, two hosts (each its own
connections, nothing shared but the database) continue each other's conversations, the
tutor's and the relay graph's, spend one budget, and answer a conversation one at a time."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import httpx2 as httpx

from relay_agents import Budget, arelay
from relay_agents.budgets import conversation_key, open_budget_store
from relay_agents.checkpoints import open_checkpointer
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config
from tests.test_tutor import new_conversation, read_events, student_prompts
from tests.tutor_support import ANSWER, script_answer, serving, tutor_app


async def test_two_tutor_hosts_on_one_postgres_share_conversations_and_budgets(
    scripted: ScriptedServer, postgres_url: str, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-host-a")
    script_answer(scripted, "Q-host-b")
    config = relay_config(scripted, budget=Budget(max_teacher_tokens=100), budget_store=postgres_url)
    disk_a, disk_b = tmp_path / "a", tmp_path / "b"
    async with (
        serving(tutor_app(config, disk_a)) as host_a,
        serving(tutor_app(config, disk_b)) as host_b,
        httpx.AsyncClient(timeout=20) as client,
    ):
        cid = await new_conversation(client, host_a)
        first = await read_events(client, f"{host_a}/api/conversations/{cid}/messages", {"text": "Q-host-a"})
        assert first[-1]["type"] == "done" and first[-1]["message"]["text"] == ANSWER
        listed = (await client.get(f"{host_b}/api/conversations")).json()["conversations"]
        assert cid in [c["id"] for c in listed]
        second = await read_events(client, f"{host_b}/api/conversations/{cid}/messages", {"text": "Q-host-b"})
        assert second[-1]["type"] == "done"
        seen_by_a = (await client.get(f"{host_a}/api/conversations/{cid}")).json()
    assert [(m["role"], m["text"]) for m in seen_by_a["messages"]] == [
        ("user", "Q-host-a"),
        ("assistant", ANSWER),
        ("user", "Q-host-b"),
        ("assistant", ANSWER),
    ]
    assert "Q-host-a" in student_prompts(scripted)[-1]  # host b's relay saw host a's turn
    spent = open_budget_store(postgres_url).spent([conversation_key(cid)])[conversation_key(cid)]
    assert spent.teacher_tokens == 6 == seen_by_a["budget"]["spent_teacher_tokens"]
    assert not disk_a.exists() and not disk_b.exists()  # nothing on either host's disk


async def test_the_relay_graph_continues_a_thread_on_another_hosts_checkpointer(
    scripted: ScriptedServer, postgres_url: str, tmp_path: Path
) -> None:
    scripted.script("student", "Q-first", ["First <call>4</call>", " one."])
    scripted.script("teacher", "Q-first", [" two three four five"])
    scripted.script("student", "Q-second", ["Second."])
    config = relay_config(scripted, budget=Budget(max_teacher_tokens=10), budget_store=postgres_url)
    thread = f"thread-{uuid.uuid4().hex}"
    async with open_checkpointer(postgres_url, tmp_path / "unused.sqlite") as host_a:
        first = await arelay("Q-first", config, checkpointer=host_a, thread_id=thread, conversation_id=thread)
    async with open_checkpointer(postgres_url, tmp_path / "unused.sqlite") as host_b:
        second = await arelay(
            "Q-second", config, checkpointer=host_b, thread_id=thread, conversation_id=thread
        )
    assert second.text == "Second."
    last = student_prompts(scripted)[-1]
    assert "Q-first" in last and first.text in last and "Q-second" in last
    spent = open_budget_store(postgres_url).spent([conversation_key(thread)])[conversation_key(thread)]
    assert spent.teacher_tokens == first.usage.teacher_tokens == 4
    assert not (tmp_path / "unused.sqlite").exists()


async def test_one_answer_at_a_time_per_conversation_across_hosts(
    scripted: ScriptedServer, postgres_url: str, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-slow")
    scripted.configure(token_interval_s=0.05)
    config = relay_config(scripted, budget=Budget(max_teacher_tokens=100), budget_store=postgres_url)
    async with (
        serving(tutor_app(config, tmp_path / "a")) as host_a,
        serving(tutor_app(config, tmp_path / "b")) as host_b,
        httpx.AsyncClient(timeout=20) as client,
    ):
        cid = await new_conversation(client, host_a)
        async with client.stream(
            "POST", f"{host_a}/api/conversations/{cid}/messages", json={"text": "Q-slow"}
        ) as first:
            lines = first.aiter_lines()
            assert json.loads(await anext(lines))["type"] == "delta"
            shown = (await client.get(f"{host_b}/api/conversations/{cid}")).json()
            busy = await client.post(
                f"{host_b}/api/conversations/{cid}/messages", json={"text": "Q-slow again"}
            )
            rest = [json.loads(line) async for line in lines if line.strip()]
        assert shown["busy"] is True
        assert busy.status_code == 409 and "still answering" in busy.json()["error"]
        assert rest[-1]["type"] == "done"
        after = await read_events(client, f"{host_b}/api/conversations/{cid}/messages", {"text": "Q-slow"})
    assert after[-1]["type"] == "done"  # the lease ended with the answer


async def test_a_tutor_file_from_before_the_lease_opens_and_answers(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-old")
    db = tmp_path / "tutor.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE tutor_conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)"
        )
        conn.execute("INSERT INTO tutor_conversations VALUES ('old', 'an old one', 1.0, 1.0)")
    config = relay_config(
        scripted, budget=Budget(max_teacher_tokens=100), budget_store=str(tmp_path / "b.sqlite")
    )
    async with serving(tutor_app(config, tmp_path)) as url, httpx.AsyncClient(timeout=20) as client:
        listed = (await client.get(f"{url}/api/conversations")).json()["conversations"]
        events = await read_events(client, f"{url}/api/conversations/old/messages", {"text": "Q-old"})
    assert [(c["id"], c["title"]) for c in listed] == [("old", "an old one")]
    assert events[-1]["type"] == "done" and events[-1]["message"]["text"] == ANSWER
