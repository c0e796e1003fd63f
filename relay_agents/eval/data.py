"""Evaluation problems: JSON Lines files, reasoning-gym's procedural sets, the tiny world's
held-out problems, and the published sets through ``datasets`` at pinned revisions.

Every source gives the same :class:`Problem` list and a hash of what was loaded, which the
harness pins: a rerun over changed data is refused instead of mixed with the old results.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A data source that cannot be read or does not hold problems."""


@dataclass(frozen=True)
class Problem:
    """One question, its gold answer (maths: text or LaTeX; multiple choice: a letter) and,
    for multiple choice, the options in letter order."""

    id: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        """The question as the model sees it: multiple-choice options are listed under it."""
        if not self.choices:
            return self.question
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n\n{options}\n\nAnswer with the letter of the correct option."


@dataclass(frozen=True)
class Dataset:
    """A loaded data set: its name, its problems and the hash pinned with the results."""

    name: str
    problems: tuple[Problem, ...]
    sha256: str
    source: str


@dataclass(frozen=True)
class PublishedSet:
    """Where a published set lives on the hub and which columns hold what (first present wins)."""

    path: str
    split: str
    config: str | None = None
    revision: str | None = None
    question: tuple[str, ...] = ("problem", "question", "input")
    answer: tuple[str, ...] = ("answer", "final_answer", "target")
    choices: tuple[str, ...] = ("options", "choices")
    id: tuple[str, ...] = ("unique_id", "id", "question_id")


#: The published evaluation sets. ``revision`` is the commit a run is pinned to; a set without
#: one here must be named with its commit, ``NAME@REVISION``, so no run floats on a branch.
PUBLISHED: dict[str, PublishedSet] = {
    "math500": PublishedSet(
        "HuggingFaceH4/MATH-500", "test", revision="6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be"
    ),
    "gsm8k": PublishedSet("openai/gsm8k", "test", config="main"),
    "minerva": PublishedSet("math-ai/minervamath", "test"),
    "olympiadbench": PublishedSet("math-ai/olympiadbench", "test"),
    "aime24": PublishedSet("math-ai/aime24", "test"),
    "aime25": PublishedSet("math-ai/aime25", "test"),
    "mmlu-pro": PublishedSet("TIGER-Lab/MMLU-Pro", "test"),
    "bbh": PublishedSet("lukaemon/bbh", "test"),
}


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K solution (after ``####``), thousands separators dropped."""
    if "####" not in answer:
        return answer.strip()
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def _hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_problems(problems: Iterable[Problem]) -> str:
    rows = [asdict(p) for p in problems]
    return _hash_bytes(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode())


def _unique(name: str, problems: Sequence[Problem]) -> tuple[Problem, ...]:
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise DataError(f"{name}: the id {p.id!r} appears twice")
        seen.add(p.id)
    if not problems:
        raise DataError(f"{name}: no problems")
    return tuple(problems)


def _choices(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or len(value) > len(LETTERS):
        raise DataError(f"choices must be a list of at most {len(LETTERS)} options")
    return tuple(str(c) for c in value)


def _answer(value: Any, choices: tuple[str, ...]) -> str:
    """The gold as text: a GSM8K ``####`` solution is cut to its answer; a multiple-choice
    answer given as an index is turned into its letter."""
    if isinstance(value, list):  # OlympiadBench keeps its final answers in a list
        value = value[0] if len(value) == 1 else ", ".join(str(v) for v in value)
    if choices and isinstance(value, int):
        return LETTERS[value]
    return gsm8k_gold(str(value))


def problem_from_row(row: Mapping[str, Any], number: int, spec: PublishedSet | None = None) -> Problem:
    """A problem from a JSON object (``question``, ``answer``, optional ``id`` and ``choices``)
    or from a published set's row (its own column names)."""
    spec = spec or PublishedSet(path="", split="", question=("question",), answer=("answer",))

    def first(keys: tuple[str, ...]) -> Any:
        return next((row[k] for k in keys if k in row and row[k] is not None), None)

    question, answer = first(spec.question), first(spec.answer)
    if not isinstance(question, str) or answer is None:
        wanted = f"{'/'.join(spec.question)} and {'/'.join(spec.answer)}"
        raise DataError(f"row {number}: need {wanted}")
    choices = _choices(first(spec.choices))
    found_id = first(spec.id)
    return Problem(
        id=str(found_id) if found_id is not None else str(number),
        question=question,
        answer=_answer(answer, choices),
        choices=choices,
    )


def load_jsonl(path: str | Path) -> Dataset:
    """One problem a line: ``{"id"?, "question", "answer", "choices"?}``; ids default to the line
    number."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror}") from None
    problems = []
    for number, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: need a JSON object")
        try:
            problems.append(problem_from_row(row, number))
        except DataError as exc:
            raise DataError(f"{path}:{number}: {exc}") from None
    return Dataset(path.stem, _unique(str(path), problems), _hash_bytes(data), str(path))


def load_reasoning_gym(task: str, *, size: int = 200, seed: int = 0) -> Dataset:
    """``size`` problems of reasoning-gym's procedural ``task`` (e.g. ``gsm_symbolic``), drawn
    with ``seed`` on this machine: real models can be evaluated with no hub."""
    import reasoning_gym

    try:
        generated = reasoning_gym.create_dataset(task, size=size, seed=seed)
    except (KeyError, ValueError) as exc:
        raise DataError(f"reasoning-gym:{task}: {exc}") from None
    problems = [
        Problem(id=str(i), question=str(entry["question"]), answer=str(entry["answer"]))
        for i, entry in enumerate(generated)
    ]
    return Dataset(
        f"reasoning-gym:{task}", _unique(task, problems), _hash_problems(problems), f"reasoning-gym {seed=}"
    )


def load_tiny(n: int = 200, seed: int = 0) -> Dataset:
    """The tiny world's held-out problems (never seen in its training)."""
    from relay_agents.tiny import tasks

    problems = [
        Problem(id=str(i), question=p.question, answer=p.gold)
        for i, p in enumerate(tasks.eval_problems(n, seed))
    ]
    return Dataset("tiny", tuple(problems), _hash_problems(problems), f"tiny held-out {seed=}")


def load_published(
    name: str, revision: str | None = None, *, data_files: str | Path | None = None
) -> Dataset:
    """A published set by name at a pinned revision, through ``datasets`` (needs the hub).

    ``data_files`` loads a local copy (JSON Lines or Parquet, the hub's own columns) with the
    same column mapping instead: how it is tested with no hub.
    """
    import datasets

    base, _, config = name.partition("/")  # bbh/TASK: one of BIG-Bench Hard's tasks
    if base not in PUBLISHED:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(PUBLISHED)}")
    spec = PUBLISHED[base]
    revision = revision or spec.revision
    if data_files is not None:
        builder = "parquet" if str(data_files).endswith(".parquet") else "json"
        rows = datasets.load_dataset(builder, data_files=str(data_files), split="train")
    elif revision is None:
        raise DataError(f"{name} has no pinned revision here: name it with its commit, {name}@REVISION")
    else:
        rows = datasets.load_dataset(spec.path, config or spec.config, split=spec.split, revision=revision)
    problems = [problem_from_row(row, i, spec) for i, row in enumerate(rows)]
    source = str(data_files) if data_files is not None else f"{spec.path}@{revision}"
    return Dataset(name, _unique(name, problems), _hash_problems(problems), source)


_RG = re.compile(r"^reasoning-gym:(?P<task>[\w-]+)$")


def load_data(spec: str, *, size: int = 200, seed: int = 0) -> Dataset:
    """A data set from its command-line name: ``tiny``, ``reasoning-gym:TASK``, a published
    set's name (``math500``, ``gsm8k@REVISION``, ``bbh/TASK@REVISION``), or a JSON Lines file.
    ``size`` and ``seed`` apply to the generated sets."""
    if spec == "tiny":
        return load_tiny(size, seed)
    if match := _RG.match(spec):
        return load_reasoning_gym(match["task"], size=size, seed=seed)
    name, _, revision = spec.partition("@")
    if name.partition("/")[0] in PUBLISHED and not Path(spec).exists():
        return load_published(name, revision or None)
    return load_jsonl(spec)
