"""``relay-agents eval`` on the tiny world, as a user runs it: no endpoints configured, so the
command serves the tiny pair and the solo student itself; the full protocol (every row) on 200
held-out problems. ``RELAY_EVAL_REPORT_DIR`` keeps the report, summary and plot (the ones in
docs/evaluation/tiny came from this test)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_entry_points import CLI

pytestmark = pytest.mark.real_vllm


def test_the_full_protocol_on_200_held_out_problems(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") or k == "RELAY_AGENTS_STATE"}
    out = tmp_path / "out"
    done = subprocess.run(
        [CLI, "eval", "--data", "tiny", "--size", "200", "--out", str(out), "--concurrency", "16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    keep = os.environ.get("RELAY_EVAL_REPORT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "summary.json", "pareto.png"):
            shutil.copy(out / name, Path(keep) / name)

    rows = json.loads((out / "summary.json").read_text())["datasets"]["tiny"]
    assert all(
        rows[s]["n"] == 200 for s in ("relay", "student", "teacher", "teacher-free", "interval", "random")
    )
    assert rows["relay"]["errors"] == 0
    # the tiny world's documented shape: the relay about as good as the teacher alone with a few
    # percent of the tokens from it, the solo student far below, the relay student helpless alone
    assert rows["teacher"]["accuracy"] >= 0.9 and rows["relay"]["accuracy"] >= 0.9
    assert 0.02 < rows["relay"]["teacher_share"] < 0.15
    assert rows["student"]["accuracy"] <= 0.5 and rows["teacher-free"]["accuracy"] <= 0.1
    # a router spending the relay's teacher share stays near the student alone; one reaching the
    # relay's accuracy spends most of its tokens on the teacher
    assert rows["random-router@cost"]["accuracy"] < rows["relay"]["accuracy"] - 0.3
    assert rows["random-router@accuracy"]["teacher_share"] > 0.5
