"""The evaluation harness (``relay-agents eval``): does the relay pay off on *your* data?

Every setting (the relay, the student alone, the teacher alone, the relay with calls blocked,
token-level policies and a query-level random router at the relay's cost) answers the same
problems on the configured endpoints; the results, a summary, a report with every pinned
setting and an accuracy/teacher-share plot go to one output folder, and a rerun resumes it.
"""

from __future__ import annotations

from relay_agents.eval.data import (
    PUBLISHED,
    DataError,
    Dataset,
    Problem,
    load_data,
    load_jsonl,
    load_published,
    load_reasoning_gym,
    load_tiny,
)
from relay_agents.eval.grading import Grade, Grader, extract_letter, grade, grade_maths
from relay_agents.eval.run import EvalOptions, Progress, pinned_settings, run_eval
from relay_agents.eval.settings import SETTINGS, parse_settings
from relay_agents.eval.store import RunMismatch

__all__ = [
    "PUBLISHED",
    "SETTINGS",
    "DataError",
    "Dataset",
    "EvalOptions",
    "Grade",
    "Grader",
    "Problem",
    "Progress",
    "RunMismatch",
    "extract_letter",
    "grade",
    "grade_maths",
    "load_data",
    "load_jsonl",
    "load_published",
    "load_reasoning_gym",
    "load_tiny",
    "parse_settings",
    "pinned_settings",
    "run_eval",
]
