"""Metrics of a setting's results, and the query-level random router computed from the
student-alone and teacher-alone results."""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

Line = Mapping[str, Any]


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def setting_metrics(lines: Sequence[Line]) -> dict[str, Any]:
    """Accuracy (mean over every item and sample), pass@K (an item counts when any of its K
    samples is correct), the teacher's share of the answer tokens (pooled), teacher calls per
    answer, cost, latency percentiles, malformed commands and teacher failures; with a judge, the
    failures it accepted and the accuracy they would make (``accuracy`` stays the rules')."""
    by_item: dict[str, list[bool]] = defaultdict(list)
    for line in lines:
        by_item[line["id"]].append(bool(line["correct"]))
    student = sum(line["student_tokens"] for line in lines)
    teacher = sum(line["teacher_tokens"] for line in lines)
    n = len(lines)
    latencies = [line["latency_s"] for line in lines if line["error"] is None]
    row = {
        "n": n,
        "items": len(by_item),
        "accuracy": sum(line["correct"] for line in lines) / n if n else 0.0,
        "pass_at_k": sum(any(v) for v in by_item.values()) / len(by_item) if by_item else 0.0,
        "teacher_share": teacher / (student + teacher) if student + teacher else 0.0,
        "student_tokens": student,
        "teacher_tokens": teacher,
        "teacher_calls_per_answer": sum(line["teacher_calls"] for line in lines) / n if n else 0.0,
        "cost_usd": sum(line["cost_usd"] for line in lines),
        "latency_p50_s": _quantile(latencies, 0.50),
        "latency_p99_s": _quantile(latencies, 0.99),
        "malformed_commands": sum(line["malformed"] for line in lines),
        "teacher_failures": sum(line["teacher_failures"] for line in lines),
        "errors": sum(line["error"] is not None for line in lines),
    }
    return (row | _rechecked(lines)) if any("recheck" in line for line in lines) else row


def _rechecked(lines: Sequence[Line]) -> dict[str, Any]:
    """The judge's column: failures it accepted, failures it could not decide (an unclear reply,
    a failed request, or an answer that errored), and accuracy counting the accepted ones."""
    failed = [line for line in lines if not line["correct"]]
    accepted = sum(line.get("recheck") is True for line in failed)
    return {
        "recheck_accepted": accepted,
        "recheck_undecided": sum(line.get("recheck") is None for line in failed),
        "accuracy_rechecked": (len(lines) - len(failed) + accepted) / len(lines),
    }


def router_share(student: Mapping[str, Any], teacher: Mapping[str, Any], p: float) -> float:
    """The expected teacher-token share of a router sending a fraction ``p`` of the questions to
    the teacher alone: ``p*T / (p*(T+t) + (1-p)*S)``, with ``T``, ``t`` the teacher row's teacher
    and student tokens and ``S`` all the student row's tokens."""
    teacher_tokens = p * teacher["teacher_tokens"]
    total = p * (teacher["teacher_tokens"] + teacher["student_tokens"]) + (1 - p) * (
        student["student_tokens"] + student["teacher_tokens"]
    )
    return teacher_tokens / total if total else 0.0


def router_accuracy(student: Mapping[str, Any], teacher: Mapping[str, Any], p: float) -> float:
    """The expected accuracy of that router: linear in ``p``."""
    return (1 - p) * student["accuracy"] + p * teacher["accuracy"]


class Router:
    """A query-level random router between the student alone and the teacher alone: each
    question goes to the teacher with probability ``p`` (see :func:`router_share`)."""

    def __init__(self, student: Sequence[Line], teacher: Sequence[Line]) -> None:
        self.student = setting_metrics(student)
        self.teacher = setting_metrics(teacher)
        self._student_items = _per_item(student)
        self._teacher_items = _per_item(teacher)

    def share(self, p: float) -> float:
        return router_share(self.student, self.teacher, p)

    def accuracy(self, p: float) -> float:
        return router_accuracy(self.student, self.teacher, p)

    def p_at_share(self, share: float) -> float:
        """The teacher fraction whose expected share is ``share`` (solved from :meth:`share`)."""
        s, t = self.student, self.teacher
        a = t["teacher_tokens"]
        b = t["teacher_tokens"] + t["student_tokens"]
        c = s["student_tokens"] + s["teacher_tokens"]
        denominator = a - share * b + share * c
        return _clip(share * c / denominator) if denominator else 1.0

    def p_at_accuracy(self, accuracy: float) -> float:
        low, high = self.student["accuracy"], self.teacher["accuracy"]
        if high == low:
            return 0.0 if accuracy <= low else 1.0
        return _clip((accuracy - low) / (high - low))

    def row(self, p: float, seed: int) -> dict[str, Any]:
        """The router's metrics at ``p``: the expected values, and one seeded draw (which
        ``round(p * items)`` questions go to the teacher) measured on the per-item results."""
        s, t = self.student, self.teacher
        items = sorted(set(self._student_items) & set(self._teacher_items))
        to_teacher = set(random.Random(seed).sample(items, round(p * len(items))))
        drawn = [
            line
            for item in items
            for line in (self._teacher_items if item in to_teacher else self._student_items)[item]
        ]
        draw = setting_metrics(drawn)
        return {
            "p_teacher": p,
            "n": s["n"],
            "items": len(items),
            "accuracy": self.accuracy(p),
            "teacher_share": self.share(p),
            "teacher_calls_per_answer": p * t["teacher_calls_per_answer"]
            + (1 - p) * s["teacher_calls_per_answer"],
            "cost_usd": p * t["cost_usd"] + (1 - p) * s["cost_usd"],
            "draw": {
                "seed": seed,
                "accuracy": draw["accuracy"],
                "teacher_share": draw["teacher_share"],
                "cost_usd": draw["cost_usd"],
            },
        }


def _per_item(lines: Sequence[Line]) -> dict[str, list[Line]]:
    out: dict[str, list[Line]] = defaultdict(list)
    for line in lines:
        out[line["id"]].append(line)
    return out


def _clip(p: float) -> float:
    return min(max(p, 0.0), 1.0)


#: The metrics averaged over data sets (each set weighs the same, as the published tables do).
AVERAGED = (
    "accuracy",
    "pass_at_k",
    "teacher_share",
    "teacher_calls_per_answer",
    "cost_usd",
    "latency_p50_s",
    "latency_p99_s",
    "accuracy_rechecked",
)


def average(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A setting's metrics averaged over data sets; counts are summed."""
    out: dict[str, Any] = {}
    for key in AVERAGED:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    for key in (
        "n",
        "malformed_commands",
        "teacher_failures",
        "errors",
        "recheck_accepted",
        "recheck_undecided",
    ):
        if any(key in r for r in rows):
            out[key] = sum(r.get(key, 0) for r in rows)
    return out
