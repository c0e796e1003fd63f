"""``relay-agents serve`` as users run it: a subprocess, a TOML config, RELAY_* variables."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx2
import openai
import pytest

from relay_agents.testing import ScriptedServer
from tests.test_entry_points import CLI, relay_env, run
from tests.test_server import ANSWER, script


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float = 90.0) -> None:
    # workers import the stack in parallel: seconds on a quiet machine, over 30 s at load 15
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"serve exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            if httpx2.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not become healthy")


def start_serve(port: int, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``relay-agents serve`` on ``port`` as a user starts it."""
    return subprocess.Popen(
        [CLI, "serve", "--port", str(port), "--log-level", "warning", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_answers_openai_clients_and_stops_on_sigterm(scripted: ScriptedServer, tmp_path: Path) -> None:
    script(scripted, "Q-serve")
    port = free_port()
    env = relay_env(
        scripted,
        tmp_path,
        RELAY_API_KEYS="sk-test",
        RELAY_SERVER_MODEL="relay-tiny",
        RELAY_AGENTS_STATE=str(tmp_path / "state"),
    )
    proc = start_serve(port, env, "--config", env["RELAY_CONFIG"])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
        reply = client.chat.completions.create(
            model="relay-tiny", messages=[{"role": "user", "content": "Q-serve"}]
        )
        assert reply.choices[0].message.content == ANSWER
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
        assert "relay_teacher_calls_total 2.0" in httpx2.get(f"{url}/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why
    assert proc.returncode == -signal.SIGTERM and "Traceback" not in stderr, stderr
    assert "serving model 'relay-tiny' on http://127.0.0.1:" in stderr and "; 1 API key)" in stderr


@pytest.mark.parametrize(("variable", "value"), [("PORT", "eighty"), ("WORKERS", "0")])
def test_serve_with_bad_settings_names_the_variable(
    scripted: ScriptedServer, tmp_path: Path, variable: str, value: str
) -> None:
    env = relay_env(scripted, tmp_path, **{f"RELAY_SERVER_{variable}": value})
    out = run([CLI, "serve"], env)
    assert out.returncode == 2
    assert f"{variable.lower()} (RELAY_SERVER_{variable})" in out.stderr


def test_serve_with_a_bad_workers_flag_names_it(scripted: ScriptedServer, tmp_path: Path) -> None:
    out = run([CLI, "serve", "--workers", "-3"], relay_env(scripted, tmp_path))
    assert out.returncode == 2
    assert "workers (argument): Input should be greater than" in out.stderr


def test_serve_with_a_bad_relay_config_names_the_field(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({"RELAY_STUDENT_BASE_URL": "nope", "RELAY_STUDENT_MODEL": "s"})
    out = run([CLI, "serve"], env)
    assert out.returncode == 2 and "student.base_url (RELAY_STUDENT_BASE_URL)" in out.stderr


def test_server_settings_come_from_the_config_files_server_table(tmp_path: Path) -> None:
    from relay_agents.config import ConfigError, load_config
    from relay_agents.server import ServerSettings

    path = tmp_path / "relay.toml"
    path.write_text(
        '[student]\nbase_url = "http://127.0.0.1:1/v1"\nmodel = "s"\n'
        '[teacher]\nbase_url = "http://127.0.0.1:2/v1"\nmodel = "t"\n'
        '[server]\nport = 9123\nmodel = "relay-from-file"\nmax_prompt_chars = 500\n'
    )
    assert load_config(path, env={}).student.model == "s"  # the relay config skips [server]
    settings = ServerSettings.load({"RELAY_SERVER_PORT": "9200"}, config_file=path, max_prompt_chars=None)
    assert (settings.port, settings.model, settings.max_prompt_chars) == (9200, "relay-from-file", 500)
    assert ServerSettings.load({"RELAY_CONFIG": str(path)}).model == "relay-from-file"

    path.write_text(path.read_text().replace("port = 9123", 'port = "high"'))
    with pytest.raises(ConfigError, match=r"port \(.*relay\.toml \[server\]\)"):
        ServerSettings.load({}, config_file=path)


def test_serve_stops_quietly_on_ctrl_c(scripted: ScriptedServer, tmp_path: Path) -> None:
    port = free_port()
    env = relay_env(scripted, tmp_path, RELAY_AGENTS_STATE=str(tmp_path / "state"))
    proc = start_serve(port, env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode in (0, 130) and "Traceback" not in stderr, stderr


def _spawned_workers(parent: int) -> int:
    """uvicorn's worker processes (multiprocessing spawn children) of ``parent``."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        count += ppid == parent and b"spawn_main" in cmdline
    return count


async def test_serve_with_workers_shares_budgets_and_metrics(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """Two worker processes: one conversation's budget is never overspent across them, and
    every scrape of /metrics, whichever worker answers it, counts the requests of both."""
    questions = [f"Q-workers-{i}" for i in range(16)]
    for question in questions:
        scripted.script("student", question, ["So x = <call>2</call>", " done."])
        scripted.script("teacher", question, [" 1 2"])
    port, tmp = free_port(), tmp_path / "tmp"
    tmp.mkdir()
    env = relay_env(
        scripted,
        tmp_path,
        RELAY_BUDGET_MAX_TEACHER_CALLS="5",
        RELAY_AGENTS_STATE=str(tmp_path / "state"),
        TMPDIR=str(tmp),
    )
    proc = start_serve(port, env, "--workers", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        assert _spawned_workers(proc.pid) == 2
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="relay",
                    messages=[{"role": "user", "content": q}],
                    extra_headers={"X-Relay-Conversation": "shared"},
                )
                for q in questions
            )
        )
        await client.close()
        calls = [r.usage.model_extra["relay"]["teacher_calls"] for r in replies]
        assert sum(calls) == 5
        assert all(r.choices[0].message.content.startswith("So x =") for r in replies)
        for _ in range(8):  # new connections: the scrapes land on either worker
            metrics = httpx2.get(f"{url}/metrics").text
            assert 'relay_requests_total{endpoint="chat.completions",stream="false"} 16.0' in metrics
            assert "relay_teacher_calls_total 5.0" in metrics
            assert "relay_declined_calls_total 11.0" in metrics
            assert "relay_requests_in_flight 0.0" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr and "2 workers" in stderr, stderr
    assert list(tmp.iterdir()) == []  # the metrics directory is removed
