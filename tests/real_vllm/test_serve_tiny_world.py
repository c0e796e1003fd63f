"""``relay-agents serve`` with no endpoints configured serves the tiny relay world (as ``demo``
and ``tutor`` do), saying so when it starts."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx2
import openai
import pytest

from relay_agents.tiny import tasks
from tests.test_server_cli import free_port, start_serve, wait_healthy

#: Seconds for the tiny pair's two vLLM servers to start on a loaded 2-core machine.
START_S = 600


def test_serve_without_configuration_serves_the_tiny_world(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELAY_CONFIG", "RELAY_STUDENT_", "RELAY_TEACHER_"))
    }
    env["RELAY_AGENTS_STATE"] = str(tmp_path / "state")
    port = free_port()
    proc = start_serve(port, env)
    url = f"http://127.0.0.1:{port}"
    problem = tasks.eval_problems(1)[0]
    try:
        wait_healthy(url, proc, timeout=START_S)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="relay", messages=[{"role": "user", "content": problem.question}]
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    stderr = " ".join(stderr.split())  # as printed, wrapped by rich
    assert reply.choices[0].message.content, reply
    assert "no endpoints are configured: serving the tiny relay world" in stderr, stderr
    assert "student tiny-student, teacher tiny-teacher" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    servers = re.findall(r"(?:student|teacher) (http://127\.0\.0\.1:\d+)/v1", stderr)
    assert len(servers) == 2, stderr
    for server in servers:
        with pytest.raises(httpx2.TransportError):  # the tiny pair stopped with serve
            httpx2.get(f"{server}/health", timeout=5)
