"""A worker of ``relay-agents serve --workers 2`` killed in the middle of a teacher call: its hold
on the conversation's budget expires after ``budget_hold_ttl_s`` (not 600 s), the decline meanwhile
says why, and the in-flight gauge stops counting the dead worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from relay_agents.testing import ScriptedServer
from tests.test_entry_points import relay_env
from tests.test_server import metric
from tests.test_server_cli import free_port, start_serve, wait_healthy

HOLD_TTL_S = 3.0
QUESTION = "Q-kill: how much is it?"
CONVERSATION = "conversation-of-the-killed-worker"


def open_stream(port: int) -> socket.socket:
    """A streamed chat completion on a raw connection (its local port names it in /proc)."""
    body = json.dumps(
        {"model": "relay", "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"X-Relay-Conversation: {CONVERSATION}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def read_until(sock: socket.socket, marker: bytes) -> None:
    seen = b""
    while marker not in seen:
        chunk = sock.recv(65536)
        assert chunk, f"the stream ended before {marker!r}: {seen[-500:]!r}"
        seen += chunk


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with_target = os.readlink(fd) if fd.is_symlink() else ""
        if with_target.startswith("socket:["):
            inodes.add(with_target[len("socket:[") : -1])
    return inodes


def worker_serving(serve_pid: int, port: int, client_port: int) -> int:
    """The worker process that holds the server side of the client's connection."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if (local, remote) == (port, client_port):
            inode = fields[9]
    assert inode is not None, "no server socket for the client's connection"
    children = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
    for pid in map(int, children):
        if inode in _socket_inodes(pid):
            return pid
    raise AssertionError("no worker holds the connection")


def ask(url: str) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    reply = client.chat.completions.create(
        model="relay",
        messages=[{"role": "user", "content": QUESTION}],
        extra_headers={"X-Relay-Conversation": CONVERSATION},
    )
    return reply.model_dump()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="finds the worker through /proc")
def test_a_killed_workers_hold_expires_after_hold_ttl_and_leaves_no_request_in_flight(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    scripted.script("student", "Q-kill", ["Let me ask. <call>40</call>"], repeat=True)
    scripted.script("student", "tok", [" Done."], repeat=True)
    scripted.script("teacher", "Q-kill", [" tok" * 60], repeat=True)
    scripted.configure(token_interval_s=0.2)  # the teacher call lasts 8 s
    port = free_port()
    env = relay_env(
        scripted,
        tmp_path,
        RELAY_SERVER_MODEL="relay",
        RELAY_BUDGET_MAX_TEACHER_TOKENS="37",
        RELAY_BUDGET_HOLD_TTL_S=str(HOLD_TTL_S),
        RELAY_BUDGET_STORE=f"sqlite:///{tmp_path / 'budgets.sqlite'}",
    )
    proc = start_serve(port, env, "--config", env["RELAY_CONFIG"], "--workers", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=90)
        stream = open_stream(port)
        read_until(stream, b" tok")  # the teacher is writing: the worker holds 37 tokens
        worker = worker_serving(proc.pid, port, stream.getsockname()[1])
        os.kill(worker, signal.SIGKILL)
        killed_at = time.monotonic()
        stream.close()
        scripted.configure(token_interval_s=0.0)

        # Meanwhile the conversation's next call is declined, and the reply says why.
        declined = ask(url)
        relay = declined["usage"]["relay"]
        assert relay["teacher_calls"] == 0
        assert relay["budget_remaining"]["held_teacher_tokens"] == 37
        assert relay["budget_remaining"]["teacher_tokens"] == 0
        events = declined["choices"][0]["relay"]["events"]
        assert "(37 held by calls in flight)" in events[0]["message"], events

        # Within the hold's lifetime the teacher answers the conversation again.
        while (answered := ask(url))["usage"]["relay"]["teacher_calls"] == 0:
            assert time.monotonic() - killed_at < HOLD_TTL_S + 2.0, "the dead worker's hold did not expire"
            time.sleep(0.25)
        assert answered["usage"]["relay"]["teacher_tokens"] == 37

        # Once idle, the dead worker no longer counts as a request in flight.
        deadline = time.monotonic() + 10
        while (in_flight := metric(httpx2.get(f"{url}/metrics").text, "relay_requests_in_flight")) != 0:
            assert time.monotonic() < deadline, f"{in_flight} requests in flight once idle"
            time.sleep(0.25)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
