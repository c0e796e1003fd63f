"""Latency the relay server adds over the upstream models' own time, at 1 and 200 streams.

Three processes on loopback: the scripted OpenAI-compatible upstream (student and teacher,
every request answered after a fixed time to first token), ``relay-agents serve`` in front of
it, and this client (a bare aiohttp session reading every SSE line: the measuring client
must cost next to nothing, or at 200 streams its own CPU would be what is measured). Each
measured request is timed twice: through the relay server, and as the very upstream requests
the relay made (bodies read back from the upstream), replayed directly by the same client at
the same concurrency. The difference is what the server and the relay add per request.
(``tests/test_server.py`` checks that the ``openai`` SDK reads the server's streams.)

Workloads: ``single`` (the student answers without a call: one upstream request) and
``relayed`` (student, one teacher call, student: three upstream requests).

    python benchmarks/server_overhead.py [--latency-ms 100] [--requests 200] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from itertools import count
from pathlib import Path

import aiohttp
import httpx2

from relay_agents import Endpoint, RelayConfig, astream_relay
from relay_agents.clients import client_for
from relay_agents.testing import ScriptedServer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORKLOADS = {
    "single": ({"student": ["The product 12*34 is 408, so the answer is \\boxed{408}."]}, 1),
    "relayed": (
        {
            "student": ["Step one: 12*34 = <call>3</call>", ". So the answer is \\boxed{409}."],
            "teacher": [" 408 and more"],
        },
        3,
    ),
}
_keys = count()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RelayServerProcess:
    """``relay-agents serve`` in a subprocess, configured by a TOML file."""

    def __init__(self, upstream: ScriptedServer, workdir: Path, workers: int = 1) -> None:
        template = json.dumps(CHATML)
        self.config = workdir / "relay.toml"
        self.config.write_text(
            f'[student]\nbase_url = "{upstream.base_url}"\nmodel = "student"\nchat_template = {template}\n'
            f'[teacher]\nbase_url = "{upstream.base_url}"\nmodel = "teacher"\nchat_template = {template}\n'
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env["RELAY_AGENTS_STATE"] = str(workdir / "state")
        cli = Path(sys.executable).parent / "relay-agents"
        args = [
            str(cli),
            "serve",
            "--port",
            str(self.port),
            "--config",
            str(self.config),
            "--log-level",
            "warning",
            "--workers",
            str(workers),
        ]
        self.proc = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx2.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("relay-agents serve did not start")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU time the server's processes (with ``--workers``, its workers too) have used."""
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat.parent.name == str(self.proc.pid) or fields[1] == str(self.proc.pid):
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=15)


def script(upstream: ScriptedServer, workload: str, keys: list[str]) -> None:
    responses, _ = WORKLOADS[workload]
    for key in keys:
        for model, texts in responses.items():
            upstream.script(model, key, texts)


class SSEClient:
    """POSTs a streaming request and reads its server-sent events to the end."""

    def __init__(self) -> None:
        # No pool limit (aiohttp's default of 100 would queue half of 200 streams here), and
        # idle connections dropped before uvicorn's 5 s keep-alive closes them under a request.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300))

    async def stream(self, url: str, body: dict) -> None:
        async with self.session.post(url, json=body) as response:
            assert response.status == 200, await response.text()
            async for _line in response.content:
                pass

    async def close(self) -> None:
        await self.session.close()


async def through_relay(client: SSEClient, server_url: str, key: str) -> float:
    started = time.perf_counter()
    body = {"model": "relay", "messages": [{"role": "user", "content": key}], "stream": True}
    await client.stream(f"{server_url}/v1/chat/completions", body)
    return time.perf_counter() - started


async def in_library(config: RelayConfig, key: str) -> float:
    """The same answer streamed by ``astream_relay`` in this process: the relay loop alone."""
    started = time.perf_counter()
    async for _delta in astream_relay(key, config):
        pass
    return time.perf_counter() - started


async def direct(client: SSEClient, upstream_url: str, bodies: list[dict]) -> float:
    """The same upstream requests, one after the other, straight to the upstream."""
    started = time.perf_counter()
    for body in bodies:
        await client.stream(f"{upstream_url}/completions", body)
    return time.perf_counter() - started


def upstream_bodies(upstream: ScriptedServer, keys: list[str], per_request: int) -> dict[str, list[dict]]:
    records = [r for r in upstream.requests() if r["path"] == "/v1/completions"]
    bodies = {key: [r["body"] for r in records if key in r["prompt"]] for key in keys}
    for key, found in bodies.items():
        assert len(found) == per_request, (key, len(found))
    return bodies


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def measure(
    upstream: ScriptedServer,
    server: RelayServerProcess,
    client: SSEClient,
    config: RelayConfig,
    workload: str,
    concurrency: int,
    requests: int,
    latency_s: float,
) -> dict:
    """Rounds of ``concurrency`` requests: through the server, then the same answers through
    ``astream_relay`` in this process, then their upstream requests replayed directly."""
    _, per_request = WORKLOADS[workload]
    added: list[float] = []
    added_library: list[float] = []
    own: list[float] = []
    server_cpu = 0.0
    rounds = max(1, requests // concurrency) + 1  # the first round warms pools and caches
    for round_ in range(rounds):
        upstream.reset()
        upstream.configure(ttft_s=latency_s, latency_s=latency_s)
        keys = [f"S{next(_keys)}:" for _ in range(concurrency)]
        script(upstream, workload, keys)
        cpu_before = server.cpu_seconds()
        via = await asyncio.gather(*(through_relay(client, server.url, k) for k in keys))
        if round_:
            server_cpu += server.cpu_seconds() - cpu_before
        bodies = upstream_bodies(upstream, keys, per_request)
        script(upstream, workload, keys)
        library = await asyncio.gather(*(in_library(config, k) for k in keys))
        script(upstream, workload, keys)
        alone = await asyncio.gather(*(direct(client, upstream.base_url, bodies[k]) for k in keys))
        if round_:
            added += [(v - a) * 1000 for v, a in zip(via, alone, strict=True)]
            added_library += [(v - a) * 1000 for v, a in zip(library, alone, strict=True)]
            own += [a * 1000 for a in alone]
    p50, p99 = percentiles(added)
    lib50, lib99 = percentiles(added_library)
    return {
        "workload": workload,
        "concurrency": concurrency,
        "samples": len(added),
        "upstream_requests_per_answer": per_request,
        "added_ms_p50": p50,
        "added_ms_p99": p99,
        "relay_loop_ms_p50": lib50,
        "relay_loop_ms_p99": lib99,
        "upstream_own_ms_p50": statistics.median(own),
        "server_cpu_ms_per_request": server_cpu / len(added) * 1000,
    }


async def main(latency_ms: float, requests: int, concurrency: int, workers: int) -> dict:
    rows = []
    with ScriptedServer() as upstream, tempfile.TemporaryDirectory() as tmp:
        server = RelayServerProcess(upstream, Path(tmp), workers)
        try:
            client = SSEClient()
            config = RelayConfig(
                student=Endpoint(base_url=upstream.base_url, model="student", chat_template=CHATML),
                teacher=Endpoint(base_url=upstream.base_url, model="teacher", chat_template=CHATML),
            )
            for workload in WORKLOADS:
                for streams in (1, concurrency):
                    rows.append(
                        await measure(
                            upstream,
                            server,
                            client,
                            config,
                            workload,
                            streams,
                            requests,
                            latency_ms / 1000,
                        )
                    )
            await client.close()
            for endpoint, role in ((config.student, "student"), (config.teacher, "teacher")):
                await client_for(endpoint, role).aclose()  # the library's pooled clients
        finally:
            server.stop()
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "latency_ms": latency_ms,
        "workers": workers,
        "rows": rows,
    }


def table(r: dict) -> str:
    lines = [
        f"Measured {r['date']} on {r['machine']}; upstream time to first token {r['latency_ms']:.0f} ms; "
        f"{r['workers']} server process(es).",
        "",
        "| workload (upstream requests) | concurrent streams | added through the server, p50 / p99 "
        "| per upstream request, p50 | `astream_relay` in-process, added p50 / p99 "
        "| server CPU per answer | upstream's own time, p50 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['workload']} ({row['upstream_requests_per_answer']}) | {row['concurrency']} "
            f"| {row['added_ms_p50']:.2f} / {row['added_ms_p99']:.2f} ms "
            f"| {row['added_ms_p50'] / row['upstream_requests_per_answer']:.2f} ms "
            f"| {row['relay_loop_ms_p50']:.2f} / {row['relay_loop_ms_p99']:.2f} ms "
            f"| {row['server_cpu_ms_per_request']:.1f} ms | {row['upstream_own_ms_p50']:.1f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--requests", type=int, default=200, help="measured requests per row")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="relay-agents serve --workers")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = asyncio.run(main(args.latency_ms, args.requests, args.concurrency, args.workers))
    print(json.dumps(result, indent=2) if args.json else table(result))
