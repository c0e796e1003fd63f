"""The claim in miniature, shortened for every CI run: GRPO with the difficulty-aware reward,
with real relay rollouts through the tiny teacher on vLLM, cuts the small-factor student's calls
on the problems it can solve alone while its accuracy holds (docs/training.md has the full run)."""

from __future__ import annotations

from pathlib import Path

from relay_agents.train.tiny_claim import SHORT, run


def test_grpo_cuts_the_calls_the_student_does_not_need(tiny_servers, tmp_path: Path) -> None:
    teacher = tiny_servers.relay_config().teacher
    assert teacher.temperature == 0.0
    results = run(SHORT, tmp_path, teacher, full=False)
    sft, grpo = results["rows"]
    assert sft["calls_alone"] >= 0.9 and sft["calls_rest"] >= 0.9, sft
    assert grpo["calls_alone"] <= sft["calls_alone"] / 2, (sft, grpo)
    # accuracy holds (the full run: 96.5% -> 97.0%, docs/training.md); one problem of slack
    assert grpo["accuracy"] >= sft["accuracy"] - 0.03, (sft, grpo)
    assert grpo["calls_rest"] >= 0.9, grpo  # it still calls where it cannot go alone
    assert (tmp_path / "grpo-group" / "model.safetensors").is_file()
