"""`relay-agents calibrate` against the scripted server: the curve, the choice, the saved file."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from relay_agents import ConfidencePolicy, load_config
from relay_agents.calibrate import write_policy
from relay_agents.cli import app
from relay_agents.testing import ScriptedServer, tokenize
from tests.conftest import CHATML

#: the probability of the first digit of the hard product, one per development question
PROBABILITIES = (0.15, 0.35, 0.55, 0.75)


def answer(i: int) -> str:
    return f"Step{i} = 282 + 8 = 290 so \\boxed{{290}}"


def script_dev_set(server: ScriptedServer, tmp_path: Path) -> Path:
    rows = []
    for i, p in enumerate(PROBABILITIES):
        tokens = tokenize(answer(i))
        unsure = tokens.index(" 2")
        probs = [p if k == unsure else None for k in range(len(tokens))]
        server.script("student", f"Q-cal{i}:", [{"text": answer(i), "probs": probs}], repeat=True)
        # after the teacher's " 282" the student writes the rest (this later script wins)
        server.script("student", f"Step{i} = 282", ["".join(tokens[unsure + 3 :])], repeat=True)
        rows.append({"question": f"Q-cal{i}: what is 47*6 + 8?", "answer": "290"})
    server.script("teacher", "Q-cal", [" 282"], repeat=True)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return dev


def config_file(server: ScriptedServer, tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        "# my relay\nmax_student_turns = 8\n"
        f'[student]\nbase_url = "{server.base_url}"\nmodel = "student"\nchat_template = {json.dumps(CHATML)}\n'
        f'[teacher]\nbase_url = "{server.base_url}"\nmodel = "teacher"\nchat_template = {json.dumps(CHATML)}\n'
        '[policy]\nkind = "confidence"\nthreshold = 0.99\ncall_tokens = 3\n'
    )
    return path


def test_calibrate_picks_the_threshold_of_the_target_share(scripted: ScriptedServer, tmp_path: Path) -> None:
    dev = script_dev_set(scripted, tmp_path)
    path = config_file(scripted, tmp_path)
    total = len(tokenize(answer(0)))
    two_calls = 2 * 3 / (len(PROBABILITIES) * total)  # the share when two questions call
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--config",
            str(path),
            "--dev",
            str(dev),
            "--target-share",
            f"{two_calls:.4f}",
            "--thresholds",
            "0.1,0.3,0.5,0.7,0.9",
            "--refine",
            "0",
        ],
        env={"RELAY_CONFIG": ""},
    )
    assert result.exit_code == 0, result.output
    # the curve: one more question calls at each step of the grid
    for k, threshold in enumerate(("0.1", "0.3", "0.5", "0.7", "0.9")):
        assert f"threshold {threshold}: share {k * 3 / (4 * total):.1%}" in result.output
    assert "chosen: threshold 0.5" in result.output
    saved = load_config(path, env={})
    assert saved.policy == ConfidencePolicy(threshold=0.5, call_tokens=3)
    assert saved.max_student_turns == 8 and path.read_text().startswith("# my relay\n")


def test_write_policy_replaces_a_shorthand_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('policy = "command"\nmax_answer_tokens = 100\n\n[server]\nport = 9\n')
    write_policy(path, ConfidencePolicy(threshold=0.25, max_entropy=None))
    data = tomllib.loads(path.read_text())
    assert data["policy"]["kind"] == "confidence" and data["policy"]["threshold"] == 0.25
    assert "max_entropy" not in data["policy"]
    assert data["max_answer_tokens"] == 100 and data["server"] == {"port": 9}


def test_a_bad_dev_set_is_reported(scripted: ScriptedServer, tmp_path: Path) -> None:
    path = config_file(scripted, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    result = CliRunner().invoke(
        app, ["calibrate", "-c", str(path), "--dev", str(bad), "-t", "0.1"], env={"RELAY_CONFIG": ""}
    )
    assert result.exit_code == 2
    assert "bad.jsonl:1" in result.output


@pytest.fixture(autouse=True)
def _no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("RELAY_") and name != "RELAY_AGENTS_STATE":
            monkeypatch.delenv(name)
