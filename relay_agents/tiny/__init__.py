"""The tiny relay world: a synthetic maths task family and trained tiny student/teacher models.

* :mod:`relay_agents.tiny.tasks` — problems, reference/teacher/student solutions, grader
  (pure Python).
* :mod:`relay_agents.tiny.tokenizer` — the shared byte-level BPE tokenizer (``tokenizers``).
* :mod:`relay_agents.tiny.build` — ``build_tiny_pair()`` gives the models shipped with the
  package, or trains and caches them: teacher, relay student and the solo student (the
  student's size, trained without relay) (training needs ``torch`` + ``transformers``, the
  ``cpu`` extra).
* :mod:`relay_agents.tiny.evaluate` — the paper's table in miniature through the relay
  engine (``benchmarks/tiny_world.py``).
* :mod:`relay_agents.tiny.servers` — the pair (and the solo student) served by vLLM
  (``tiny_pair_servers()``).
* :mod:`relay_agents.tiny.tool_world` — the tool variant: a student that calls a ``multiply``
  tool (Hermes format) for one step and the teacher for another, its teacher, shipped
  (``tool_world_servers()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .tasks import (
    INSTRUCTION,
    Problem,
    eval_problems,
    extract_boxed,
    is_correct,
    student_solution,
    teacher_solution,
    train_problems,
)

if TYPE_CHECKING:
    from .build import DEFAULT_RECIPE, Recipe, TinyPair, build_tiny_pair

__all__ = [
    "DEFAULT_RECIPE",
    "INSTRUCTION",
    "Problem",
    "Recipe",
    "TinyPair",
    "build_tiny_pair",
    "eval_problems",
    "extract_boxed",
    "is_correct",
    "student_solution",
    "teacher_solution",
    "train_problems",
]


def __getattr__(name: str) -> Any:  # lazy: torch is only imported when building
    if name in {"DEFAULT_RECIPE", "Recipe", "TinyPair", "build_tiny_pair"}:
        from . import build

        return getattr(build, name)
    raise AttributeError(name)
