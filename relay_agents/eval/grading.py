"""Rule-based grading: math-verify for maths (gold parsed first), letters for multiple choice.

math-verify bounds its parsing and comparison with ``SIGALRM``, which only works on a
process's main thread, so answers are graded in a pool of worker *processes* (each task runs
on its worker's main thread), never in threads.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from relay_agents.eval.data import LETTERS, Problem
from relay_agents.tiny.tasks import extract_boxed

#: Seconds math-verify may spend parsing or comparing one answer (its own SIGALRM timer).
GRADE_TIMEOUT_S = 5


@dataclass(frozen=True)
class Grade:
    extracted: str | None
    correct: bool


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\(?\**\s*([A-Z])\b", re.IGNORECASE)
_LONE_LETTER = re.compile(r"(?:^|[\s(*])([A-Z])(?:[).:*]|$|\s)")


def extract_letter(text: str, options: int) -> str | None:
    """The chosen option's letter: a ``\\boxed{}`` letter, else "the answer is (X)" / "Answer: X",
    else the last lone capital letter in range."""
    allowed = LETTERS[:options]
    boxed = extract_boxed(text)
    if boxed is not None:
        letter = boxed.strip().strip("()").replace("\\text{", "").rstrip("}")[:1].upper()
        if letter and letter in allowed:
            return letter
    said = [m for m in _ANSWER_IS.findall(text) if m.upper() in allowed]
    if said:
        return said[-1].upper()
    lone = [m for m in _LONE_LETTER.findall(text) if m in allowed]
    return lone[-1] if lone else None


def _gold_latex(gold: str) -> str:
    """Gold answers are written bare (``\\frac{1}{2}``, ``72``); math-verify finds LaTeX by its
    delimiters, so the gold is put in a ``\\boxed{}`` unless it has delimiters of its own."""
    if "$" in gold or "\\boxed" in gold or "\\(" in gold or "\\[" in gold:
        return gold
    return f"\\boxed{{{gold}}}"


def grade_maths(text: str, gold: str, timeout_s: int = GRADE_TIMEOUT_S) -> Grade:
    """Whether ``text``'s final answer equals ``gold`` by math-verify (the gold is parsed first,
    as math-verify's documentation asks: its parse decides what the answer is compared as).

    The answer is the last ``\\boxed{}`` when there is one; otherwise only an anchored one
    ("the final answer is ...") counts: math-verify's unanchored search would take a bare
    ``7*8 =`` for 56.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = parse(_gold_latex(gold), parsing_timeout=timeout_s)
    if not gold_parsed:
        gold_parsed = parse(gold, parsing_timeout=timeout_s)
    extracted = extract_boxed(text)
    if extracted is not None:
        answer = parse(f"\\boxed{{{extracted}}}", parsing_timeout=timeout_s)
    else:
        anchored = [
            LatexExtractionConfig(try_extract_without_anchor=False),
            ExprExtractionConfig(try_extract_without_anchor=False),
        ]
        answer = parse(text, extraction_config=anchored, parsing_timeout=timeout_s)
        extracted = str(answer[-1]) if answer else None
    if not gold_parsed or not answer:
        return Grade(extracted, False)
    return Grade(extracted, bool(verify(gold_parsed, answer, timeout_seconds=timeout_s)))


def grade(text: str, problem: Problem, timeout_s: int = GRADE_TIMEOUT_S) -> Grade:
    """Grade one answer: letters for multiple choice, math-verify otherwise."""
    if problem.choices:
        letter = extract_letter(text, len(problem.choices))
        return Grade(letter, letter is not None and letter == problem.answer.strip().upper())
    return grade_maths(text, problem.answer, timeout_s)


class Grader:
    """Grades answers in a pool of worker processes (see the module's docstring).

    A worker's task that outlives ``timeout_s`` twice over (math-verify's own timer failed to
    fire, e.g. inside C code) is recorded as not correct, with the reason, and the run goes on.
    """

    def __init__(self, workers: int = 2, timeout_s: int = GRADE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    async def grade(self, text: str, problem: Problem) -> Grade:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, grade, text, problem, self.timeout_s)
        try:
            return await asyncio.wait_for(future, 2 * self.timeout_s + 30)
        except TimeoutError:
            return Grade("grading timed out", False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
