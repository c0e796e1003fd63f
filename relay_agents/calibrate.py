"""Calibrate a policy's knob to a target teacher-token share on a development set.

Like the threshold calibration of query routers: the share of answer tokens the teacher
writes grows (or shrinks) with one setting of the policy (the confidence threshold, the
interval, the random rate), so a sweep over a grid, refined by bisection between the two
settings whose shares bracket the target, finds the setting that buys the requested share of
teacher tokens. Every point of the curve is measured through the relay engine itself.

``relay-agents calibrate`` does this for :class:`ConfidencePolicy` (:func:`confidence_builder`)
and writes the chosen threshold into the config file's ``[policy]`` table (:func:`write_policy`).
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from relay_agents.core.config import RelayConfig
from relay_agents.core.policies import ConfidencePolicy, Policy

#: The default threshold grid (probabilities of the sampled token).
DEFAULT_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class DevProblem:
    """A development question and its gold answer (compared with the last ``\\boxed{}``)."""

    question: str
    answer: str


@dataclass(frozen=True)
class Point:
    """One setting measured on the development set."""

    value: float
    share: float  # teacher tokens / all answer tokens, pooled over the set
    accuracy: float
    teacher_calls: int
    errors: int


def load_dev_set(source: str, n: int | None = None) -> list[DevProblem]:
    """``"tiny"`` (held-out tiny-world problems, seed 1: not the seed-0 evaluation set) or a
    JSON Lines file with ``question`` and ``answer`` fields."""
    if source == "tiny":
        from relay_agents.tiny import tasks

        return [DevProblem(p.question, p.gold) for p in tasks.eval_problems(n or 200, seed=1)]
    rows = []
    for number, line in enumerate(Path(source).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(DevProblem(str(row["question"]), str(row["answer"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{source}:{number}: need a JSON object with question and answer ({exc})"
            ) from None
    return rows[:n] if n else rows


async def measure(
    config: RelayConfig, problems: Sequence[DevProblem], *, value: float = 0.0, concurrency: int = 16
) -> Point:
    """Accuracy and pooled teacher-token share of ``config`` on ``problems``."""
    from relay_agents.api import arelay
    from relay_agents.tiny.tasks import is_correct

    sem = asyncio.Semaphore(concurrency)

    async def one(problem: DevProblem) -> Any:
        async with sem:
            try:
                return await arelay(problem.question, config)
            except Exception as exc:  # a failed answer is a wrong answer, and counted
                return exc

    results = await asyncio.gather(*(one(p) for p in problems))
    ok = [(r, p) for r, p in zip(results, problems, strict=True) if not isinstance(r, BaseException)]
    student = sum(r.usage.student_tokens for r, _ in ok)
    teacher = sum(r.usage.teacher_tokens for r, _ in ok)
    return Point(
        value=value,
        share=teacher / max(student + teacher, 1),
        accuracy=sum(is_correct(r.text, p.answer) for r, p in ok) / max(len(problems), 1),
        teacher_calls=sum(r.usage.teacher_calls for r, _ in ok),
        errors=len(problems) - len(ok),
    )


async def calibrate(
    build: Callable[[float], RelayConfig],
    grid: Sequence[float],
    target: float,
    problems: Sequence[DevProblem],
    *,
    refine: int = 3,
    integer: bool = False,
    concurrency: int = 16,
    on_point: Callable[[Point], None] | None = None,
) -> tuple[list[Point], Point]:
    """Measure ``build(value)`` for each value of ``grid``, then bisect ``refine`` times between
    the two neighbouring values whose shares bracket ``target``. Returns the curve (sorted by
    value) and the point whose share is closest to the target (ties: the more accurate)."""
    points: dict[float, Point] = {}

    async def at(value: float) -> Point:
        if value not in points:
            points[value] = await measure(build(value), problems, value=value, concurrency=concurrency)
            if on_point is not None:
                on_point(points[value])
        return points[value]

    for value in grid:
        await at(value)
    for _ in range(refine):
        curve = sorted(points.values(), key=lambda p: p.value)
        bracket = next(
            (
                (a, b)
                for a, b in pairwise(curve)
                if min(a.share, b.share) <= target <= max(a.share, b.share) and a.share != b.share
            ),
            None,
        )
        if bracket is None:
            break
        low, high = bracket
        mid = (low.value + high.value) / 2
        if integer:
            mid = float(round(mid))
            if mid in (low.value, high.value):
                break
        await at(mid)
    curve = sorted(points.values(), key=lambda p: p.value)
    chosen = min(curve, key=lambda p: (abs(p.share - target), -p.accuracy))
    return curve, chosen


# --------------------------------------------------------------------------- the config file

_TABLE_RE = re.compile(r"^\s*\[\s*policy\s*\]\s*(#.*)?$")
_ANY_TABLE_RE = re.compile(r"^\s*\[")
_TOP_KEY_RE = re.compile(r"^\s*policy\s*=")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        raise ValueError("TOML has no null")
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def policy_table(policy: Policy) -> str:
    """The ``[policy]`` table of ``policy`` (settings left at ``None`` are omitted)."""
    lines = ["[policy]"]
    for key, value in policy.model_dump().items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_policy(path: Path, policy: Policy) -> None:
    """Put ``policy`` into the TOML file at ``path`` (created if missing): an existing
    ``policy = ...`` key or ``[policy]`` table is replaced, everything else is kept as written."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept: list[str] = []
    in_policy = in_tables = False
    for line in lines:
        if _ANY_TABLE_RE.match(line):
            in_tables = True
            in_policy = bool(_TABLE_RE.match(line))
        if in_policy or (not in_tables and _TOP_KEY_RE.match(line)):
            continue
        kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    text = "\n".join(kept) + ("\n\n" if kept else "") + policy_table(policy)
    tomllib.loads(text)  # never leave a file that does not parse
    path.write_text(text)


def confidence_builder(config: RelayConfig) -> Callable[[float], RelayConfig]:
    """Configs that differ only in the confidence threshold (other confidence settings kept)."""
    base = config.policy if isinstance(config.policy, ConfidencePolicy) else ConfidencePolicy()

    def build(threshold: float) -> RelayConfig:
        return config.model_copy(update={"policy": base.model_copy(update={"threshold": threshold})})

    return build
