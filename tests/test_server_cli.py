"""``relay-agents serve`` as users run it: a subprocess, a TOML config, RELAY_* variables."""

from __future__ import annotations

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


def wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
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
    proc = subprocess.Popen(
        [CLI, "serve", "--port", str(port), "--config", env["RELAY_CONFIG"], "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    assert "serving model 'relay-tiny' on http://127.0.0.1:" in stderr and "1 API keys" in stderr


def test_serve_with_bad_settings_names_the_variable(scripted: ScriptedServer, tmp_path: Path) -> None:
    env = relay_env(scripted, tmp_path, RELAY_SERVER_PORT="eighty")
    out = run([CLI, "serve"], env)
    assert out.returncode == 2
    assert "port (RELAY_SERVER_PORT)" in out.stderr


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
    proc = subprocess.Popen(
        [CLI, "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode in (0, 130) and "Traceback" not in stderr, stderr
