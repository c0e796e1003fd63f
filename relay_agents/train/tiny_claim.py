"""The claim in miniature: GRPO with the difficulty-aware reward cuts the calls a student does
not need, on the tiny world's small-factor variant, on the CPU.

The SFT student (:mod:`relay_agents.tiny.small_factor`) calls on every hard step, also on the
``A*3`` products it learned. Two GRPO runs start from it with real relay rollouts (the default
tiny teacher served by vLLM): the published code's group reward, and plain correctness (the
ablation). All are measured on held-out problems against the teacher alone:
``python -m relay_agents.train.tiny_claim --out DIR`` writes ``table.md``, ``results.json`` and
``curve.png`` (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relay_agents.core.config import Endpoint
from relay_agents.core.types import Request
from relay_agents.tiny import small_factor, tasks
from relay_agents.train.grpo import (
    DataSettings,
    FilterSettings,
    GRPOSettings,
    RewardSettings,
    StudentSettings,
    build_trainer,
)
from relay_agents.train.rollouts import RelayRollouts, RolloutSettings

#: tiny answers are about 40 tokens; the relay's answer cap
MAX_ANSWER_TOKENS = 96


@dataclass(frozen=True)
class ClaimSettings:
    """One run's size; :data:`FULL` is the published table's, :data:`SHORT` the CI check's."""

    steps: int
    prompts_per_step: int
    num_generations: int
    eval_problems: int
    learning_rate: float = 2e-4
    temperature: float = 1.0
    train_problems: int = 2000
    seed: int = 0


FULL = ClaimSettings(steps=40, prompts_per_step=16, num_generations=8, eval_problems=400)
SHORT = ClaimSettings(steps=20, prompts_per_step=8, num_generations=8, eval_problems=100)


@dataclass(frozen=True)
class Row:
    """One setting on the held-out problems (calls: per problem, greedy decoding)."""

    setting: str
    accuracy: float
    teacher_share: float
    calls_alone: float
    calls_rest: float
    n_alone: int
    n_rest: int


@contextmanager
def tiny_teacher() -> Iterator[Endpoint]:
    """The default tiny teacher served by vLLM (greedy), as an endpoint."""
    from relay_agents.serving import VLLMServer

    teacher_dir = small_factor.teacher_dir()
    server = VLLMServer(teacher_dir, cpu_cores="1")
    server.start()
    try:
        yield Endpoint(
            base_url=server.base_url,
            model=server.model,
            api="completions",
            tokenizer_path=teacher_dir,
            temperature=0.0,
        )
    finally:
        server.stop()


def _messages(problem: tasks.Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": problem.user_message}]


def evaluate_student(
    setting: str, model: Any, tokenizer: Any, teacher: Endpoint, problems: Sequence[tasks.Problem]
) -> Row:
    """Relay every problem greedily with ``model`` as the student."""
    rollouts = RelayRollouts(teacher, RolloutSettings(max_answer_tokens=MAX_ANSWER_TOKENS)).run(
        model, tokenizer, [_messages(p) for p in problems], temperature=None
    )
    correct = [tasks.is_correct(r.text, p.gold) for r, p in zip(rollouts, problems, strict=True)]
    alone = [small_factor.solvable_alone(p) for p in problems]
    calls = [len(r.requested) for r in rollouts]
    n_alone = sum(alone)
    return Row(
        setting=setting,
        accuracy=sum(correct) / len(problems),
        teacher_share=sum(r.teacher_tokens for r in rollouts)
        / max(1, sum(len(r.completion_ids) for r in rollouts)),
        calls_alone=sum(c for c, a in zip(calls, alone, strict=True) if a) / max(1, n_alone),
        calls_rest=sum(c for c, a in zip(calls, alone, strict=True) if not a)
        / max(1, len(problems) - n_alone),
        n_alone=n_alone,
        n_rest=len(problems) - n_alone,
    )


def evaluate_teacher(teacher: Endpoint, problems: Sequence[tasks.Problem]) -> Row:
    """The teacher alone writes every answer (greedy)."""
    from relay_agents.clients import EndpointClient

    client = EndpointClient(teacher, "teacher")
    correct = 0
    for p in problems:
        gen = client.generate(Request(messages=_messages(p), answer="", max_tokens=MAX_ANSWER_TOKENS))
        correct += tasks.is_correct(gen.text, p.gold)
    n_alone = sum(small_factor.solvable_alone(p) for p in problems)
    return Row("teacher alone", correct / len(problems), 1.0, 0.0, 0.0, n_alone, len(problems) - n_alone)


def write_train_data(path: Path, n: int, seed: int) -> Path:
    """The variant's training problems as ``{"question", "answer", "difficulty"}`` lines."""
    with path.open("w") as f:
        for p in small_factor.train_problems(n, seed=seed):
            difficulty = "alone" if small_factor.solvable_alone(p) else "teacher"
            f.write(json.dumps({"question": p.question, "answer": p.gold, "difficulty": difficulty}) + "\n")
    return path


def train(settings: ClaimSettings, teacher: Endpoint, data: Path, out: Path, mode: str) -> Any:
    """One GRPO run from the shipped SFT student; returns the trainer (its model and log)."""
    import torch

    torch.manual_seed(settings.seed)
    config = GRPOSettings(
        student=StudentSettings(model=str(small_factor.student_dir())),
        teacher=teacher,
        data=DataSettings(path=data, user_template="{question}\n" + tasks.INSTRUCTION),
        # the teacher solves ~99% of the tiny problems: the filter would keep nearly all
        filter=FilterSettings(enabled=False),
        reward=RewardSettings(mode=mode),  # type: ignore[arg-type]
        rollout=RolloutSettings(max_answer_tokens=MAX_ANSWER_TOKENS),
        grpo={
            "output_dir": str(out),
            "use_cpu": True,
            "max_steps": settings.steps,
            "per_device_train_batch_size": settings.prompts_per_step * settings.num_generations,
            "num_generations": settings.num_generations,
            "max_completion_length": MAX_ANSWER_TOKENS,
            "learning_rate": settings.learning_rate,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "temperature": settings.temperature,
            "beta": 0.0,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "seed": settings.seed,
            "dataloader_num_workers": 0,
            "disable_tqdm": True,
        },
    )
    trainer = build_trainer(config)
    trainer.train()
    trainer.save_model(str(out))
    return trainer


MODES = (
    ("group", "GRPO student (difficulty-aware reward)"),
    ("correctness", "GRPO, correctness reward (ablation)"),
)


def run(settings: ClaimSettings, out: Path, teacher: Endpoint, *, full: bool = True) -> dict[str, Any]:
    """The SFT student and GRPO with the difficulty-aware reward; with ``full`` also the
    ablation and the teacher alone. Writes ``results.json`` and ``table.md`` in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # one thread: several times faster than two for models this small on a loaded 2-core machine
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    problems = small_factor.eval_problems(settings.eval_problems)
    data = write_train_data(out / "train.jsonl", settings.train_problems, settings.seed)
    sft_dir = small_factor.student_dir()
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    t0 = time.monotonic()
    sft = AutoModelForCausalLM.from_pretrained(sft_dir)
    rows = [evaluate_student("SFT student (cold start)", sft, tokenizer, teacher, problems)]
    curves: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for mode, name in MODES if full else MODES[:1]:
        t = time.monotonic()
        trainer = train(settings, teacher, data, out / f"grpo-{mode}", mode)
        seconds[mode] = round(time.monotonic() - t, 1)
        curves[mode] = [e for e in trainer.state.log_history if "reward" in e]
        rows.append(evaluate_student(name, trainer.model, tokenizer, teacher, problems))
    if full:
        rows.append(evaluate_teacher(teacher, problems))
    results = {
        "settings": asdict(settings),
        "rows": [asdict(r) for r in rows],
        "curves": curves,
        "train_seconds": seconds,
        "total_seconds": round(time.monotonic() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table(rows))
    return results


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| setting | accuracy | teacher share | calls, solvable alone | calls, the rest |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setting} | {100 * r.accuracy:.1f}% | {100 * r.teacher_share:.1f}% "
            f"| {r.calls_alone:.2f} (n={r.n_alone}) | {r.calls_rest:.2f} (n={r.n_rest}) |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Reward, calls per answer and accuracy of the rollouts against the step, both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    keys = (("reward", "reward"), ("relay/calls", "calls per answer"), ("relay/accuracy", "accuracy"))
    labels = {"group": "difficulty-aware reward", "correctness": "correctness reward"}
    for ax, (key, title) in zip(axes, keys, strict=True):
        for mode, log in results["curves"].items():
            ax.plot([e["step"] for e in log], [e[key] for e in log], label=labels[mode])
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--short", action="store_true", help="the CI check's size")
    args = parser.parse_args()
    settings = SHORT if args.short else FULL
    with tiny_teacher() as teacher:
        results = run(settings, args.out, teacher, full=not args.short)
    plot(results, args.out / "curve.png")
    print((args.out / "table.md").read_text())
    print(json.dumps({"train_seconds": results["train_seconds"], "total_seconds": results["total_seconds"]}))


if __name__ == "__main__":
    main()
