"""The evaluation harness's own cost: what ``run_eval`` spends per answer outside the relay
(grading in the worker processes, the result line written and flushed, bookkeeping), and its
throughput against servers that answer at once, at concurrency 1 and 32.

The servers are the scripted OpenAI-compatible server (its own process, no simulated latency):
the student answers ``\\boxed{N}`` and the teacher the same, so every answer is one request.
Per answer, the overhead is the run's wall time at concurrency 1 less the time spent inside
:func:`relay_agents.arelay` (each result line's ``latency_s``), over the number of answers. The
grading workers are started (and math-verify imported) before the clock starts.

    python benchmarks/eval_harness.py [--items 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from relay_agents import Endpoint, RelayConfig
from relay_agents.eval import EvalOptions, Grader, Problem, load_jsonl, run_eval
from relay_agents.testing import ScriptedServer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


async def measure(server: ScriptedServer, items: int, concurrency: int, root: Path) -> dict[str, float]:
    data = root / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"B-{i}: 2+{i}?", "answer": str(2 + i)}) + "\n" for i in range(items))
    )
    for i in range(items):
        for model in ("student", "teacher"):
            server.script(model, f"B-{i}:", [f"so \\boxed{{{2 + i}}}"], repeat=True)

    def endpoint(model: str) -> Endpoint:
        return Endpoint(base_url=server.base_url, model=model, chat_template=CHATML)

    config = RelayConfig(student=endpoint("student"), teacher=endpoint("teacher"))
    out = root / f"out-{concurrency}"
    options = EvalOptions(settings=("student", "teacher"), concurrency=concurrency)
    with Grader(
        workers=options.grade_workers
    ) as warm:  # the workers' start is not the harness's per-answer cost
        await warm.grade("\\boxed{1}", Problem("w", "q", "1"))
    started = time.perf_counter()
    summary = await run_eval(config, [load_jsonl(data)], out, options)
    wall = time.perf_counter() - started
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    inside = sum(x["latency_s"] for x in lines)
    measured = {
        "answers": len(lines),
        "wall_s": wall,
        "answers_per_s": len(lines) / wall,
        "accuracy": summary["settings"]["student"]["accuracy"],
    }
    if concurrency == 1:  # answers overlap at higher concurrency: the difference means nothing there
        measured["overhead_ms_per_answer"] = 1000 * (wall - inside) / len(lines)
    return measured


async def main(items: int) -> dict[str, object]:
    load = os.getloadavg()
    with ScriptedServer() as server, tempfile.TemporaryDirectory() as tmp:
        results = {c: await measure(server, items, c, Path(tmp)) for c in (1, 32)}
    return {
        "items": items,
        "cpus": os.cpu_count(),
        "load_before": load,
        "load_after": os.getloadavg(),
        "results": results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    print(json.dumps(asyncio.run(main(parser.parse_args().items)), indent=2))
