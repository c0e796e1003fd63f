"""Call policies on the tiny world at matched teacher-token share.

The student is the tiny world's **solo student** (never taught to call), the teacher the tiny
teacher, both on real vLLM servers (solo on core 0, teacher on core 1), greedy. Each calling
policy's knob (confidence threshold, interval, random rate) is calibrated on a development set
(held-out problems, seed 1) to the same target teacher-token share with
:func:`relay_agents.calibrate.calibrate`; then every policy answers the evaluation set
(held-out problems, seed 0) through the relay engine.

    python benchmarks/policies.py [--target 0.10] [-n 300] [--dev 200] [--pair DIR] [--json]
        [--call-tokens 4] [--until tokens|step] [--only confidence,interval,random]
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
from pathlib import Path
from typing import Any

from relay_agents import (
    ConfidencePolicy,
    Endpoint,
    IntervalPolicy,
    RandomPolicy,
    RelayConfig,
    TeacherFreePolicy,
    TeacherOnlyPolicy,
)
from relay_agents.calibrate import DevProblem, Point, calibrate, measure
from relay_agents.serving import VLLMServer
from relay_agents.tiny import tasks
from relay_agents.tiny.servers import TINY_MAX_ANSWER_TOKENS

CALL_TOKENS = 4
GRIDS: dict[str, tuple[list[float], bool]] = {
    "confidence": ([0.3, 0.6, 0.9, 0.95, 0.98, 0.99, 0.995], False),
    "interval": ([4, 8, 16, 32, 64], True),
    "random": ([0.005, 0.01, 0.02, 0.05, 0.1, 0.2], False),
}


def pair_dirs(pair: str | None) -> tuple[Path, Path]:
    """(solo student, teacher) of the tiny pair: a build directory, or ``build_tiny_pair()``."""
    if pair is not None:
        root = Path(pair)
        return root / "solo", root / "teacher"
    from relay_agents.tiny import build_tiny_pair

    built = build_tiny_pair()
    assert built.solo_dir is not None
    return built.solo_dir, built.teacher_dir


def align_tasks(pair_root: Path) -> tuple:
    """Draw problems with the task parameters the pair was trained on (its manifest records
    them), so a build of another recipe is evaluated on its own task family."""
    recipe = json.loads((pair_root / "manifest.json").read_text()).get("recipe", {})
    params = recipe.get("task_params")
    if params:
        tasks.A_RANGE, tasks.B_RANGE = tuple(params[0]), tuple(params[1])
    return tasks.A_RANGE, tasks.B_RANGE


def base_config(solo: VLLMServer, teacher: VLLMServer) -> RelayConfig:
    def endpoint(server: VLLMServer) -> Endpoint:
        return Endpoint(
            base_url=server.base_url, model=server.model, tokenizer_path=server.model_dir, temperature=0.0
        )

    return RelayConfig(
        student=endpoint(solo),
        teacher=endpoint(teacher),
        max_answer_tokens=TINY_MAX_ANSWER_TOKENS,
        max_student_turns=64,  # every policy call is a student turn
    )


def builder(base: RelayConfig, kind: str, call_tokens: int = CALL_TOKENS, until: str = "tokens"):
    def build(value: float) -> RelayConfig:
        calls: Any = {"call_tokens": call_tokens, "until": until}
        if kind == "confidence":
            policy: Any = ConfidencePolicy(threshold=value, **calls)
        elif kind == "interval":
            policy = IntervalPolicy(every=int(value), **calls)
        else:
            policy = RandomPolicy(rate=value, seed=0, **calls)
        return base.model_copy(update={"policy": policy})

    return build


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    solo_dir, teacher_dir = pair_dirs(args.pair)
    task_params = align_tasks(solo_dir.parent)
    solo = VLLMServer(solo_dir, served_model_name="tiny-solo", cpu_cores="0")
    teacher = VLLMServer(teacher_dir, served_model_name="tiny-teacher", cpu_cores="1")
    dev = [DevProblem(p.question, p.gold) for p in tasks.eval_problems(args.dev, seed=1)]
    held = [DevProblem(p.question, p.gold) for p in tasks.eval_problems(args.n, seed=0)]
    out: dict[str, Any] = {
        "target": args.target,
        "n": args.n,
        "dev": args.dev,
        "pair": str(solo_dir.parent),
        "task_params": task_params,
        "call_tokens": args.call_tokens,
        "until": args.until,
    }
    kinds = [k for k in GRIDS if k in args.only.split(",")]
    async with solo, teacher:
        base = base_config(solo, teacher)
        chosen: dict[str, float] = {}
        curves: dict[str, list[dict[str, float]]] = {}
        for kind in kinds:
            grid, integer = GRIDS[kind]
            t0 = time.monotonic()
            curve, point = await calibrate(
                builder(base, kind, args.call_tokens, args.until),
                grid,
                args.target,
                dev,
                refine=args.refine,
                integer=integer,
                concurrency=32,
            )
            chosen[kind] = point.value
            curves[kind] = [vars(p) for p in curve]
            logging.info(
                "%s: %s -> %s (%.0fs)",
                kind,
                [(p.value, round(p.share, 3)) for p in curve],
                point,
                time.monotonic() - t0,
            )
        rows: dict[str, Point] = {
            "student alone": await measure(base.model_copy(update={"policy": TeacherFreePolicy()}), held),
        }
        for kind in kinds:
            rows[kind] = await measure(
                builder(base, kind, args.call_tokens, args.until)(chosen[kind]),
                held,
                value=chosen[kind],
                concurrency=32,
            )
        if not args.no_teacher:
            rows["teacher alone"] = await measure(
                base.model_copy(update={"policy": TeacherOnlyPolicy()}), held
            )
    out["chosen"] = chosen
    out["dev_curves"] = curves
    out["rows"] = {name: vars(point) for name, point in rows.items()}
    out["date"] = date.today().isoformat()
    out["machine"] = machine()
    return out


LABELS = {
    "student alone": "student alone (solo, calls blocked)",
    "confidence": "confidence, threshold {v:.3g}",
    "interval": "interval, every {v:.0f} tokens",
    "random": "random, rate {v:.3g} per token",
    "teacher alone": "teacher alone (teacher-only policy)",
}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| policy (calibrated on the dev set) | accuracy | teacher-token share | dev-set share |",
        "|---|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        label = LABELS[name].format(v=row["value"])
        dev = ""
        if name in result["chosen"]:
            dev_point = next(p for p in result["dev_curves"][name] if p["value"] == result["chosen"][name])
            dev = f"{100 * dev_point['share']:.1f}%"
        lines.append(f"| {label} | {100 * row['accuracy']:.1f}% | {100 * row['share']:.1f}% | {dev} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.10, help="teacher-token share to match")
    parser.add_argument("-n", type=int, default=300, help="evaluation problems (seed 0)")
    parser.add_argument("--dev", type=int, default=200, help="development problems (seed 1)")
    parser.add_argument("--refine", type=int, default=4)
    parser.add_argument("--pair", default=None, help="a tiny build directory (default: build_tiny_pair())")
    parser.add_argument("--call-tokens", type=int, default=CALL_TOKENS, help="tokens per teacher call")
    parser.add_argument("--until", choices=("tokens", "step"), default="tokens")
    parser.add_argument("--only", default=",".join(GRIDS), help="calling policies to compare")
    parser.add_argument("--no-teacher", action="store_true", help="skip the teacher-alone row")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2) if args.json else table(result))
    print(
        f"\nmeasured {result['date']} on {result['machine']}; target share {args.target:.0%}, "
        f"{args.n} held-out problems, {args.dev} development problems, "
        f"call_tokens {args.call_tokens}, until {args.until}"
    )


if __name__ == "__main__":
    main()
