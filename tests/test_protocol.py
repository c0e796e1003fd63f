"""The relay protocol and the answer state machine, as pure code (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_agents.core.answer import (
    finish_student_turn,
    finish_teacher_call,
    new_ledger,
    relay_record,
    route,
    start_answer,
    student_filter,
    student_request,
    teacher_request,
)
from relay_agents.core.config import Budget, RelayConfig
from relay_agents.core.grants import Blocked, BudgetLimit, CallQuote, Limit, Spend, TokenCap, grant
from relay_agents.core.protocol import (
    MAX_CALL_TOKENS,
    CleanTextFilter,
    call_ratio,
    clean_student_text,
    parse_call,
    teacher_view,
)
from relay_agents.core.types import Generation

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "prefix", "tokens"),
    [
        ("12*34 = <call>5</call>", "12*34 = ", 5),
        ("<call> 7 </call>", "", 7),
        ("a <call>0</call>", "a ", 0),
        ("a <call>abc</call>", "a ", None),
        ("a <call></call>", "a ", None),
        ("a <call>-3</call>", "a ", None),
        ("a <call>2.5</call>", "a ", None),
        ("a </call>", "a ", None),
        ("<call>1</call> b <call>12</call>", "<call>1</call> b ", 12),
        ("I will <call> maybe, 7*8 = <call>2</call>", "I will <call> maybe, 7*8 = ", 2),
        ("a <call>" + "9" * 5000 + "</call>", "a ", MAX_CALL_TOKENS),
        ("a <call>00000000000000000007</call>", "a ", 7),
    ],
)
def test_parse_call(text: str, prefix: str, tokens: int | None) -> None:
    command = parse_call(text)
    assert command is not None
    assert command.prefix == prefix
    assert command.tokens == tokens
    assert command.malformed is (tokens is None)
    assert command.prefix + command.raw == text


def test_parse_call_needs_the_closing_tag_at_the_end() -> None:
    assert parse_call("no call here") is None
    assert parse_call("a <call>5</call> and more") is None
    assert parse_call("cut <call>5") is None


def test_teacher_view_replaces_commands_by_a_space_and_strips() -> None:
    view = "  Step: 12*34 = <call>2</call> 408. Then <call>3</call>x "
    assert teacher_view(view) == "Step: 12*34 =   408. Then  x"
    assert teacher_view("<call>1</call>") == ""
    assert teacher_view("I will <call> maybe, 7*8 = <call>2</call>") == "I will <call> maybe, 7*8 ="
    assert teacher_view("a <call>zz</call> b") == "a <call>zz</call> b"


# --------------------------------------------------------------------------- clean text


@pytest.mark.parametrize(
    ("raw", "answered", "clean"),
    [
        ("So 12*34 = <call>2</call>", True, "So 12*34 ="),
        ("So 12*34 = <call>2</call>", False, "So 12*34 = "),
        ("  leading", False, "leading"),
        ("a <cat and <c", False, "a <cat and <c"),
        ("x </call>", False, "x "),
        ("cut off <call>12", False, "cut off "),
        ("mid <call>3</call>text", False, "mid text"),
        ("I will <call> maybe, 7*8 = <call>2</call>", True, "I will maybe, 7*8 ="),
        ("stray <call> then \\boxed{2}", False, "stray then \\boxed{2}"),
        ("stray <call> then cut <call> 12 ", False, "stray then cut "),
    ],
)
def test_clean_student_text(raw: str, answered: bool, clean: str) -> None:
    assert clean_student_text(raw, answered_call=answered, answer_started=False) == clean


_pieces = st.lists(
    st.sampled_from(["a", " ", "  ", "\n", "<", "<c", "call", ">", "</", "<call>", "</call>", "7", "x y"]),
    max_size=30,
)


@given(_pieces, st.data(), st.booleans())
def test_clean_text_does_not_depend_on_chunking(
    pieces: list[str], data: st.DataObject, answered: bool
) -> None:
    raw = "".join(pieces)
    whole = clean_student_text(raw, answered_call=answered, answer_started=False)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    flt = CleanTextFilter()
    out, last = [], 0
    for cut in [*cuts, len(raw)]:
        out.append(flt.feed(raw[last:cut]))
        last = cut
    out.append(flt.finish(answered_call=answered))
    assert "".join(out) == whole
    assert "<call>" not in whole and "</call>" not in whole


def test_filter_holds_what_might_become_markup() -> None:
    flt = CleanTextFilter()
    assert flt.feed("The product is <") == "The product is"
    assert flt.feed("call>4") == ""
    assert flt.feed("</call>") == ""
    assert flt.finish(answered_call=True) == ""


# --------------------------------------------------------------------------- limits


def test_grant_cuts_to_the_tightest_limit() -> None:
    def limits(
        *, tokens: int | None = 30, calls: int = 2, cost: float | None = None, suppressed: bool = False
    ) -> list[Limit]:
        budget = Budget(max_teacher_tokens=tokens, max_teacher_calls=calls, max_cost_usd=cost)
        gates: list[Limit] = [Blocked("calls_suppressed")] if suppressed else []
        return [
            *gates,
            TokenCap("max_call_tokens", 50),
            TokenCap("answer_tokens", 100),
            BudgetLimit("conversation", budget, Spend()),
        ]

    def quote(tokens: int) -> CallQuote:
        return CallQuote(tokens, output_price_usd=0.001)

    assert grant(quote(10), limits()).granted == 10
    cut = grant(quote(80), limits())
    assert (cut.granted, cut.limited_by, cut.declined, cut.scope) == (
        30,
        "budget_tokens",
        None,
        "conversation",
    )
    assert grant(quote(80), limits(tokens=0)).declined == "budget_tokens"
    assert grant(quote(5), limits(calls=0)).declined == "budget_calls"
    assert grant(quote(5), limits(cost=0.0)).declined == "budget_cost"
    assert grant(quote(5), limits(suppressed=True)).declined == "calls_suppressed"
    assert grant(quote(500), limits(tokens=None)).granted == 50
    # a cost limit becomes output tokens, rounded down: 0.0035 USD at 0.001 a token pays for 3
    by_cost = grant(quote(10), limits(tokens=None, cost=0.0035))
    assert (by_cost.granted, by_cost.limited_by) == (3, "budget_cost")
    # a call cap is reported as such, the answer's scope is None
    capped = grant(quote(60), limits(tokens=None))
    assert (capped.granted, capped.limited_by, capped.scope) == (50, "max_call_tokens", None)


def test_call_ratio() -> None:
    assert call_ratio(90, 10) == pytest.approx(0.1)
    assert call_ratio(0, 0) == 0.0


# --------------------------------------------------------------------------- the answer machine


def _config(**kw: object) -> RelayConfig:
    endpoint = {
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "chat_template": "{{ messages }}",
    }
    return RelayConfig.model_validate({"student": endpoint, "teacher": endpoint, **kw})


def _gen(text: str, finish: str = "stop", stop: str | None = None, tokens: int | None = None) -> Generation:
    return Generation(text, finish, stop, prompt_tokens=10, completion_tokens=tokens or len(text.split()))


def _student(answer, ledger, config, text, **kw):  # type: ignore[no-untyped-def]
    flt = student_filter(answer)
    streamed = flt.feed(text)
    stop = "</call>" if text.endswith("</call>") else None
    return finish_student_turn(answer, ledger, config, _gen(text, stop=stop, **kw), streamed, flt)


MSGS = [{"role": "user", "content": "Q"}]


def test_a_student_that_calls_twice() -> None:
    config = _config()
    ledger = new_ledger()
    a = start_answer(MSGS, config)
    assert student_request(a, config).stop == ["</call>"]
    a, _ = _student(a, ledger, config, "First 12*34 = <call>3</call>", tokens=6)
    assert route(a) == "teacher"
    req = teacher_request(a, config)
    assert req.answer == "First 12*34 =" and req.max_tokens == 3 and req.stop is None
    a, ledger, _ = finish_teacher_call(a, ledger, config, _gen(" 408", "length", tokens=3))
    assert a["student_view"] == "First 12*34 = <call>3</call> 408"
    assert route(a) == "student"
    a, _ = _student(a, ledger, config, ". Then 408+1 = <call>2</call>", tokens=8)
    a, ledger, _ = finish_teacher_call(a, ledger, config, _gen(" 409", "length", tokens=2))
    assert teacher_request(
        {**a, "call": {"requested": 1, "granted": 1, "view_before_command": 0}}, config
    ).answer == ("First 12*34 =   408. Then 408+1 =   409")
    a, _ = _student(a, ledger, config, ". \\boxed{409}", tokens=4)
    assert route(a) == "finish" and a["finish_reason"] == "stop" and a["finished_by"] == "student"
    text = "".join(s["text"] for s in a["spans"])
    assert text == "First 12*34 = 408. Then 408+1 = 409. \\boxed{409}"
    assert [s["source"] for s in a["spans"]] == [
        "student",
        "teacher",
        "student",
        "teacher",
        "student",
    ]
    usage = relay_record(a, ledger, config).usage
    assert usage.teacher_tokens == 5 and usage.teacher_calls == 2
    assert usage.student_tokens == 18
    assert usage.call_ratio == pytest.approx(5 / 23)
    assert ledger == {"teacher_tokens": 5, "teacher_calls": 2, "teacher_cost_usd": 0.0}


def test_n_zero_is_ignored_and_kept_in_the_students_context() -> None:
    config = _config()
    a, _ = _student(start_answer(MSGS, config), new_ledger(), config, "x <call>0</call>")
    assert route(a) == "student"
    assert a["student_view"] == "x <call>0</call>"
    assert [e["kind"] for e in a["events"]] == ["ignored_call"]


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_malformed_command(policy: str) -> None:
    config = _config(on_malformed_call=policy)
    a, _ = _student(start_answer(MSGS, config), new_ledger(), config, "x <call>many</call>")
    assert [e["kind"] for e in a["events"]] == ["malformed_call"]
    if policy == "skip":
        assert route(a) == "student" and a["student_view"] == "x "
    else:
        assert a["finish_reason"] == "malformed_call"


def test_teacher_eos_ends_the_answer() -> None:
    config = _config()
    ledger = new_ledger()
    a, _ = _student(start_answer(MSGS, config), ledger, config, "x <call>10</call>")
    a, ledger, _ = finish_teacher_call(a, ledger, config, _gen(" done.", "stop", tokens=2))
    assert a["finish_reason"] == "stop" and a["finished_by"] == "teacher"


def test_a_student_that_never_stops_hits_the_answer_cap() -> None:
    config = _config(max_answer_tokens=10)
    a, _ = _student(start_answer(MSGS, config), new_ledger(), config, "a b c d e f g h i j", finish="length")
    assert a["finish_reason"] == "length"


def test_a_student_that_keeps_calling_hits_the_turn_cap() -> None:
    config = _config(max_student_turns=3)
    ledger = new_ledger()
    a = start_answer(MSGS, config)
    for _ in range(3):
        a, _ = _student(a, ledger, config, "more <call>1</call>")
        if route(a) == "teacher":
            a, ledger, _ = finish_teacher_call(a, ledger, config, _gen(" x", "length", tokens=1))
    assert a["finish_reason"] == "turn_limit" and a["student_turns"] == 3


def test_budget_cuts_then_declines_and_suppresses_calls() -> None:
    config = _config(budget=Budget(max_teacher_tokens=4))
    ledger = new_ledger()
    a, _ = _student(start_answer(MSGS, config), ledger, config, "a <call>10</call>")
    assert a["call"]["granted"] == 4
    assert a["events"][-1]["kind"] == "truncated_call"
    a, ledger, _ = finish_teacher_call(a, ledger, config, _gen(" b c d e", "length", tokens=4))
    a, _ = _student(a, ledger, config, " f <call>3</call>")
    assert route(a) == "student"
    assert a["events"][-1]["kind"] == "declined_call" and a["events"][-1]["reason"] == "budget_tokens"
    assert a["calls_suppressed"] and student_request(a, config).suppress_calls
    assert "<call>3</call>" not in a["student_view"]
    assert relay_record(a, ledger, config).budget.exhausted


def test_cost_budget_pays_for_the_prompt_first() -> None:
    teacher = {
        "base_url": "http://127.0.0.1:9/v1",
        "model": "t",
        "input_price": 1_000_000.0,  # 1 USD per token in
        "output_price": 2_000_000.0,  # 2 USD per token out
    }
    student = {"base_url": "http://127.0.0.1:9/v1", "model": "s", "chat_template": "x"}
    config = RelayConfig.model_validate(
        {"student": student, "teacher": teacher, "budget": {"max_cost_usd": 40.0}}
    )
    a, _ = _student(start_answer(MSGS, config), new_ledger(), config, "a b <call>50</call>", tokens=3)
    # prompt estimate 10 + 3 tokens -> 13 USD; 27 USD left buys 13 output tokens.
    assert a["call"]["granted"] == 13


def test_teacher_failure_removes_the_command_and_blocks_calls() -> None:
    config = _config()
    ledger = new_ledger()
    a, _ = _student(start_answer(MSGS, config), ledger, config, "So x = <call>4</call>")
    a, ledger2, deltas = finish_teacher_call(a, ledger, config, None, ConnectionError("refused"))
    assert ledger2 == ledger
    assert a["student_view"] == "So x = "
    assert deltas == [("student", " ")]
    assert a["calls_suppressed"] and a["events"][-1]["kind"] == "teacher_failure"
    assert "refused" in a["events"][-1]["message"]
    assert route(a) == "student"


def test_teacher_free_policy_blocks_calls_from_the_start() -> None:
    config = _config(policy="teacher_free")
    assert student_request(start_answer(MSGS, config), config).suppress_calls
