"""The ``published`` preset against the published evaluation loop, case by case.

Each case scripts the student and the teacher and writes out what the published loop does
with them: every request to each model (its ``max_tokens`` and the answer it continues), the
final text and how the answer ended. A change to the relay that drifts from the published
loop fails here. The deviations the preset keeps (and why) are in docs/protocol-deviations.md;
the cases that exercise them say so.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from relay_agents import ConfigError, RelayConfig, RelayResult, arelay, load_config, relay
from relay_agents.core.presets import PUBLISHED_PROMPT_SUFFIX
from relay_agents.testing import ScriptedServer, tokenize
from tests.conftest import endpoint

S, T = "student", "teacher"


@dataclass(frozen=True)
class Case:
    student: list[str]
    teacher: list[str]
    requests: list[tuple[str, int, str]]  # (model, max_tokens, the answer it continues)
    text: str
    finish_reason: str
    finished_by: str
    teacher_calls: int
    events: list[str] = field(default_factory=list)


CASES: dict[str, Case] = {
    "one call": Case(
        ["12*34 = <call>3</call>", " So \\boxed{408}."],
        [" 408"],
        [(S, 8192, ""), (T, 3, "12*34 ="), (S, 8179, "12*34 = <call>3</call> 408")],
        "12*34 = 408 So \\boxed{408}.",
        "stop",
        "student",
        1,
    ),
    "two calls": Case(
        ["First 12*34 = <call>3</call> never reached", ". Then 408+1 = <call>3</call>", ". So \\boxed{409}."],
        [" 408 and more", " 409 and more"],
        [
            (S, 8192, ""),
            (T, 3, "First 12*34 ="),
            (S, 8178, "First 12*34 = <call>3</call> 408"),
            (T, 3, "First 12*34 =   408. Then 408+1 ="),
            (S, 8163, "First 12*34 = <call>3</call> 408. Then 408+1 = <call>3</call> 409"),
        ],
        "First 12*34 = 408. Then 408+1 = 409. So \\boxed{409}.",
        "stop",
        "student",
        2,
    ),
    "a call at the start": Case(
        ["<call>2</call>", " = 5."],
        [" x y"],
        [(S, 8192, ""), (T, 2, ""), (S, 8187, "<call>2</call> x y")],
        " x y = 5.",
        "stop",
        "student",
        1,
    ),
    "the teacher ends the answer (EOS)": Case(
        ["Let me ask <call>50</call>", " never"],
        [" the end."],
        [(S, 8192, ""), (T, 50, "Let me ask")],
        "Let me ask the end.",
        "stop",
        "teacher",
        1,
    ),
    "N larger than what is left": Case(
        ["x <call>99999</call>", " y"],
        [" t u v"],
        [(S, 8192, ""), (T, 8192 - 9, "x")],
        "x t u v",
        "stop",
        "teacher",
        1,
        ["truncated_call"],
    ),
    "N beyond 64 bits": Case(
        ["x <call>99999999999999999999</call>", " y"],
        [" t u v"],
        [(S, 8192, ""), (T, 8192 - 24, "x")],
        "x t u v",
        "stop",
        "teacher",
        1,
        ["truncated_call"],
    ),
    "N=0 calls no teacher": Case(
        ["a <call>0</call>", " b."],
        [],
        [(S, 8192, ""), (S, 8187, "a <call>0</call>")],
        "a  b.",
        "stop",
        "student",
        0,
        ["ignored_call"],
    ),
    "odd digits and white space": Case(
        ["a <call> 007 </call>", " b."],
        [" 1 2 3 4 5 6 7 8"],
        [(S, 8192, ""), (T, 7, "a"), (S, 8177, "a <call> 007 </call> 1 2 3 4 5 6 7")],
        "a 1 2 3 4 5 6 7 b.",
        "stop",
        "student",
        1,
    ),
    "a stray <call> before the command": Case(
        ["I will <call> maybe later, now 7*8 = <call>2</call>", ". So 56."],
        [" 56"],
        [
            (S, 8192, ""),
            (T, 2, "I will <call> maybe later, now 7*8 ="),
            (S, 8174, "I will <call> maybe later, now 7*8 = <call>2</call> 56"),
        ],
        "I will maybe later, now 7*8 = 56. So 56.",
        "stop",
        "student",
        1,
    ),
    "an unclosed <call> then EOS": Case(
        ["Hmm <call> no: \\boxed{2}"],
        [],
        [(S, 8192, "")],
        "Hmm no: \\boxed{2}",
        "stop",
        "student",
        0,
    ),
    "a call on the last (5th) turn": Case(
        [f"s{i} <call>1</call>" for i in range(5)],
        [f" t{c}" for c in "abcde"],
        [
            (S, 8192, ""),
            (T, 1, "s0"),
            (S, 8185, "s0 <call>1</call> ta"),
            (T, 1, "s0   tas1"),
            (S, 8178, "s0 <call>1</call> tas1 <call>1</call> tb"),
            (T, 1, "s0   tas1   tbs2"),
            (S, 8171, "s0 <call>1</call> tas1 <call>1</call> tbs2 <call>1</call> tc"),
            (T, 1, "s0   tas1   tbs2   tcs3"),
            (S, 8164, "s0 <call>1</call> tas1 <call>1</call> tbs2 <call>1</call> tcs3 <call>1</call> td"),
        ],
        "s0 tas1 tbs2 tcs3 tds4 ",
        "turn_limit",
        "student",
        4,
    ),
    "the teacher writes markup": Case(
        ["a <call>6</call>", " then <call>20</call>"],
        [" b <call>zz</call> c", " d <call>3</call> e"],
        [
            (S, 8192, ""),
            (T, 6, "a"),
            (S, 8181, "a <call>6</call> b <call>zz</call> c"),
            (T, 20, "a   b <call>zz</call> c then"),
        ],
        "a b  c then d  e",  # the clean text never shows markup (a documented deviation)
        "stop",
        "teacher",
        2,
    ),
    "a malformed command fails the answer": Case(
        ["a <call>abc</call>", " never"],
        [],
        [(S, 8192, "")],
        "a ",
        "malformed_call",
        "student",
        0,
        ["malformed_call"],
    ),
    # Deviation: the published loop reads the leading digits (N=5) and calls the teacher.
    "leading digits are malformed": Case(
        ["a <call>5 tokens</call>", " never"],
        [" t"],
        [(S, 8192, "")],
        "a ",
        "malformed_call",
        "student",
        0,
        ["malformed_call"],
    ),
    # Deviation: the published loop calls the teacher with N=5 after the student's EOS.
    "an unclosed <call>5 then EOS ends the answer": Case(
        ["a <call>5"],
        [" t"],
        [(S, 8192, "")],
        "a ",
        "stop",
        "student",
        0,
    ),
}


def published(server: ScriptedServer) -> RelayConfig:
    return RelayConfig.published(endpoint(server, "student"), endpoint(server, "teacher"))


@pytest.mark.parametrize("name", list(CASES))
async def test_the_published_loop(scripted: ScriptedServer, name: str) -> None:
    case = CASES[name]
    key = "Q-parity"
    scripted.script("student", key, case.student)
    if case.teacher:
        scripted.script("teacher", key, case.teacher)
    result = await arelay(key, published(scripted))

    requests = [r for r in scripted.requests() if r["path"].startswith("/v1/")]
    sent = [
        (r["model"], r["body"]["max_tokens"], r["prompt"].split("<|im_start|>assistant\n", 1)[1])
        for r in requests
    ]
    assert sent == case.requests
    for r in requests:
        assert r["body"]["temperature"] == 0.7
        assert f"{PUBLISHED_PROMPT_SUFFIX}<|im_end|>" in r["prompt"]
        assert r["body"].get("stop") == (["</call>"] if r["model"] == S else None)
    assert result.text == case.text
    assert (result.finish_reason, result.finished_by) == (case.finish_reason, case.finished_by)
    assert result.usage.teacher_calls == case.teacher_calls
    assert [e.kind for e in result.events] == case.events
    assert result.preset == "published" and result.enable_thinking is False


async def test_a_teacher_failure_fails_the_answer(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-parity-fail", ["x <call>2</call>", " y"])
    scripted.faults("teacher", ["500", "500", "500"])
    with pytest.raises(openai.InternalServerError):
        await arelay("Q-parity-fail", published(scripted))


# --------------------------------------------------------------------------- counting tokens

#: (student's turns, teacher's calls, student EOS tokens, teacher EOS tokens): vLLM's usage
#: counts the EOS token of a reply that ended on one; the published count re-encodes the texts.
COUNTED: dict[str, tuple[list[str], list[str], int, int]] = {
    "the student ends on EOS": (["12*34 = <call>3</call>", " So \\boxed{408}."], [" 408"], 1, 0),
    "the teacher ends on EOS": (["Let me ask <call>50</call>"], [" the end."], 0, 1),
}


def _counted(scripted: ScriptedServer, name: str) -> tuple[int, int, int, int]:
    """Script case ``name`` (usage counting the EOS, as vLLM's); its texts' counts, re-encoded,
    and its EOS tokens."""
    student, teacher, student_eos, teacher_eos = COUNTED[name]
    scripted.configure(usage_counts_eos=True)
    scripted.script("student", "Q-count", student)
    scripted.script("teacher", "Q-count", teacher)
    s_text, t_text = sum(len(tokenize(t)) for t in student), sum(len(tokenize(t)) for t in teacher)
    return s_text, t_text, student_eos, teacher_eos


def _check_counts(result: RelayResult, student: int, teacher: int) -> None:
    assert (result.usage.student_tokens, result.usage.teacher_tokens) == (student, teacher)
    assert result.usage.call_ratio == pytest.approx(teacher / (student + teacher))
    spans = {"student": 0, "teacher": 0}
    for span in result.spans:
        spans[span.source] += span.tokens
    assert spans == {"student": student, "teacher": teacher}


@pytest.mark.parametrize("name", list(COUNTED))
async def test_the_default_reports_usage_the_preset_the_texts_re_encoded(
    scripted: ScriptedServer, name: str
) -> None:
    s_text, t_text, s_eos, t_eos = _counted(scripted, name)
    default = RelayConfig(student=endpoint(scripted, "student"), teacher=endpoint(scripted, "teacher"))
    assert default.token_count == "usage"
    _check_counts(await arelay("Q-count", default), s_text + s_eos, t_text + t_eos)

    scripted.reset()
    _counted(scripted, name)
    config = published(scripted)
    assert config.token_count == "tokenizer"
    result = await arelay("Q-count", config, conversation_id=f"count-{uuid.uuid4().hex}")
    _check_counts(result, s_text, t_text)
    # Budgets charge what was delivered: usage's count, the EOS included.
    assert result.budget.spent_teacher_tokens == t_text + t_eos


def test_the_sync_path_counts_the_same(scripted: ScriptedServer) -> None:
    s_text, t_text, _, t_eos = _counted(scripted, "the teacher ends on EOS")
    result = relay("Q-count", published(scripted), conversation_id=f"count-{uuid.uuid4().hex}")
    _check_counts(result, s_text, t_text)
    assert result.budget.spent_teacher_tokens == t_text + t_eos


def test_the_count_follows_the_setting_not_the_preset(scripted: ScriptedServer) -> None:
    s_text, t_text, s_eos, t_eos = _counted(scripted, "the student ends on EOS")
    config = RelayConfig.published(
        endpoint(scripted, "student"), endpoint(scripted, "teacher"), token_count="usage"
    )
    result = relay("Q-count", config)
    _check_counts(result, s_text + s_eos, t_text + t_eos)


# --------------------------------------------------------------------------- the switch

STUDENT = {"base_url": "http://127.0.0.1:8001/v1", "model": "student"}
TEACHER = {"base_url": "http://127.0.0.1:8002/v1", "model": "teacher"}
PUBLISHED_VALUES = {
    "user_template": "{question}\n" + PUBLISHED_PROMPT_SUFFIX,
    "max_answer_tokens": 8192,
    "max_student_turns": 5,
    "on_malformed_call": "fail",
    "on_teacher_failure": "raise",
    "token_count": "tokenizer",
    "preset": "published",
}


def _published_values(config: RelayConfig) -> dict[str, object]:
    return {key: getattr(config, key) for key in PUBLISHED_VALUES}


def test_the_preset_from_code_a_file_and_the_environment(tmp_path: Path) -> None:
    in_code = RelayConfig.published(STUDENT, TEACHER)
    path = tmp_path / "relay.toml"
    path.write_text(
        'preset = "published"\n[student]\nbase_url = "http://127.0.0.1:8001/v1"\nmodel = "student"\n'
        '[teacher]\nbase_url = "http://127.0.0.1:8002/v1"\nmodel = "teacher"\n'
    )
    from_file = load_config(path, env={})
    env = {f"RELAY_STUDENT_{k.upper()}": v for k, v in STUDENT.items()}
    env |= {f"RELAY_TEACHER_{k.upper()}": v for k, v in TEACHER.items()}
    from_env = load_config(None, env={**env, "RELAY_PRESET": "published"})
    for config in (in_code, from_file, from_env):
        assert _published_values(config) == PUBLISHED_VALUES
        assert (config.student.temperature, config.teacher.temperature) == (0.7, 0.7)
        assert config.policy == "command" and config.enable_thinking is False
    default = load_config(None, env=env)
    assert default.preset is None and default.student.temperature is None
    assert (default.on_malformed_call, default.on_teacher_failure) == ("skip", "continue")


def test_explicit_settings_win_over_the_preset(tmp_path: Path) -> None:
    config = RelayConfig.published(
        {**STUDENT, "temperature": 0.0}, TEACHER, enable_thinking=True, max_student_turns=3
    )
    assert (config.student.temperature, config.teacher.temperature) == (0.0, 0.7)
    assert config.enable_thinking is True and config.max_student_turns == 3
    path = tmp_path / "relay.toml"
    path.write_text('preset = "published"\nmax_answer_tokens = 4096\n[teacher]\ntemperature = 0.2\n')
    env = {f"RELAY_STUDENT_{k.upper()}": v for k, v in STUDENT.items()}
    env |= {f"RELAY_TEACHER_{k.upper()}": v for k, v in TEACHER.items()}
    loaded = load_config(path, env={**env, "RELAY_ON_TEACHER_FAILURE": "continue"})
    assert (loaded.max_answer_tokens, loaded.teacher.temperature, loaded.student.temperature) == (
        4096,
        0.2,
        0.7,
    )
    assert loaded.on_teacher_failure == "continue" and loaded.on_malformed_call == "fail"


def test_an_unknown_preset_names_its_source() -> None:
    env = {f"RELAY_STUDENT_{k.upper()}": v for k, v in STUDENT.items()}
    env |= {f"RELAY_TEACHER_{k.upper()}": v for k, v in TEACHER.items()}
    with pytest.raises(ConfigError, match=r"preset \(RELAY_PRESET\): Input should be 'published'"):
        load_config(None, env={**env, "RELAY_PRESET": "paper"})
