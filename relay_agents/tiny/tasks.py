"""A seeded synthetic maths task family for the tiny relay world.

Each problem is one HARD step followed by several EASY steps::

    Compute 47*6 + 5 + 1 - 3.

The reference solution writes one step per line, left to right::

    47*6 = 282
    282 + 5 = 287
    287 + 1 = 288
    288 - 3 = 285
    \\boxed{285}

* HARD step: a 2-digit by 1-digit multiplication whose product has three digits (A in
  12..99, B in 3..9: 564 products). The teacher is trained on its results; the student
  never is (its loss is masked there). The table is large enough that a model of the
  student's size and budget trained on full solutions gets few of them right (the
  "student alone" baseline), while the teacher learns them.
* EASY steps: add or subtract a single digit without carry or borrow. The student
  learns them (it copies the previous result and adjusts the last digit).

The student's cold-start solution asks the teacher for the hard result::

    47*6 =<call>4</call> 282
    282 + 5 = 287
    ...

``N`` is the number of tokens the teacher needs to write `` 282`` in the shared
tokenizer (a space plus one token per digit, digits are split), so after exactly
``N`` teacher tokens the student resumes with the newline. The teacher continues
from the relay protocol's teacher view (commands replaced by a space, then
stripped): ``... 47*6 =`` and writes `` 282``; the shared tokenizer collapses
runs of spaces so that earlier answered calls (``=  282``) look like the teacher's
own training text.

Pure Python, no third-party imports.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

TASK_VERSION = 1
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CALL_OPEN = "<call>"
CALL_CLOSE = "</call>"

#: seed offsets that keep training and evaluation streams apart
TRAIN_SEED_BASE = 1_000_003
EVAL_SEED_BASE = 7_000_001
DEFAULT_EVAL_SEED = 0


@dataclass(frozen=True)
class Step:
    """One line ``lhs = result``; ``hard`` steps are the teacher's."""

    lhs: str
    result: int
    hard: bool

    @property
    def line(self) -> str:
        return f"{self.lhs} = {self.result}"


@dataclass(frozen=True)
class Problem:
    question: str
    """The bare question (without the instruction), e.g. ``Compute 47*6 + 5 + 1 - 3.``"""
    answer: int
    steps: tuple[Step, ...]

    @property
    def gold(self) -> str:
        return str(self.answer)

    @property
    def user_message(self) -> str:
        return user_message(self.question)


@dataclass(frozen=True)
class Segment:
    """A piece of a solution and who writes it: ``student``, ``teacher`` or ``call``."""

    text: str
    role: str


def user_message(question: str) -> str:
    """The user turn: the question, then the instruction on its own line."""
    return f"{question}\n{INSTRUCTION}"


#: hard steps: A*B with A in A_RANGE, B in B_RANGE and a three-digit product (564 of them)
A_RANGE = (12, 99)
B_RANGE = (3, 9)
N_EASY = (3, 4)


def draw_factors(rng: random.Random) -> tuple[int, int]:
    """The hard step's factors: A in :data:`A_RANGE`, B in :data:`B_RANGE`, a three-digit product."""
    while True:
        a = rng.randint(*A_RANGE)
        b = rng.randint(*B_RANGE)
        if 100 <= a * b <= 999:
            return a, b


def make_problem(
    rng: random.Random,
    *,
    n_easy: tuple[int, int] = N_EASY,
    factors: Callable[[random.Random], tuple[int, int]] = draw_factors,
) -> Problem:
    """Draw one problem from ``rng``; ``factors`` draws the hard step (a task variant's own mix).

    Easy steps add or subtract one digit without a carry or borrow (only the last digit
    of the running total changes), so a small model learns them quickly.
    """
    a, b = factors(rng)
    total = a * b
    steps = [Step(f"{a}*{b}", total, hard=True)]
    terms = [f"{a}*{b}"]
    for _ in range(rng.randint(*n_easy)):
        units = total % 10
        options = [("+", d) for d in range(1, 10 - units)] + [("-", d) for d in range(1, units + 1)]
        op, d = rng.choice(options)
        new = total + d if op == "+" else total - d
        steps.append(Step(f"{total} {op} {d}", new, hard=False))
        terms.append(f"{op} {d}")
        total = new
    question = "Compute " + " ".join(terms) + "."
    return Problem(question=question, answer=total, steps=tuple(steps))


def _stream(base: int, seed: int) -> Iterator[Problem]:
    rng = random.Random(base * 1_000_003 + seed)
    while True:
        yield make_problem(rng)


class _Asked(Protocol):
    question: str


AskedT = TypeVar("AskedT", bound=_Asked)


def distinct_problems(stream: Iterator[AskedT], n: int) -> list[AskedT]:
    """The first ``n`` problems of ``stream`` with distinct questions (a held-out set)."""
    out: list[AskedT] = []
    seen: set[str] = set()
    for p in stream:
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def problems_outside(stream: Iterator[AskedT], n: int, reserved: frozenset[str]) -> list[AskedT]:
    """The first ``n`` problems of ``stream`` (repeats allowed) whose question is not reserved."""
    out: list[AskedT] = []
    for p in stream:
        if p.question not in reserved:
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def eval_problems(n: int = 200, seed: int = DEFAULT_EVAL_SEED) -> list[Problem]:
    """A held-out evaluation set: ``n`` distinct problems from the evaluation stream."""
    return distinct_problems(_stream(EVAL_SEED_BASE, seed), n)


#: training never uses a question from the first this-many problems of eval seeds 0..2
EVAL_RESERVE = 2000


def reserved_eval_questions() -> frozenset[str]:
    qs: set[str] = set()
    for s in range(3):
        qs.update(p.question for p in eval_problems(EVAL_RESERVE, seed=s))
    return frozenset(qs)


def train_problems(n: int, seed: int = 0) -> list[Problem]:
    """``n`` training problems, disjoint from :func:`eval_problems` (seeds 0..2, first 2000)."""
    return problems_outside(_stream(TRAIN_SEED_BASE, seed), n, reserved_eval_questions())


def default_call_tokens(result_text: str) -> int:
    """Tokens of ``result_text`` in the shared tokenizer: one per space and per digit."""
    return sum(1 for ch in result_text if ch.isdigit() or ch == " ")


def teacher_segments(problem: Problem) -> list[Segment]:
    """The teacher's full solution (all written by the teacher)."""
    return [Segment(teacher_solution(problem), "teacher")]


def teacher_solution(problem: Problem) -> str:
    """The full reference solution as the teacher writes it."""
    lines = [s.line for s in problem.steps]
    lines.append(f"\\boxed{{{problem.answer}}}")
    return "\n".join(lines)


def student_segments(problem: Problem, count_tokens: Callable[[str], int] | None = None) -> list[Segment]:
    """The student's cold-start solution as segments.

    ``student`` segments (and the ``call`` commands) are the student's own tokens;
    ``teacher`` segments are the teacher's results (the student is not trained on them).
    ``count_tokens`` counts the tokens of a teacher segment in the shared tokenizer
    (default: :func:`default_call_tokens`, which matches the tiny tokenizer).
    """
    count = count_tokens or default_call_tokens
    segs: list[Segment] = []
    pending = ""
    for i, step in enumerate(problem.steps):
        sep = "\n" if i else ""
        if step.hard:
            result = f" {step.result}"
            segs.append(Segment(pending + sep + f"{step.lhs} =", "student"))
            segs.append(Segment(f"{CALL_OPEN}{count(result)}{CALL_CLOSE}", "call"))
            segs.append(Segment(result, "teacher"))
            pending = ""
        else:
            pending += sep + step.line
    pending += f"\n\\boxed{{{problem.answer}}}"
    segs.append(Segment(pending, "student"))
    return segs


def student_solution(problem: Problem, count_tokens: Callable[[str], int] | None = None) -> str:
    """The student's cold-start SFT solution with ``<call>N</call>`` before each hard result."""
    return "".join(s.text for s in student_segments(problem, count_tokens))


def teacher_token_share(problem: Problem, count_tokens: Callable[[str], int]) -> float:
    """Share of the answer tokens that the teacher writes in the reference relay."""
    segs = student_segments(problem, count_tokens)
    teacher = sum(count_tokens(s.text) for s in segs if s.role == "teacher")
    total = sum(count_tokens(s.text) for s in segs)
    return teacher / total


_BOXED_RE = re.compile(r"\\boxed\{")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or ``None``."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


def _normalise(ans: str) -> str:
    ans = ans.strip().strip("$").replace(",", "").replace(" ", "")
    try:
        value = float(ans)
    except ValueError:
        return ans
    return str(int(value)) if value == int(value) else str(value)


def is_correct(text: str, gold: str | int) -> bool:
    """Whether the last ``\\boxed{}`` in ``text`` equals ``gold`` (numerically if possible)."""
    got = extract_boxed(text)
    return got is not None and _normalise(got) == _normalise(str(gold))
