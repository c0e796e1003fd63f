"""The small-factor variant of the tiny world: a student that *can* do part of the hard steps.

The default tiny student never learns a product (its loss is masked on every hard result), so
it must call on every problem and the teacher share is fixed by the task. Here half of the
hard steps have the small factor 3 (``A*3``, A in 34..99: 66 products), the rest B in 4..9 as
in the default task. The student knows the 66 small-factor products from part of its SFT data
(full solutions written alone, standing for what a pretrained student knows) and none of the
other 498; its cold-start data puts ``<call>4</call>`` before EVERY hard result. Decoding
greedily, the SFT student therefore calls on every hard step, also where it could go alone:
what GRPO with the difficulty-aware reward should cut (docs/training.md). The teacher is the
default recipe's (it learned all 564 products), so the variant needs no teacher of its own.

The SFT student ships in ``small_factor_weights/`` (the model directory and a
``manifest.json`` with the recipe, its hash and every file's SHA-256), like the default
recipe's weights: ``python -m relay_agents.tiny.small_factor ship`` retrains and ships it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relay_agents.cache import MANIFEST, verify_manifest, write_manifest

from . import tasks
from .build import MODEL_FILES
from .tokenizer import load_tokenizer, render_chat

#: the factor whose products the student learns
SMALL_FACTOR = 3
#: share of problems whose hard step has the small factor
SMALL_SHARE = 0.5
VARIANT_VERSION = 1
SHIPPED_DIR = Path(__file__).with_name("small_factor_weights")
_TRAIN_SEED_BASE = 3_000_017
_EVAL_SEED_BASE = 5_000_011
#: training never uses a question from the first this-many evaluation problems
EVAL_RESERVE = 2000


def draw_factors(rng: random.Random) -> tuple[int, int]:
    """Half the hard steps ``A*3`` (three-digit product), the rest the default task's B in 4..9."""
    if rng.random() < SMALL_SHARE:
        return rng.randint(-(-100 // SMALL_FACTOR), tasks.A_RANGE[1]), SMALL_FACTOR
    while True:
        a, b = tasks.draw_factors(rng)
        if b != SMALL_FACTOR:
            return a, b


def solvable_alone(problem: tasks.Problem) -> bool:
    """Whether the problem's hard step has the small factor (the student's own products)."""
    hard = next(s for s in problem.steps if s.hard)
    return hard.lhs.endswith(f"*{SMALL_FACTOR}")


def _stream(base: int, seed: int) -> Iterator[tasks.Problem]:
    rng = random.Random(base * 1_000_003 + seed)
    while True:
        yield tasks.make_problem(rng, factors=draw_factors)


def eval_problems(n: int = 200, seed: int = 0) -> list[tasks.Problem]:
    """``n`` distinct held-out problems of the variant."""
    return tasks.distinct_problems(_stream(_EVAL_SEED_BASE, seed), n)


def train_problems(n: int, seed: int = 0) -> list[tasks.Problem]:
    """``n`` training problems (repeats allowed), none among the first evaluation problems."""
    reserved = frozenset(p.question for p in eval_problems(EVAL_RESERVE))
    return tasks.problems_outside(_stream(_TRAIN_SEED_BASE, seed), n, reserved)


@dataclasses.dataclass(frozen=True)
class StudentRecipe:
    """The SFT student: the default student's size and optimiser, one training run.

    ``alone_share`` of the small-factor problems are full solutions written without a call,
    their product in the loss: what a real student knows before its cold start (a pretrained
    model solves part of the problems alone). Every other example is the cold-start relay
    solution, a call before the hard result and the result masked.
    """

    hidden_size: int = 48
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 3
    num_key_value_heads: int = 1
    head_dim: int = 32
    steps: int = 1600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30
    n_train: int = 16000
    seed: int = 2
    weight_decay: float = 0.01
    alone_share: float = 0.3
    versions: tuple[int, int, int] = (VARIANT_VERSION, tasks.TASK_VERSION, SMALL_FACTOR)

    def digest(self, teacher_digest: str) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "teacher": teacher_digest}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def model_recipe(self) -> Any:
        """The :class:`~relay_agents.tiny.build.ModelRecipe` that trains it."""
        from .build import ModelRecipe

        fields = {f.name for f in dataclasses.fields(ModelRecipe)}
        return ModelRecipe(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


RECIPE = StudentRecipe()


def example(tok, problem: tasks.Problem, *, call: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt masked). ``call``: the cold-start relay solution, a call
    before the hard result, the result masked; else the full solution, all in the loss."""
    count = lambda text: len(tok.encode(text).ids)  # noqa: E731
    prompt = render_chat([{"role": "user", "content": problem.user_message}])
    ids = list(tok.encode(prompt).ids)
    labels = [-100] * len(ids)
    for seg in tasks.student_segments(problem, count):
        if seg.role == "call" and not call:
            continue
        seg_ids = tok.encode(seg.text).ids
        ids += seg_ids
        labels += [-100] * len(seg_ids) if call and seg.role == "teacher" else list(seg_ids)
    eos = tok.token_to_id("<|im_end|>")
    return [*ids, eos], [*labels, eos]


def examples(tok, problems: list[tasks.Problem], recipe: StudentRecipe) -> list[tuple[list[int], list[int]]]:
    """The SFT mix: ``alone_share`` of the small-factor problems solved alone, the rest cold start."""
    rng = random.Random(recipe.seed)
    return [
        example(tok, p, call=not (solvable_alone(p) and rng.random() < recipe.alone_share)) for p in problems
    ]


def teacher_dir() -> Path:
    """The default recipe's teacher (shipped, cached or trained)."""
    from .build import build_tiny_pair

    return build_tiny_pair().teacher_dir


def _default_digest() -> str:
    from .build import DEFAULT_RECIPE

    return DEFAULT_RECIPE.digest()


def shipped_student() -> Path | None:
    """The shipped SFT student, if its manifest names this recipe and every file verifies."""
    keys = {"recipe_hash": RECIPE.digest(_default_digest())}
    files = [f"student/{f}" for f in MODEL_FILES]
    return SHIPPED_DIR / "student" if verify_manifest(SHIPPED_DIR, keys, files) else None


def train_student(dest: Path = SHIPPED_DIR, recipe: StudentRecipe = RECIPE) -> Path:
    """Train the SFT student with the default teacher's tokenizer and write it, sealed by its
    manifest, to ``dest``/student."""
    from .build import DEFAULT_RECIPE, train_model

    tok = load_tokenizer(teacher_dir())
    data = examples(tok, train_problems(recipe.n_train, seed=recipe.seed), recipe)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        t0 = time.monotonic()
        stats = train_model(recipe.model_recipe(), tok, DEFAULT_RECIPE, data, tmp / "student", threads=1)
        stats["train_wall_seconds"] = round(time.monotonic() - t0, 1)
        write_manifest(
            tmp,
            {"recipe_hash": recipe.digest(_default_digest())},
            [f"student/{f}" for f in MODEL_FILES],
            recipe=dataclasses.asdict(recipe),
            stats=stats,
        )
        if dest.exists():
            shutil.rmtree(dest)
        tmp.chmod(0o755)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "student"


def student_dir() -> Path:
    """The shipped SFT student (it must verify: shipping is how it is made)."""
    found = shipped_student()
    if found is None:
        raise RuntimeError(
            f"{SHIPPED_DIR} holds no verified build of the small-factor student's recipe: "
            "run `python -m relay_agents.tiny.small_factor ship`"
        )
    return found


def read_stats() -> dict[str, object]:
    return json.loads((SHIPPED_DIR / MANIFEST).read_text()).get("stats", {})


if __name__ == "__main__":
    if sys.argv[1:] != ["ship"]:
        sys.exit("usage: python -m relay_agents.tiny.small_factor ship")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(train_student())
