"""Client CPU per request: the openai SDK against relay-agents' async transport, side by side.

Both send the same non-streamed ``/v1/completions`` request to the scripted server (its own
process, no simulated latency) and read the whole JSON answer; what is measured is the CPU
time of this process (``time.process_time``) per request, so the server's work is left out.
The two alternate in rounds so that drift on a shared machine hits both alike.

    python benchmarks/transport.py [--requests 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections.abc import Awaitable, Callable
from datetime import date

import openai

from relay_agents.testing import ScriptedServer
from relay_agents.transport import AsyncTransport

BODY = {
    "model": "student",
    "prompt": "<|im_start|>user\nWhat is 12*34?<|im_end|>\n<|im_start|>assistant\n",
    "max_tokens": 64,
    "stop": ["</call>"],
    "include_stop_str_in_output": True,
}


async def cpu_per_request(send: Callable[[], Awaitable[object]], requests: int, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await send()

    started = time.process_time()
    await asyncio.gather(*(one() for _ in range(requests)))
    return (time.process_time() - started) / requests * 1000


async def main(requests: int, concurrency: int, rounds: int) -> dict:
    with ScriptedServer() as server:
        server.configure(default_response="Step one: 12*34 = <call>3</call>")
        sdk = openai.AsyncOpenAI(
            base_url=server.base_url, api_key="x", max_retries=0, http_client=openai.DefaultAioHttpClient()
        )
        transport = AsyncTransport("x", timeout=20, connect_timeout=5)
        url = f"{server.base_url}/completions"
        extra = {k: v for k, v in BODY.items() if k not in ("model", "prompt")}

        async def via_sdk() -> object:
            reply = await sdk.with_raw_response.completions.create(
                model=BODY["model"], prompt=BODY["prompt"], extra_body=extra
            )
            return reply.http_response.json()

        async def via_transport() -> object:
            return await transport.post_json(url, BODY)

        assert (await via_sdk())["choices"][0]["text"] == (await via_transport())["choices"][0]["text"]
        measured: dict[str, list[float]] = {"sdk": [], "transport": []}
        per_round = requests // rounds
        for _ in range(rounds):
            measured["sdk"].append(await cpu_per_request(via_sdk, per_round, concurrency))
            measured["transport"].append(await cpu_per_request(via_transport, per_round, concurrency))
        await sdk.close()
        await transport.aclose()
    sdk_ms, transport_ms = (min(v) for v in measured.values())
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "concurrency": concurrency,
        "sdk_cpu_ms_per_request": sdk_ms,
        "transport_cpu_ms_per_request": transport_ms,
        "ratio": sdk_ms / transport_ms,
    }


def table(r: dict) -> str:
    return "\n".join(
        [
            f"Measured {r['date']} on {r['machine']}; {r['concurrency']} requests in flight.",
            "",
            "| client | CPU per request |",
            "|---|---|",
            f"| openai SDK (`AsyncOpenAI`, aiohttp transport) | {r['sdk_cpu_ms_per_request']:.3f} ms |",
            f"| relay-agents `AsyncTransport` | {r['transport_cpu_ms_per_request']:.3f} ms |",
            f"| ratio | {r['ratio']:.1f}x |",
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the two clients")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = asyncio.run(main(args.requests, args.concurrency, args.rounds))
    print(json.dumps(result, indent=2) if args.json else table(result))
