"""Configuration from code, TOML and RELAY_* variables; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from relay_agents import ConfigError, load_config
from relay_agents.core.config import ByDigest, digest

ENV = {
    "RELAY_STUDENT_BASE_URL": "http://127.0.0.1:8001/v1",
    "RELAY_STUDENT_MODEL": "student-1.7b",
    "RELAY_STUDENT_API_KEY": "sk-student",
    "RELAY_STUDENT_API": "chat",
    "RELAY_TEACHER_BASE_URL": "https://api.example.com/v1",
    "RELAY_TEACHER_MODEL": "big",
    "RELAY_TEACHER_API_KEY": "sk-teacher",
    "RELAY_TEACHER_API": "chat-instruct",
    "RELAY_BUDGET_MAX_TEACHER_TOKENS": "500",
    "RELAY_BUDGET_MAX_TEACHER_CALLS": "7",
    "UNRELATED": "x",
}


def test_from_environment() -> None:
    config = load_config(env=ENV)
    assert config.student.base_url == "http://127.0.0.1:8001/v1"
    assert config.student.api == "chat"
    assert config.student.api_key.get_secret_value() == "sk-student"
    assert config.teacher.api == "chat-instruct"
    assert config.budget.max_teacher_tokens == 500
    assert config.budget.max_teacher_calls == 7
    # Published defaults.
    assert (config.max_answer_tokens, config.max_student_turns) == (8192, 5)
    assert config.enable_thinking is False
    assert config.user_template.endswith("put your final answer within \\boxed{}.")


def test_budget_scopes_and_store_from_environment() -> None:
    config = load_config(
        env={
            **ENV,
            "RELAY_BUDGET_STORE": "postgresql://relay@db/relay",
            "RELAY_USER_BUDGET_MAX_COST_USD": "5",
            "RELAY_TURN_BUDGET_MAX_TEACHER_CALLS": "2",
            "RELAY_ON_BUDGET_EXHAUSTED": "raise",
        }
    )
    assert config.budget_store == "postgresql://relay@db/relay"
    assert config.budget.max_teacher_tokens == 500  # RELAY_BUDGET_* still fills the budget
    assert (config.user_budget.max_cost_usd, config.turn_budget.max_teacher_calls) == (5.0, 2)
    assert config.on_budget_exhausted == "raise"


def test_toml_then_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        """
max_answer_tokens = 300
on_malformed_call = "fail"

[student]
base_url = "http://127.0.0.1:8001/v1"
model = "s"
tokenizer_path = "/models/s"
temperature = 0.7

[teacher]
base_url = "http://127.0.0.1:8002/v1"
model = "t"
input_price = 0.5
output_price = 2.0
extra_body = { top_k = 20 }

[budget]
max_cost_usd = 0.25
"""
    )
    config = load_config(path, env={"RELAY_TEACHER_MODEL": "t2", "RELAY_MAX_STUDENT_TURNS": "3"})
    assert config.max_answer_tokens == 300 and config.max_student_turns == 3
    assert config.on_malformed_call == "fail"
    assert str(config.student.tokenizer_path) == "/models/s"
    assert config.teacher.model == "t2"
    assert config.teacher.extra_body == {"top_k": 20}
    assert config.teacher.price(1_000_000, 1_000_000) == pytest.approx(2.5)
    assert config.budget.max_cost_usd == 0.25


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (
            {**ENV, "RELAY_BUDGET_MAX_TEACHER_TOKENS": "-1"},
            ["budget.max_teacher_tokens", "RELAY_BUDGET_MAX_TEACHER_TOKENS"],
        ),
        ({**ENV, "RELAY_STUDENT_API": "rpc"}, ["student.api", "RELAY_STUDENT_API"]),
        ({**ENV, "RELAY_TEACHER_BASE_URL": "localhost:8000"}, ["teacher.base_url", "http://"]),
        (
            {k: v for k, v in ENV.items() if k != "RELAY_TEACHER_MODEL"},
            ["teacher.model", "Field required"],
        ),
        ({**ENV, "RELAY_STUDENT_TYPO": "1"}, ["student.typo"]),
        (
            {**ENV, "RELAY_TURN_BUDGET_MAX_TEACHER_TOKENS": "-1"},
            ["turn_budget.max_teacher_tokens", "RELAY_TURN_BUDGET_MAX_TEACHER_TOKENS"],
        ),
        ({**ENV, "RELAY_ON_BUDGET_EXHAUSTED": "panic"}, ["on_budget_exhausted", "RELAY_ON_BUDGET_EXHAUSTED"]),
    ],
)
def test_invalid_values_name_the_field(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env)
    for name in names:
        assert name in str(info.value)


def test_student_must_be_able_to_continue() -> None:
    with pytest.raises(ConfigError, match=r"student\.api"):
        load_config(None, env={**ENV, "RELAY_STUDENT_API": "chat-instruct"})


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[student\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})


def test_user_template_needs_the_question() -> None:
    with pytest.raises(ConfigError, match="user_template"):
        load_config(None, env={**ENV, "RELAY_USER_TEMPLATE": "Solve it."})


def test_shared_graphs_and_clients_are_keyed_without_the_secrets() -> None:
    config = load_config(env=ENV)
    other_key = config.model_copy(
        update={"teacher": config.teacher.model_copy(update={"api_key": SecretStr("sk-x")})}
    )
    assert "sk-teacher" not in digest(config) and "sk-student" not in digest(config.student)
    assert digest(config) != digest(other_key)  # still one graph per key
    assert ByDigest(config) == ByDigest(load_config(env=ENV)) != ByDigest(other_key)
    assert hash(ByDigest(config)) == hash(ByDigest(load_config(env=ENV)))
