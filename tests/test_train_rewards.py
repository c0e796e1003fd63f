"""Every cell of the relay rewards, in both modes, and the TRL reward-function adapter."""

from __future__ import annotations

import pytest

from relay_agents.core.result import RelayEvent, RelayRecord, RelayUsage, Span
from relay_agents.train.rewards import (
    CALL_TOKEN_CAP,
    RelayReward,
    record_call_ratio,
    record_called,
    relay_rewards,
    requested_call_ratio,
    requested_calls,
)

# (correct, called, call ratio) of one rollout
CORRECT_ALONE = (True, False, 0.0)
CORRECT_CALLED = (True, True, 0.25)
WRONG_ALONE = (False, False, 0.0)
WRONG_CALLED = (False, True, 0.5)


def rewards(*rows: tuple[bool, bool, float], **options: object) -> list[float]:
    correct, called, ratio = zip(*rows, strict=True)
    return relay_rewards(correct, called, ratio, **options)  # type: ignore[arg-type]


# The published code's table: the group decides the row.
def test_group_with_a_correct_answer_without_a_call() -> None:
    group = (CORRECT_ALONE, CORRECT_CALLED, WRONG_ALONE, WRONG_CALLED)
    assert rewards(*group) == [1.5, 0.75, 0.0, 0.0]


def test_group_whose_correct_answers_all_called() -> None:
    group = (CORRECT_CALLED, WRONG_ALONE, WRONG_CALLED)
    assert rewards(*group) == [0.75, -1.0, 0.0]


def test_group_with_no_correct_answer_explores_by_the_call_ratio() -> None:
    assert rewards(WRONG_ALONE, WRONG_CALLED) == [0.0, 0.5]


def test_group_row_is_decided_by_the_whole_group_not_the_rollout() -> None:
    """The same wrong rollout without a call earns 0 beside a solo solve, -1 beside a called one."""
    assert rewards(WRONG_ALONE, CORRECT_ALONE)[0] == 0.0
    assert rewards(WRONG_ALONE, CORRECT_CALLED)[0] == -1.0
    assert rewards(WRONG_ALONE, WRONG_ALONE)[0] == 0.0


def test_a_full_call_ratio_earns_nothing_for_a_called_solve() -> None:
    assert rewards((True, True, 1.0), WRONG_ALONE) == [0.0, -1.0]


# The paper's table: the difficulty is given.
@pytest.mark.parametrize(
    ("difficulty", "expected"),
    [
        ("alone", [1.5, 0.75, 0.0, 0.0]),
        ("teacher", [1.5, 0.75, -1.0, 0.0]),
        ("neither", [1.5, 0.75, 0.0, 0.5]),
    ],
)
def test_oracle_table(difficulty: str, expected: list[float]) -> None:
    group = (CORRECT_ALONE, CORRECT_CALLED, WRONG_ALONE, WRONG_CALLED)
    assert rewards(*group, mode="oracle", difficulty=difficulty) == expected


def test_oracle_ignores_the_rest_of_the_group() -> None:
    """A lone failure without a call on a problem that needs the teacher is punished even when
    no rollout of the group solved it (the group mode would give it 0)."""
    assert rewards(WRONG_ALONE, mode="oracle", difficulty="teacher") == [-1.0]
    assert rewards(WRONG_ALONE) == [0.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "oracle"}, "needs difficulty"),
        ({"mode": "oracle", "difficulty": "easy"}, "needs difficulty"),
        ({"mode": "group", "difficulty": "alone"}, "pass no difficulty"),
        ({"mode": "vote"}, "mode must be"),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rewards(CORRECT_ALONE, **options)


def test_inputs_must_line_up_and_ratios_lie_in_the_unit_interval() -> None:
    with pytest.raises(ValueError, match="one entry per rollout"):
        relay_rewards([True], [False, True], [0.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        relay_rewards([True], [True], [1.5])


# Call ratios.
def test_requested_calls_read_well_formed_commands_only() -> None:
    text = "a <call>12</call> b <call> 3 </call> c <call>x</call> <call>5 tokens</call>"
    assert requested_calls(text) == [12, 3]


def test_requested_ratio_caps_each_n_at_4096_and_the_ratio_at_1() -> None:
    assert requested_call_ratio("x <call>10</call> y <call>30</call>", 200) == 0.2
    over = f"<call>{CALL_TOKEN_CAP + 5000}</call>"
    assert requested_call_ratio(over, 8192) == CALL_TOKEN_CAP / 8192
    assert requested_call_ratio(over + over, 4096) == 1.0
    assert requested_call_ratio("<call>10</call>", 0) == 0.0
    assert requested_call_ratio("no calls", 50) == 0.0


def record(student: int, teacher: int, calls: int, events: list[RelayEvent] | None = None) -> RelayRecord:
    return RelayRecord(
        spans=[
            Span(source="student", text="s", tokens=student),
            Span(source="teacher", text="t", tokens=teacher),
        ],
        usage=RelayUsage(student_tokens=student, teacher_tokens=teacher, teacher_calls=calls),
        finish_reason="stop",
        events=events or [],
    )


def test_record_ratio_and_called() -> None:
    assert record_call_ratio(record(90, 10, 1)) == 0.1
    assert record_called(record(90, 10, 1))
    assert not record_called(record(100, 0, 0))
    declined = RelayEvent(kind="declined", message="budget spent", requested=8, granted=0)
    assert record_called(record(100, 0, 0, [declined]))


# The TRL adapter, called as GRPOTrainer calls a reward function.
TRL_EXTRAS = {"trainer_state": None, "log_extra": print, "log_metric": print}


def test_adapter_grades_groups_by_prompt_with_requested_ratios() -> None:
    prompts = ["p1", "p1", "p2", "p2"]
    completions = [
        "so \\boxed{4}",  # p1: correct alone
        "<call>5</call> then \\boxed{3}",  # p1: wrong, called
        "<call>5</call> \\boxed{7}",  # p2: correct, called (5 of 20 tokens)
        "\\boxed{8}",  # p2: wrong alone next to a called solve
    ]
    ids = [[0] * 10, [0] * 10, [0] * 20, [0] * 10]
    reward = RelayReward()
    got = reward(prompts, completions, completion_ids=ids, answer=["4", "4", "7", "7"], **TRL_EXTRAS)
    assert got == [1.5, 0.0, 0.75, -1.0]


def test_adapter_reads_conversational_completions_and_rollout_fields() -> None:
    prompts = [[{"role": "user", "content": "q"}]] * 2
    completions = [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]]
    records = [record(90, 10, 1).model_dump(), record(100, 0, 0)]
    reward = RelayReward(mode="oracle", call_ratio="teacher")
    got = reward(
        prompts,
        completions,
        completion_ids=[[0], [0]],
        correct=[False, False],
        relay_record=records,
        difficulty=["neither", "neither"],
        **TRL_EXTRAS,
    )
    assert got == [0.1, 0.0]


def test_adapter_teacher_ratio_needs_records() -> None:
    with pytest.raises(ValueError, match="relay_record"):
        RelayReward(call_ratio="teacher")(["p"], ["x"], completion_ids=[[0]], correct=[True])
