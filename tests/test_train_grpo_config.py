"""``train.toml`` for ``relay-agents train grpo``, and the teacher-pass filter in front of GRPO
(the scripted server is the teacher on the wire)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay_agents.settings import ConfigError
from relay_agents.testing import ScriptedServer
from relay_agents.train.grpo import filtered_data, load_grpo_settings, load_prompts

TOML = """
[student]
model = "runs/sft"

[teacher]
base_url = "{url}"
model = "teacher"
api = "completions"
chat_template = "{{% for m in messages %}}{{{{ m['content'] }}}}\\n{{% endfor %}}"

[data]
path = "{data}"

[filter]
k = 2
rule = "any"

[reward]
mode = "oracle"

[rollout]
max_turns = 3
[rollout.budget]
max_teacher_tokens = 16

[grpo]
output_dir = "runs/grpo"
num_generations = 4
"""


def _write(tmp_path: Path, url: str) -> Path:
    data = tmp_path / "train.jsonl"
    rows = [
        {"question": "What is 2+3?", "answer": "5", "difficulty": "alone"},
        {"question": "What is 7*8?", "answer": "56", "difficulty": "teacher"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "train.toml"
    config.write_text(TOML.format(url=url, data=data))
    return config


def test_the_config_file_loads_every_table(tmp_path: Path) -> None:
    settings = load_grpo_settings(_write(tmp_path, "http://127.0.0.1:9/v1"))
    assert settings.reward.mode == "oracle"
    assert settings.rollout.max_turns == 3 and settings.rollout.budget.max_teacher_tokens == 16
    assert settings.filter.k == 2 and settings.filter.enabled
    assert settings.grpo == {"output_dir": "runs/grpo", "num_generations": 4}


def test_a_bad_value_names_its_field(tmp_path: Path) -> None:
    config = _write(tmp_path, "http://127.0.0.1:9/v1")
    config.write_text(config.read_text().replace('mode = "oracle"', 'mode = "bonus"'))
    with pytest.raises(ConfigError, match=r"reward\.mode"):
        load_grpo_settings(config)


def test_the_training_set_is_what_the_teacher_passes_with_every_column(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    scripted.script("teacher", "2+3", ["So \\boxed{5}"], repeat=True)
    scripted.script("teacher", "7*8", ["So \\boxed{54}"], repeat=True)
    settings = load_grpo_settings(_write(tmp_path, scripted.base_url))
    kept = filtered_data(settings)
    rows = [json.loads(line) for line in kept.read_text().splitlines()]
    assert rows == [{"question": "What is 2+3?", "answer": "5", "difficulty": "alone"}]
    assert [p["prompt"][0]["content"] for p in load_prompts(kept, "{question} Box it.")] == [
        "What is 2+3? Box it."
    ]
    off = settings.model_copy(update={"filter": settings.filter.model_copy(update={"enabled": False})})
    assert filtered_data(off) == settings.data.path


def test_an_unknown_grpo_option_is_named_with_the_closest_one(tmp_path: Path) -> None:
    config = _write(tmp_path, "http://127.0.0.1:9/v1")
    config.write_text(config.read_text().replace("num_generations = 4", "num_generation = 4"))
    with pytest.raises(ConfigError, match=r"grpo.*'num_generation'.*did you mean 'num_generations'"):
        load_grpo_settings(config)
