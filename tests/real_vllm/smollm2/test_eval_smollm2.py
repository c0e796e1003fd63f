"""``relay-agents eval`` unchanged on an off-the-shelf model: SmolLM2-135M-Instruct over
reasoning-gym's ``basic_arithmetic`` with the confidence policy.

No second off-the-shelf model runs here, so SmolLM2 is its own teacher: the student samples at
temperature 0.7 and hands its unsure tokens to the same model decoding greedily. What this
shows is that the harness, its grading and its report work on a real model's chat template,
log-probabilities and free-form answers; it says nothing about what a stronger teacher adds.

The rows are the relay, the student and the teacher alone, teacher-free and the random routers
(computed from the other rows): ``interval`` and ``random`` are left out because calibrating
them answers every calibration item once per grid point (6 each), more than the rest together
on a 2-core CPU. ``RELAY_SMOLLM2_EVAL_SIZE`` problems (default 2, for CI);
``RELAY_EVAL_REPORT_DIR`` keeps the report, summary and plot (the ones in
docs/evaluation/smollm2 came from this test with 16).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_entry_points import CLI

pytestmark = pytest.mark.real_vllm

SIZE = int(os.environ.get("RELAY_SMOLLM2_EVAL_SIZE", "2"))
SETTINGS = "relay,student,teacher,teacher-free,random-router@cost,random-router@accuracy"
CONFIG = """\
max_answer_tokens = 128

[policy]
kind = "confidence"
threshold = 0.3
call_tokens = 8

[student]
base_url = "{base_url}"
model = "{model}"
tokenizer_path = "{model_dir}"
temperature = 0.7
timeout = 600
call_deadline_s = 1800

[teacher]
base_url = "{base_url}"
model = "{model}"
tokenizer_path = "{model_dir}"
temperature = 0.0
timeout = 600
call_deadline_s = 1800
"""


def test_the_harness_runs_unchanged_on_smollm2(smollm2_server, smollm2_model_dir, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        CONFIG.format(
            base_url=smollm2_server.base_url, model=smollm2_server.model, model_dir=smollm2_model_dir
        )
    )
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") or k == "RELAY_AGENTS_STATE"}
    command = [CLI, "eval", "--data", "reasoning-gym:basic_arithmetic", "--size", str(SIZE)]
    command += ["--out", str(out), "--config", str(config), "--settings", SETTINGS]
    done = subprocess.run(
        [*command, "--concurrency", "16"], env=env, capture_output=True, text=True, timeout=3600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    keep = os.environ.get("RELAY_EVAL_REPORT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "summary.json", "pareto.png"):
            shutil.copy(out / name, Path(keep) / name)

    summary = json.loads((out / "summary.json").read_text())
    rows = summary["datasets"]["reasoning-gym:basic_arithmetic"]
    for setting in ("relay", "student", "teacher", "teacher-free"):
        assert rows[setting]["n"] == SIZE and rows[setting]["errors"] == 0, (setting, rows[setting])
    # the confidence policy calls the teacher on a real model's log-probabilities
    assert rows["relay"]["teacher_calls_per_answer"] > 0
    assert 0 < rows["relay"]["teacher_share"] < 1
    assert rows["teacher"]["teacher_share"] == 1 and rows["student"]["teacher_share"] == 0
    assert all(0 <= rows[s]["accuracy"] <= 1 for s in rows if "accuracy" in rows[s])
    pinned = summary["pinned"]
    assert pinned["models_as_served"] == {"student": ["smollm2"], "teacher": ["smollm2"]}
    assert pinned["student"]["tokenizer_config_sha256"] and pinned["policy"]["kind"] == "confidence"
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * SIZE and all(x["text"] and "extracted" in x for x in lines)
