"""The paper's table in miniature: the tiny world through real vLLM servers and the relay engine.

Starts three vLLM servers (the relay-trained student and the solo student on core 0, the
teacher on core 1), then answers the same held-out problems four ways with
:func:`relay_agents.arelay`:

* student alone: the solo student (the student's size and training budget, trained
  without relay on the teacher's full solutions), alone;
* teacher-free: the relay-trained student with calls blocked (vLLM ``bad_words``);
* relay: student + teacher (``policy="command"``), with the teacher's share of answer tokens;
* teacher alone.

Greedy (temperature 0) and sampled at the paper's temperature 0.7 (a fixed per-request seed).

    python benchmarks/tiny_world.py [-n 300] [--concurrency 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import time
from datetime import date
from typing import Any

from relay_agents.tiny.build import read_stats
from relay_agents.tiny.evaluate import evaluate_servers
from relay_agents.tiny.servers import solo_server, tiny_pair_servers

LABELS = {
    "student_alone": "student alone",
    "teacher_free": "teacher-free",
    "relay": "relay (teacher share)",
    "teacher_alone": "teacher alone",
}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{_cpu()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | " + " | ".join(LABELS.values()) + " |",
        "|---|" + "---:|" * len(LABELS),
    ]
    for run in runs:
        rows = run["rows"]
        cells = []
        for key in LABELS:
            row = rows[key]
            cell = _pct(row["accuracy"])
            if key == "relay":
                cell += f" ({_pct(row['teacher_token_share'])})"
            cells.append(cell)
        seed = "" if run["sampling_seed"] is None else f", seed {run['sampling_seed']}"
        setting = f"T={run['temperature']:g}{seed}"
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def run_all(servers, solo, n: int, concurrency: int) -> list[dict[str, Any]]:
    runs = []
    for temperature, seed in ((0.0, None), (0.7, 0)):
        runs.append(
            await evaluate_servers(
                servers, solo, n=n, temperature=temperature, sampling_seed=seed, concurrency=concurrency
            )
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=300, help="held-out problems (default 300)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    t0 = time.monotonic()
    servers = tiny_pair_servers(cache_dir=args.cache_dir)  # builds the models if needed
    build_seconds = time.monotonic() - t0
    stats = read_stats(servers.pair)
    t0 = time.monotonic()
    with servers, solo_server(servers) as solo:
        start_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        runs = asyncio.run(run_all(servers, solo, args.n, args.concurrency))
        eval_seconds = time.monotonic() - t0
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "n": args.n,
        "recipe_hash": servers.pair.root.name,
        "params": {k: stats[k]["params"] for k in ("student", "solo", "teacher") if k in stats},
        "build_stats": stats,
        "build_or_load_seconds": round(build_seconds, 1),
        "server_start_seconds": round(start_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    params = result["params"]
    print(f"Tiny relay world, {args.n} held-out problems, {result['date']}, {result['machine']}")
    print(
        f"student {params.get('student', 0) / 1e6:.2f}M params, solo student "
        f"{params.get('solo', 0) / 1e6:.2f}M, teacher {params.get('teacher', 0) / 1e6:.2f}M; "
        f"recipe {result['recipe_hash']}\n"
    )
    print(table(runs))
    print()
    for run in runs:
        relay = run["rows"]["relay"]
        print(
            f"T={run['temperature']:g}: relay {relay['teacher_calls']} calls, "
            f"{relay['teacher_tokens']} teacher / {relay['student_tokens']} student tokens; errors "
            + ", ".join(f"{k} {v['errors']}" for k, v in run["rows"].items())
        )
    print(
        f"servers started in {start_seconds:.0f}s, evaluation {eval_seconds:.0f}s "
        f"(build {stats.get('build_seconds', '?')}s when it was built)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
