"""The tutor: its graph, its HTTP API (streams, budgets, persistence, bad input, dead models)
and its terminal mode, against the scripted upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi import FastAPI
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.checkpoint.memory import InMemorySaver

from relay_agents.budgets import open_budget_store
from relay_agents.testing import ScriptedServer
from relay_agents.tutor import TUTOR_SYSTEM_PROMPT, build_tutor_graph, recent_messages, tutor_config
from tests.conftest import CHATML, relay_config
from tests.tutor_support import ANSWER, script_answer, serving, tutor_app, tutor_relay_config

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "relay-agents")


def student_prompts(server: ScriptedServer) -> list[str]:
    return [
        r["prompt"] for r in server.requests() if r["model"] == "student" and r["path"].startswith("/v1/")
    ]


# -- the graph ----------------------------------------------------------------------------------


def test_recent_messages_start_at_a_question_and_end_with_the_last_one() -> None:
    q1, a1, q2, a2, q3 = (
        HumanMessage("q1"),
        AIMessage("a1"),
        HumanMessage("q2"),
        AIMessage("a2"),
        HumanMessage("q3"),
    )
    assert recent_messages([q1, a1, q2, a2, q3], 1) == [q3]
    assert recent_messages([q1, a1, q2, a2, q3], 2) == [q3]  # never starts with the tutor's answer
    assert recent_messages([q1, a1, q2, a2, q3], 3) == [q2, a2, q3]
    assert recent_messages([q1, a1, q2, a2, q3], 99) == [q1, a1, q2, a2, q3]
    assert recent_messages([SystemMessage("s"), q1, a1], 5) == [q1]  # the question, not the stray answer
    with pytest.raises(ValueError, match="no question"):
        recent_messages([AIMessage("a")], 3)


def test_the_tutor_graph_answers_with_the_relay_and_keeps_the_thread(scripted: ScriptedServer) -> None:
    script_answer(scripted, "Q-graph")
    scripted.script("student", "Q-second", ["Then \\boxed{2}."])
    graph = build_tutor_graph(relay_config(scripted), checkpointer=InMemorySaver(), history_messages=1)
    thread = {"configurable": {"thread_id": "graph-thread"}}
    state = graph.invoke({"messages": [{"role": "user", "content": "Q-graph: 12*34+1?"}]}, thread)
    reply = state["messages"][-1]
    assert reply.text == ANSWER
    assert [s["source"] for s in reply.response_metadata["relay"]["spans"]] == [
        "student",
        "teacher",
        "student",
    ]
    state = asyncio.run(graph.ainvoke({"messages": [{"role": "user", "content": "Q-second"}]}, thread))
    assert [m.text for m in state["messages"]] == [
        "Q-graph: 12*34+1?",
        ANSWER,
        "Q-second",
        "Then \\boxed{2}.",
    ]
    first, *_, last = student_prompts(scripted)
    assert first.startswith(f"<|im_start|>system\n{TUTOR_SYSTEM_PROMPT}<|im_end|>")
    assert "Q-second" in last and "Q-graph" not in last  # history_messages=1: the question alone


def test_the_tutor_graph_streams_the_relay_deltas_and_shows_history(scripted: ScriptedServer) -> None:
    script_answer(scripted, "Q-one")
    scripted.script("student", "Q-two", ["Two."])
    graph = build_tutor_graph(relay_config(scripted), checkpointer=InMemorySaver(), system_prompt=None)
    thread = {"configurable": {"thread_id": "stream-thread"}}
    graph.invoke({"messages": [{"role": "user", "content": "Q-one"}]}, thread)
    deltas = list(
        graph.stream({"messages": [{"role": "user", "content": "Q-two"}]}, thread, stream_mode="custom")
    )
    assert deltas == [{"source": "student", "text": "Two"}, {"source": "student", "text": "."}]
    last = student_prompts(scripted)[-1]
    assert "<|im_start|>system" not in last
    assert "Q-one" in last and ANSWER in last  # earlier turns reach the relay by default


def test_tutor_config_always_has_a_conversation_budget(scripted: ScriptedServer, tmp_path: Path) -> None:
    plain = relay_config(scripted)
    assert tutor_config(plain).budget.max_teacher_tokens == 2000
    assert (
        tutor_config(tutor_relay_config(scripted, tmp_path, max_teacher_calls=3)).budget.max_teacher_calls
        == 3
    )
    raising = plain.model_copy(update={"on_budget_exhausted": "raise"})
    assert tutor_config(raising).on_budget_exhausted == "continue"


def test_langgraph_json_serves_the_tutor_graph(scripted: ScriptedServer, tmp_path: Path) -> None:
    graphs = json.loads((ROOT / "langgraph.json").read_text())["graphs"]
    assert graphs["tutor"] == "./graphs/tutor.py:graph"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[student]\nbase_url = "{scripted.base_url}"\nmodel = "student"\nchat_template = {json.dumps(CHATML)}\n'
        f'[teacher]\nbase_url = "{scripted.base_url}"\nmodel = "teacher"\nchat_template = {json.dumps(CHATML)}\n'
    )
    script_answer(scripted, "Q-lg")
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('tutor_graph', 'graphs/tutor.py')\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "state = module.graph.invoke({'messages': [{'role': 'user', 'content': 'Q-lg'}]},"
        " {'configurable': {'thread_id': 't'}})\n"
        "print(state['messages'][-1].response_metadata['relay']['budget']['max_teacher_tokens'])\n"
        "print(state['messages'][-1].text)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env |= {"RELAY_CONFIG": str(config), "RELAY_AGENTS_STATE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["2000", ANSWER]
    assert importlib.util.find_spec("relay_agents.tutor.web") is not None


# -- the HTTP API -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tutor_client(app: FastAPI) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    async with serving(app) as url, httpx.AsyncClient(timeout=30) as client:
        yield url, client


async def read_events(client: httpx.AsyncClient, url: str, body: dict[str, Any] | None = None) -> list[dict]:
    async with client.stream("POST", url, json=body or {}) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) async for line in response.aiter_lines() if line.strip()]


async def new_conversation(client: httpx.AsyncClient, url: str) -> str:
    response = await client.post(f"{url}/api/conversations")
    assert response.status_code == 201
    return response.json()["id"]


def store_spent(tmp_path: Path, conversation: str) -> tuple[int, int, float]:
    spent = open_budget_store(str(tmp_path / "budgets.sqlite")).spent([f"conversation:{conversation}"])
    s = spent[f"conversation:{conversation}"]
    return s.teacher_tokens, s.teacher_calls, s.cost_usd


async def test_an_answer_streams_by_source_and_the_meter_shows_the_store(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-http")
    config = tutor_relay_config(scripted, tmp_path)
    async with serving(tutor_app(config, tmp_path)) as url, httpx.AsyncClient(timeout=20) as client:
        info = (await client.get(f"{url}/api/info")).json()
        assert (info["student"], info["teacher"], info["mathjax"]) == ("student", "teacher", True)
        cid = await new_conversation(client, url)
        events = await read_events(
            client, f"{url}/api/conversations/{cid}/messages", {"text": "Q-http: 12*34+1?"}
        )
    deltas = [e for e in events if e["type"] == "delta"]
    assert "".join(e["text"] for e in deltas) == ANSWER
    assert "".join(e["text"] for e in deltas if e["source"] == "teacher") == " 408"
    assert len(deltas) > 10  # token by token
    kinds = [e["type"] for e in events]
    first_budget = kinds.index("budget")
    assert events[first_budget - 1]["source"] == "teacher"  # the meter moves as the teacher's span ends
    assert events[first_budget]["budget"]["spent_teacher_tokens"] == 3
    done = events[-1]
    assert done["type"] == "done"
    assert [(s["source"], s["text"]) for s in done["message"]["spans"]][1] == ("teacher", " 408")
    tokens, calls, cost = store_spent(tmp_path, cid)
    meter = done["budget"]
    assert (meter["spent_teacher_tokens"], meter["spent_teacher_calls"]) == (tokens, calls) == (3, 1)
    assert meter["spent_cost_usd"] == pytest.approx(cost) and cost > 0
    assert meter["max_teacher_tokens"] == 100 and meter["remaining_teacher_tokens"] == 97

    # a new app on the same files: the conversation, its history and its budget are there
    async with serving(tutor_app(config, tmp_path)) as url, httpx.AsyncClient(timeout=20) as client:
        listed = (await client.get(f"{url}/api/conversations")).json()["conversations"]
        assert [(c["id"], c["title"]) for c in listed] == [(cid, "Q-http: 12*34+1?")]
        conversation = (await client.get(f"{url}/api/conversations/{cid}")).json()
    assert [(m["role"], m["text"]) for m in conversation["messages"]] == [
        ("user", "Q-http: 12*34+1?"),
        ("assistant", ANSWER),
    ]
    assert conversation["messages"][1]["spans"] == done["message"]["spans"]
    assert conversation["budget"] == meter and conversation["pending"] is False


async def test_a_spent_budget_is_noticed_and_the_student_goes_on_alone(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-spend")
    scripted.script("student", "Q-more", ["Again 12*34 =<call>3</call>", " is what I think. \\boxed{408}"])
    config = tutor_relay_config(scripted, tmp_path, max_teacher_tokens=3)
    async with serving(tutor_app(config, tmp_path)) as url, httpx.AsyncClient(timeout=20) as client:
        cid = await new_conversation(client, url)
        first = await read_events(client, f"{url}/api/conversations/{cid}/messages", {"text": "Q-spend"})
        assert first[-1]["budget"]["exhausted"] is True
        second = await read_events(client, f"{url}/api/conversations/{cid}/messages", {"text": "Q-more"})
        other = await new_conversation(client, url)
        fresh = (await client.get(f"{url}/api/conversations/{other}")).json()["budget"]
    done = second[-1]
    assert {e["source"] for e in second if e["type"] == "delta"} == {"student"}
    assert done["message"]["text"] == "Again 12*34 = is what I think. \\boxed{408}"
    assert [n["kind"] for n in done["message"]["notices"]] == ["budget"]
    assert "conversation's teacher-token budget is spent" in done["message"]["notices"][0]["text"]
    assert done["budget"]["spent_teacher_tokens"] == 3 and done["budget"]["exhausted"] is True
    assert fresh["spent_teacher_tokens"] == 0 and fresh["exhausted"] is False  # budgets are per conversation


async def test_a_dead_teacher_is_a_notice_and_the_student_answers(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-noteacher")
    scripted.faults("teacher", ["503", "503", "503"])
    async with tutor_client(tutor_app(tutor_relay_config(scripted, tmp_path), tmp_path)) as (url, client):
        cid = await new_conversation(client, url)
        events = await read_events(client, f"{url}/api/conversations/{cid}/messages", {"text": "Q-noteacher"})
    done = events[-1]
    assert done["type"] == "done"
    assert [s["source"] for s in done["message"]["spans"]] == ["student"]
    notices = done["message"]["notices"]
    assert [n["kind"] for n in notices] == ["teacher"] and "503" in notices[0]["text"]
    assert done["budget"]["spent_teacher_tokens"] == 0


async def test_a_dead_student_keeps_the_question_and_retry_answers_it(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-nostudent")
    scripted.faults("student", ["500", "500", "500"])
    async with tutor_client(tutor_app(tutor_relay_config(scripted, tmp_path), tmp_path)) as (url, client):
        cid = await new_conversation(client, url)
        events = await read_events(client, f"{url}/api/conversations/{cid}/messages", {"text": "Q-nostudent"})
        assert [e["type"] for e in events] == ["error"]
        assert events[0]["message"].startswith("The student model answered HTTP 500")
        assert "Your question is kept" in events[0]["message"]
        conversation = (await client.get(f"{url}/api/conversations/{cid}")).json()
        assert conversation["messages"] == [{"role": "user", "text": "Q-nostudent", "answered": False}]
        assert conversation["pending"] is True
        retried = await read_events(client, f"{url}/api/conversations/{cid}/retry")
        conversation = (await client.get(f"{url}/api/conversations/{cid}")).json()
        again = await client.post(f"{url}/api/conversations/{cid}/retry")
    assert retried[-1]["type"] == "done" and retried[-1]["message"]["text"] == ANSWER
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["messages"][0]["answered"] is True and conversation["pending"] is False
    assert again.status_code == 400 and again.json()["error"] == "There is no unanswered question to retry."


async def test_bad_input_gets_clear_errors_and_loses_nothing(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-keep")
    app = tutor_app(tutor_relay_config(scripted, tmp_path), tmp_path, max_message_chars=50)
    async with serving(app) as url, httpx.AsyncClient(timeout=20) as client:
        cid = await new_conversation(client, url)
        await read_events(client, f"{url}/api/conversations/{cid}/messages", {"text": "Q-keep"})
        ask = f"{url}/api/conversations/{cid}/messages"
        empty = await client.post(ask, json={"text": "  \n "})
        missing = await client.post(ask, json={})
        long = await client.post(ask, json={"text": "x" * 51})
        garbage = await client.post(ask, content=b"{not json", headers={"content-type": "application/json"})
        not_object = await client.post(ask, json=["Q"])
        unknown = await client.post(f"{url}/api/conversations/nope/messages", json={"text": "hi"})
        unknown_get = await client.get(f"{url}/api/conversations/nope")
        conversation = (await client.get(f"{url}/api/conversations/{cid}")).json()
    assert (empty.status_code, empty.json()["error"]) == (400, "The message is empty: type a question first.")
    assert missing.status_code == 400
    assert long.status_code == 400
    assert long.json()["error"].startswith("The message has 51 characters; the tutor takes at most 50.")
    assert garbage.status_code == 400 and garbage.json()["error"] == "The request is not JSON."
    assert not_object.status_code == 400
    assert unknown.status_code == unknown_get.status_code == 404
    assert [m["text"] for m in conversation["messages"]] == ["Q-keep", ANSWER]  # nothing lost, nothing added
    assert not [r for r in scripted.requests() if "x" * 51 in r.get("prompt", "")]


async def test_one_answer_at_a_time_per_conversation(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_answer(scripted, "Q-slow")
    scripted.configure(token_interval_s=0.05)
    async with tutor_client(tutor_app(tutor_relay_config(scripted, tmp_path), tmp_path)) as (url, client):
        cid = await new_conversation(client, url)
        other = await new_conversation(client, url)
        ask = f"{url}/api/conversations/{cid}/messages"
        async with client.stream("POST", ask, json={"text": "Q-slow"}) as first:
            lines = first.aiter_lines()
            assert json.loads(await anext(lines))["type"] == "delta"
            busy = await client.post(ask, json={"text": "Q-slow again"})
            elsewhere = await client.post(f"{url}/api/conversations/{other}/messages", json={"text": "hi"})
            rest = [json.loads(line) async for line in lines if line.strip()]
    assert busy.status_code == 409 and "still answering" in busy.json()["error"]
    assert elsewhere.status_code == 200  # other conversations are not held up
    assert rest[-1]["type"] == "done"


# -- the terminal -------------------------------------------------------------------------------


def test_the_terminal_tutor_relays_meters_and_resumes(scripted: ScriptedServer, tmp_path: Path) -> None:
    script_answer(scripted, "Q-term")
    scripted.script("student", "Q-after", ["Alone 12*34 =<call>3</call>", " so \\boxed{408}."])
    config = tmp_path / "relay.toml"
    config.write_text(
        f'budget_store = "{tmp_path / "budgets.sqlite"}"\n[budget]\nmax_teacher_tokens = 3\n'
        f'[student]\nbase_url = "{scripted.base_url}"\nmodel = "student"\nchat_template = {json.dumps(CHATML)}\n'
        f'[teacher]\nbase_url = "{scripted.base_url}"\nmodel = "teacher"\nchat_template = {json.dumps(CHATML)}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env |= {"RELAY_AGENTS_STATE": str(tmp_path), "FORCE_COLOR": "1", "COLUMNS": "200"}
    args = [CLI, "tutor", "--cli", "--config", str(config), "--db", str(tmp_path / "tutor.sqlite")]

    def run(stdin: str, *extra: str) -> str:
        out = subprocess.run(
            [*args, *extra], input=stdin, env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    first = run("Q-term: 12*34+1?\n\n/budget\nQ-after\n/nope\n/quit\n")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", first)
    assert ANSWER in plain
    highlighted = "".join(re.findall(r"\x1b\[1;35m(.*?)\x1b\[0m", first))
    assert highlighted == "Teacher text is highlighted. 408"  # the legend, then the teacher's words
    assert "teacher budget: 3 / 3 tokens, 1 calls, $0 (spent)" in plain
    assert "The teacher budget of this conversation is spent" in plain
    assert "The message is empty: type a question first." in plain
    assert "Alone 12*34 = so \\boxed{408}." in plain
    assert "Teacher call declined" in plain
    assert "Unknown command /nope." in plain
    cid = re.search(r"new conversation (\w+)", plain).group(1)

    resumed = re.sub(r"\x1b\[[0-9;]*m", "", run("/list\n", "--conversation", cid))  # ends at end of input
    assert "you> Q-term: 12*34+1?" in resumed and ANSWER in resumed and "Q-after" in resumed
    assert "teacher budget: 3 / 3 tokens, 1 calls, $0 (spent)" in resumed
    assert f"*  1. Q-term: 12*34+1?  {cid}" in resumed

    missing = subprocess.run(
        [*args, "--conversation", "nope"], input="", env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no conversation 'nope'" in missing.stderr
