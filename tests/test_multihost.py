"""Several relay hosts behind HAProxy on one PostgreSQL (marker ``multihost``, docs/deployment.md).

Each ``relay-agents serve`` runs in its own network namespace with its own address on a bridge;
PostgreSQL and the scripted upstreams listen on the bridge's address in the root namespace;
Debian's HAProxy balances the hosts on 127.0.0.1 with health checks on ``/health``. Clients
stream multi-turn conversations through HAProxy; a header the balancer's config honours
(``use-server``) steers each turn to the next host, so every conversation changes host every
turn while the host is up. Then one host is killed outright and another stopped with SIGTERM
under load. Needs root (``ip netns``); ``RELAY_SKIP_MULTIHOST=1`` skips it explicitly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import psycopg
import pytest

from relay_agents.budgets import conversation_key, open_budget_store
from relay_agents.testing import ScriptedServer
from tests.conftest import CHATML, ROOT

pytestmark = pytest.mark.multihost

HOSTS = 3
RELAY_PORT = 8000
CONVERSATIONS = 12
TURNS = 4
CONCURRENCY = 6
#: Each turn's student asks for this many teacher tokens; the conversation's budget pays for
#: two and a half calls, so the third is cut to what is left and the fourth is declined.
CALL_TOKENS = 20
BUDGET_TOKENS = 50
HOLD_TTL_S = 3.0
TEACHER_TOKEN_INTERVAL_S = 0.02
MAX_ATTEMPTS = 6
#: HAProxy's health checks: every 200 ms, each given 2 s (a busy host is slow, not down), down
#: after 2 failures (a dead host refuses at once), up after 2 successes.
CHECK = "inter 200ms fall 2 rise 2"


def sh(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


@dataclass
class Network:
    """A bridge in the root namespace and one namespace per host, each with a veth on the bridge."""

    tag: str
    subnet: ipaddress.IPv4Network
    namespaces: list[str] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def host_address(self, index: int) -> str:
        return str(self.subnet.network_address + 10 + index)

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def up(self, hosts: int) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for index in range(hosts):
            namespace, outside = f"{self.tag}-h{index}", f"{self.tag}h{index}"
            sh("ip", "netns", "add", namespace)
            self.namespaces.append(namespace)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            sh("ip", "link", "set", outside, "master", self.bridge, "up")
            inside = ["ip", "netns", "exec", namespace, "ip"]
            sh(*inside, "addr", "add", f"{self.host_address(index)}/{self.subnet.prefixlen}", "dev", "eth0")
            sh(*inside, "link", "set", "eth0", "up")
            sh(*inside, "link", "set", "lo", "up")

    def down(self) -> None:
        for namespace in self.namespaces:  # deleting a namespace deletes its veth pair
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.231.0.0/16 that no interface of this machine is on."""
    used = sh("ip", "-4", "-o", "addr")
    for third in range(os.getpid() % 200, 256):
        subnet = ipaddress.IPv4Network(f"10.231.{third}.0/24")
        if f" 10.231.{third}." not in used:
            return subnet
    raise RuntimeError("no free subnet under 10.231.0.0/16")


def haproxy_binary() -> str:
    """Debian's haproxy, installed when missing (as scripts/postgres.sh installs postgresql)."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    installed = subprocess.run(["apt-get", "install", "-y", "-q", "haproxy"], capture_output=True, env=env)
    if installed.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "haproxy"], capture_output=True, env=env, check=True
        )
    return shutil.which("haproxy", path="/usr/sbin:/sbin:/usr/bin") or "haproxy"


def haproxy_config(network: Network, port: int, stats: Path) -> str:
    steer = "\n".join(
        f"    use-server h{i} if {{ req.hdr(x-relay-prefer-host) -m str h{i} }}" for i in range(HOSTS)
    )
    servers = "\n".join(f"    server h{i} {network.host_address(i)}:{RELAY_PORT} check" for i in range(HOSTS))
    return f"""global
    maxconn 2000
    stats socket {stats} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 2s
    retries 3
    retry-on conn-failure empty-response
    option redispatch 1
    default-server {CHECK}

frontend relay
    bind 127.0.0.1:{port}
    default_backend relay_hosts

backend relay_hosts
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    http-response set-header x-relay-host %[srv_name]
{steer}
{servers}
"""


def haproxy_states(stats: Path) -> dict[str, str]:
    """Each relay host's state as HAProxy sees it (``UP``, ``DOWN``, ...)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    lines = raw.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {
        r["svname"]: r["status"] for r in rows if r.get("pxname") == "relay_hosts" and r["svname"][0] == "h"
    }


def wait_for(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class Answer:
    text: str
    host: str
    latency_s: float
    teacher_tokens: int
    attempts: int
    finished_at: float
    cut: int
    """Tries whose stream broke after the host had answered 200."""


@dataclass
class Conversation:
    id: str
    answers: list[Answer | None] = field(default_factory=list)

    def question(self, turn: int) -> str:
        return f"{self.id} T{turn}: and the next step?"


class Retry(Exception):
    """An answer that did not arrive whole: the client asks again."""


def stream_answer(
    client: httpx2.Client, url: str, conversation: str, messages: list[dict[str, str]], prefer: str
) -> Answer | None:
    """One turn as a client that retries would send it: the same messages again after a
    refused connection, an error status or a stream cut before ``[DONE]``."""
    body = {"model": "relay", "stream": True, "stream_options": {"include_usage": True}, "messages": messages}
    headers = {"x-relay-conversation": conversation, "x-relay-prefer-host": prefer}
    started = time.perf_counter()  # a client's wait includes its retries
    cut = 0
    for attempt in range(1, MAX_ATTEMPTS + 1):
        streaming = False
        try:
            with client.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    raise Retry(f"HTTP {response.status_code}")
                streaming = True
                text, usage, done = [], None, False
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        raise Retry(chunk["error"]["message"])
                    usage = chunk.get("usage") or usage
                    text += [choice["delta"].get("content") or "" for choice in chunk["choices"]]
                if not done or usage is None:
                    raise Retry("the stream ended before [DONE]")
                return Answer(
                    text="".join(text),
                    host=response.headers["x-relay-host"],
                    latency_s=time.perf_counter() - started,
                    teacher_tokens=usage["relay"]["teacher_tokens"],
                    attempts=attempt,
                    finished_at=time.monotonic(),
                    cut=cut,
                )
        except (httpx2.TransportError, Retry):
            cut += streaming
            time.sleep(0.2)
    return None


def converse(url: str, conversation: Conversation, first_host: int) -> None:
    """The conversation's turns in order; turn t is steered to host (first_host + t) % HOSTS."""
    messages: list[dict[str, str]] = []
    with httpx2.Client(timeout=30) as client:
        for turn in range(1, TURNS + 1):
            messages.append({"role": "user", "content": conversation.question(turn)})
            prefer = f"h{(first_host + turn) % HOSTS}"
            answer = stream_answer(client, url, conversation.id, messages, prefer)
            conversation.answers.append(answer)
            if answer is None:
                return
            messages.append({"role": "assistant", "content": answer.text})


@dataclass
class Load:
    conversations: list[Conversation]
    wall_s: float

    @property
    def answers(self) -> list[Answer]:
        return [a for c in self.conversations for a in c.answers if a is not None]

    @property
    def lost(self) -> int:
        return sum(1 for c in self.conversations for a in c.answers if a is None) + sum(
            TURNS - len(c.answers) for c in self.conversations
        )

    def figures(self) -> dict[str, Any]:
        latencies = sorted(a.latency_s for a in self.answers)
        return {
            "answers": len(latencies),
            "lost": self.lost,
            "retried": sum(1 for a in self.answers if a.attempts > 1),
            "streams_cut": sum(a.cut for a in self.answers),
            "answers_per_s": round(len(latencies) / self.wall_s, 2),
            "p50_s": round(statistics.median(latencies), 3),
            "p99_s": round(latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))], 3),
        }


def run_load(url: str, phase: str, during: Callable[[list[Conversation]], None] | None = None) -> Load:
    conversations = [Conversation(f"{phase}-c{i:02d}") for i in range(CONVERSATIONS)]
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(converse, url, c, i) for i, c in enumerate(conversations)]
        if during is not None:
            during(conversations)
        for future in futures:
            future.result()
    return Load(conversations, time.perf_counter() - started)


def script(scripted: ScriptedServer) -> None:
    """Turn k: the student asks for CALL_TOKENS teacher tokens, the teacher writes ``kKx`` tokens,
    the student ends. Later scripts win, so each turn's prompt (which holds the earlier turns)
    is answered by its own turn's script."""
    for turn in range(1, TURNS + 1):
        scripted.script("student", f" T{turn}:", [f"Step {turn}. <call>{CALL_TOKENS}</call>"], repeat=True)
        scripted.script("teacher", f" T{turn}:", [f" k{turn}x" * (CALL_TOKENS + 10)], repeat=True)
        scripted.script("student", f"k{turn}x", [f" Done {turn}."], repeat=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    if os.environ.get("RELAY_SKIP_MULTIHOST") == "1":
        pytest.skip("RELAY_SKIP_MULTIHOST=1")
    if os.geteuid() != 0:
        pytest.fail("the multi-host test needs root for `ip netns` (RELAY_SKIP_MULTIHOST=1 skips it)")
    haproxy = haproxy_binary()
    network = Network(f"rmh{os.getpid() % 100000}", free_subnet())
    pg_env = {
        **os.environ,
        "RELAY_PG_PORT": str(56000 + os.getpid() % 1000),
        "RELAY_PG_LISTEN": network.gateway,
        "RELAY_PG_TRUST": str(network.subnet),
    }
    pg_script = str(ROOT / "scripts" / "postgres.sh")
    with contextlib.ExitStack() as stack:
        stack.callback(network.down)
        network.up(HOSTS)
        started = subprocess.run(["bash", pg_script, "start"], capture_output=True, text=True, env=pg_env)
        stack.callback(subprocess.run, ["bash", pg_script, "stop"], capture_output=True, env=pg_env)
        assert started.returncode == 0, started.stderr
        pg_url = started.stdout.strip().splitlines()[-1]

        scripted = stack.enter_context(ScriptedServer(host=network.gateway))
        scripted.configure(token_interval_s=TEACHER_TOKEN_INTERVAL_S)
        script(scripted)

        config = tmp_path / "relay.toml"
        template = json.dumps(CHATML)
        config.write_text(
            f'[student]\nbase_url = "{scripted.base_url}"\nmodel = "student"\nchat_template = {template}\n'
            f'[teacher]\nbase_url = "{scripted.base_url}"\nmodel = "teacher"\nchat_template = {template}\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env |= {
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
            "RELAY_CONFIG": str(config),
            "RELAY_SERVER_MODEL": "relay",
            "RELAY_BUDGET_STORE": pg_url,
            "RELAY_BUDGET_MAX_TEACHER_TOKENS": str(BUDGET_TOKENS),
            "RELAY_BUDGET_HOLD_TTL_S": str(HOLD_TTL_S),
        }
        hosts: list[subprocess.Popen[bytes]] = []
        for index, namespace in enumerate(network.namespaces):
            log = (tmp_path / f"h{index}.log").open("wb")
            stack.callback(log.close)
            command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "relay_agents.cli", "serve"]
            host = subprocess.Popen(
                [
                    *command,
                    "--host",
                    network.host_address(index),
                    "--port",
                    str(RELAY_PORT),
                    "--log-level",
                    "warning",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            hosts.append(host)
            stack.callback(_stop, host)

        port, stats = _free_port(), tmp_path / "haproxy.sock"
        (tmp_path / "haproxy.cfg").write_text(haproxy_config(network, port, stats))
        balancer = subprocess.Popen(
            [haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "haproxy.log").open("wb"),
        )
        stack.callback(_stop, balancer)
        wait_for(lambda: stats.exists(), "haproxy's stats socket", 20)
        wait_for(
            lambda: (
                all(s == "UP" for s in haproxy_states(stats).values())
                or any(h.poll() is not None for h in hosts)
            ),
            "every relay host to be up behind haproxy",
            120,
        )
        assert all(h.poll() is None for h in hosts), [
            (tmp_path / f"h{i}.log").read_text() for i in range(HOSTS)
        ]
        yield {
            "url": f"http://127.0.0.1:{port}/v1/chat/completions",
            "stats": stats,
            "hosts": hosts,
            "scripted": scripted,
            "pg_url": pg_url,
            "host_urls": [f"http://{network.host_address(i)}:{RELAY_PORT}" for i in range(HOSTS)],
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def in_flight(host_url: str) -> float:
    """The host's ``relay_requests_in_flight`` gauge (read past the balancer)."""
    text = httpx2.get(f"{host_url}/metrics", timeout=5).text
    return next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("relay_requests_in_flight")
    )


def spend(pg_url: str, conversations: list[Conversation]) -> dict[str, int]:
    store = open_budget_store(pg_url)
    keys = {c.id: conversation_key(c.id) for c in conversations}
    spent = store.spent(list(keys.values()))
    return {cid: spent[key].teacher_tokens for cid, key in keys.items()}


def teacher_served(scripted: ScriptedServer, conversations: list[Conversation]) -> dict[str, int]:
    """Teacher tokens each conversation's calls streamed to the end (a call whose relay host
    died before the teacher finished is ``disconnected``)."""
    served = dict.fromkeys((c.id for c in conversations), 0)
    for request in scripted.requests():
        if request["model"] != "teacher" or request["disconnected"]:
            continue
        owner = next((cid for cid in served if f"{cid} T" in request["prompt"]), None)
        if owner is not None:
            served[owner] += min(request["body"]["max_tokens"], CALL_TOKENS + 10)
    return served


def test_relay_hosts_behind_haproxy_share_budgets_and_conversations_and_survive_a_killed_host(
    lab: dict[str, Any],
) -> None:
    url, stats, hosts, scripted = lab["url"], lab["stats"], lab["hosts"], lab["scripted"]
    figures: dict[str, Any] = {"hosts": HOSTS, "conversations": CONVERSATIONS, "turns": TURNS}

    # 1. All hosts up: every answer arrives, each turn on the next host, history kept, spend exact.
    steady = run_load(url, "steady")
    figures["steady"] = steady.figures()
    assert steady.lost == 0
    for index, conversation in enumerate(steady.conversations):
        hosts_seen = [a.host for a in conversation.answers if a is not None]
        assert hosts_seen == [f"h{(index + t) % HOSTS}" for t in range(1, TURNS + 1)], hosts_seen
    student_prompts = [r["prompt"] for r in scripted.requests() if r["model"] == "student"]
    for conversation in steady.conversations:
        for turn in range(2, TURNS + 1):
            prompts = [p for p in student_prompts if conversation.question(turn) in p]
            assert prompts, (conversation.id, turn)
            for earlier in conversation.answers[: turn - 1]:
                assert earlier is not None
                assert all(earlier.text in p for p in prompts), (conversation.id, turn, earlier.text)
    spent = spend(lab["pg_url"], steady.conversations)
    for conversation in steady.conversations:
        granted = [a.teacher_tokens for a in conversation.answers if a is not None]
        assert granted == [CALL_TOKENS, CALL_TOKENS, BUDGET_TOKENS - 2 * CALL_TOKENS, 0], granted
        assert spent[conversation.id] == sum(granted) == BUDGET_TOKENS

    # 2. One host killed outright under load: clients retry, the balancer takes it out.
    killed_at: list[float] = []

    def kill_one(conversations: list[Conversation]) -> None:
        wait_for(
            lambda: sum(len(c.answers) for c in conversations) >= CONVERSATIONS, "a quarter of the load", 60
        )
        hosts[1].kill()
        killed_at.append(time.monotonic())
        wait_for(lambda: haproxy_states(stats)["h1"].startswith("DOWN"), "haproxy to take h1 out", 10)
        killed_at.append(time.monotonic())

    killed = run_load(url, "killed", during=kill_one)
    figures["killed"] = killed.figures() | {"out_of_rotation_s": round(killed_at[1] - killed_at[0], 2)}
    assert killed.lost == 0
    assert not [a for a in killed.answers if a.host == "h1" and a.finished_at > killed_at[1]]

    # No hold outlives its TTL: once the load is over and the TTL has passed since the kill,
    # nothing is held, and no conversation spent beyond its budget.
    time.sleep(max(0.0, killed_at[0] + HOLD_TTL_S + 0.5 - time.monotonic()))
    with psycopg.connect(lab["pg_url"]) as conn:
        live = conn.execute("SELECT COUNT(*) FROM relay_budget_holds WHERE expires_at >= %s", (time.time(),))
        assert live.fetchone() == (0,)
    spent = spend(lab["pg_url"], killed.conversations)
    served = teacher_served(scripted, killed.conversations)
    for conversation in killed.conversations:
        acknowledged = sum(a.teacher_tokens for a in conversation.answers if a is not None)
        retried = any(a is not None and a.attempts > 1 for a in conversation.answers)
        if retried:  # a killed attempt's teacher text is paid for only if its call was settled
            assert acknowledged <= spent[conversation.id] <= min(served[conversation.id], BUDGET_TOKENS)
        else:
            assert spent[conversation.id] == acknowledged == served[conversation.id]
    figures["killed"]["conversations_retried"] = sum(
        any(a is not None and a.attempts > 1 for a in c.answers) for c in killed.conversations
    )

    # 3. One host stopped with SIGTERM while it streams: it drains its streams, none is cut.
    stopped_at: list[float] = []

    def drain_one(conversations: list[Conversation]) -> None:
        wait_for(
            lambda: sum(len(c.answers) for c in conversations) >= CONVERSATIONS, "a quarter of the load", 60
        )
        wait_for(lambda: in_flight(lab["host_urls"][2]) > 0, "a stream on h2", 30)
        hosts[2].send_signal(signal.SIGTERM)
        stopped_at.append(time.monotonic())

    drained = run_load(url, "drained", during=drain_one)
    figures["drained"] = drained.figures()
    assert drained.lost == 0
    assert figures["drained"]["streams_cut"] == 0, figures
    assert hosts[2].wait(timeout=30) == -signal.SIGTERM  # uvicorn re-raises it after its shutdown
    assert [a for a in drained.answers if a.host == "h2" and a.finished_at > stopped_at[0]]
    print(json.dumps(figures, indent=1))
    report = os.environ.get("RELAY_MULTIHOST_REPORT")
    if report:
        Path(report).write_text(json.dumps(figures, indent=1))
