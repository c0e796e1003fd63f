"""Both graphs of ``langgraph.json`` on LangGraph's own server (``langgraph dev``, in memory),
driven through the LangGraph SDK: a thread, a streamed run, a second turn that sees the first,
against the scripted upstreams. The server runs in its own virtual environment (made by
``scripts/langgraph-venv.sh`` when missing), as it would in production: its langgraph-api cannot
be installed next to the dev extra's schemathesis (their jsonschema-rs ranges do not meet)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from langgraph_sdk import get_client

from relay_agents.serving.process import free_port
from relay_agents.testing import ScriptedServer
from tests.conftest import CHATML, ROOT
from tests.tutor_support import ANSWER, STUDENT, TEACHER


@pytest.fixture(scope="session")
def langgraph_executable() -> str:
    """``langgraph`` of ``.venv-langgraph``, which the script creates on first use (about a
    minute) and reuses afterwards."""
    made = subprocess.run(
        ["bash", str(ROOT / "scripts" / "langgraph-venv.sh")], capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, f"scripts/langgraph-venv.sh failed:\n{made.stderr[-3000:]}"
    return made.stdout.strip()


@pytest.fixture
def langgraph_dev(scripted: ScriptedServer, tmp_path: Path, langgraph_executable: str) -> Iterator[str]:
    """``langgraph dev`` on a free port, serving the repository's langgraph.json (its paths made
    absolute, so the server's own files go to ``tmp_path``, not the repository)."""
    spec = json.loads((ROOT / "langgraph.json").read_text())
    spec["dependencies"] = [str(ROOT)]
    spec["graphs"] = {name: str(ROOT / path) for name, path in spec["graphs"].items()}
    (tmp_path / "langgraph.json").write_text(json.dumps(spec))
    template = json.dumps(CHATML)
    (tmp_path / "relay.toml").write_text(
        f'[student]\nbase_url = "{scripted.base_url}"\nmodel = "student"\nchat_template = {template}\n'
        f'[teacher]\nbase_url = "{scripted.base_url}"\nmodel = "teacher"\nchat_template = {template}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env |= {
        "RELAY_CONFIG": str(tmp_path / "relay.toml"),
        "RELAY_AGENTS_STATE": str(tmp_path / "state"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        "LANGSMITH_TRACING": "false",
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
    }
    port = free_port()
    log = (tmp_path / "langgraph-dev.log").open("wb")
    command = [
        langgraph_executable,
        "dev",
        "--no-browser",
        "--no-reload",
        "--port",
        str(port),
        "--config",
        "langgraph.json",
    ]
    server = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "langgraph-dev.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "langgraph dev did not start within 120 s"
            try:
                if httpx2.get(f"{url}/ok", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


async def test_both_graphs_answer_two_turns_on_langgraph_dev_through_the_sdk(
    scripted: ScriptedServer, langgraph_dev: str
) -> None:
    scripted.script("student", "Q-lg", STUDENT, repeat=True)
    scripted.script("teacher", "Q-lg", TEACHER, repeat=True)
    scripted.script("student", "Q-again", ["Again."], repeat=True)
    client = get_client(url=langgraph_dev)
    assert {g["graph_id"] for g in await client.assistants.search()} >= {"relay", "tutor"}
    for graph in ("relay", "tutor"):
        thread = await client.threads.create()
        streamed: dict[str, list[object]] = {}
        for question in ("Q-lg: 12*34+1?", "Q-again"):
            async for part in client.runs.stream(
                thread["thread_id"],
                graph,
                input={"messages": [{"role": "user", "content": question}]},
                stream_mode=["custom", "values"],
            ):
                assert part.event != "error", part.data
                streamed.setdefault(part.event, []).append(part.data)
        teacher_text = "".join(d["text"] for d in streamed["custom"] if d["source"] == "teacher")  # type: ignore[index]
        assert teacher_text == " 408", graph  # the relay's deltas stream through the server
        state = await client.threads.get_state(thread["thread_id"])
        messages = [(m["type"], m["content"]) for m in state["values"]["messages"]]
        assert messages == [
            ("human", "Q-lg: 12*34+1?"),
            ("ai", ANSWER),
            ("human", "Q-again"),
            ("ai", "Again."),
        ]
    last_student = [r["prompt"] for r in scripted.requests() if r["model"] == "student"][-1]
    assert "Q-lg: 12*34+1?" in last_student and ANSWER in last_student  # the second turn saw the first
