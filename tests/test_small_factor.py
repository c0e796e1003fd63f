"""The tiny world's small-factor variant: its problems, its SFT data and its shipped student."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relay_agents.tiny import small_factor, tasks
from relay_agents.tiny.tokenizer import load_tokenizer


def test_half_the_hard_steps_have_the_small_factor_and_the_sets_are_apart() -> None:
    held_out = small_factor.eval_problems(400)
    share = sum(small_factor.solvable_alone(p) for p in held_out) / len(held_out)
    assert 0.4 < share < 0.6
    for p in held_out:
        a, b = map(int, p.steps[0].lhs.split("*"))
        assert 100 <= a * b <= 999 and (b == small_factor.SMALL_FACTOR) == small_factor.solvable_alone(p)
        assert tasks.is_correct(tasks.teacher_solution(p), p.gold)
    reserved = {p.question for p in small_factor.eval_problems(small_factor.EVAL_RESERVE)}
    assert not reserved & {p.question for p in small_factor.train_problems(500)}


def test_cold_start_examples_call_and_mask_the_result_alone_ones_learn_it() -> None:
    tok = load_tokenizer(small_factor.teacher_dir())
    problem = next(p for p in small_factor.eval_problems(50) if small_factor.solvable_alone(p))
    result = f" {problem.steps[0].result}"

    def learned(ids: list[int], labels: list[int]) -> str:
        return tok.decode([i for i, label in zip(ids, labels, strict=True) if label != -100])

    called = learned(*small_factor.example(tok, problem, call=True))
    assert (
        "<call>4</call>" in called and f"={result}" not in called and "<call>4</call>" + result not in called
    )
    alone = learned(*small_factor.example(tok, problem, call=False))
    assert "<call>" not in alone and f"{problem.steps[0].lhs} ={result}" in alone


def test_the_shipped_student_is_the_recipe_s_build() -> None:
    student = small_factor.student_dir()
    assert student == small_factor.SHIPPED_DIR / "student"
    assert (student / "model.safetensors").stat().st_size < 400_000
    assert (student / "tokenizer.json").read_bytes() == (
        small_factor.teacher_dir() / "tokenizer.json"
    ).read_bytes()


@pytest.mark.tiny_rebuild
@pytest.mark.skipif(
    os.environ.get("RELAY_TINY_REBUILD") != "1",
    reason="a full rebuild: set RELAY_TINY_REBUILD=1 (docs/tiny-world.md)",
)
def test_a_rebuild_reproduces_the_shipped_student_byte_for_byte(tmp_path: Path) -> None:
    """About 2 minutes on the quiet machine: with the weekly rebuild of the default pair."""
    rebuilt = small_factor.train_student(tmp_path / "weights").parent
    shipped = json.loads((small_factor.SHIPPED_DIR / "manifest.json").read_text())["files"]
    assert json.loads((rebuilt / "manifest.json").read_text())["files"] == shipped
