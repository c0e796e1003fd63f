"""One relayed answer as a pure state machine: what to ask next, and what a reply changes.

The graph nodes do the I/O and call these functions; everything here is plain data in,
plain data out (JSON-friendly dicts, so any LangGraph checkpointer can persist it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, TypedDict

from relay_agents.core.config import RelayConfig
from relay_agents.core.grants import (
    Balance,
    Blocked,
    BudgetLimit,
    CallQuote,
    Grant,
    Limit,
    ScopeKind,
    Spend,
    TokenCap,
    grant,
    has_limits,
)
from relay_agents.core.policies import (
    AnswerSoFar,
    TeacherFreePolicy,
    TurnPlan,
    call_tokens,
    plan_turn,
    teacher_stop,
)
from relay_agents.core.protocol import (
    CALL_CLOSE,
    CleanTextFilter,
    call_ratio,
    clean_teacher_text,
    parse_call,
    teacher_view,
)
from relay_agents.core.result import BudgetState, RelayEvent, RelayRecord, RelayUsage, Source, Span
from relay_agents.core.types import Generation, Message, Request

Route = Literal["student", "teacher", "finish"]


class SpanDict(TypedDict):
    source: Source
    text: str
    tokens: int


class EventDict(TypedDict, total=False):
    kind: str
    message: str
    requested: int
    granted: int
    reason: str
    scope: str


class ReservationDict(TypedDict):
    id: str
    keys: list[str]


class CallDict(TypedDict, total=False):
    requested: int
    granted: int
    view_before_command: int
    reservation: ReservationDict | None
    source: str  # "command", or the policy that started the call
    stop: list[str] | None  # where the teacher stops early (a policy's step boundary)


class Ledger(TypedDict):
    """Teacher spend of one conversation; lives in the thread's state across turns."""

    teacher_tokens: int
    teacher_calls: int
    teacher_cost_usd: float


class AnswerState(TypedDict):
    question_id: str | None  # the id of the message this answer replies to
    messages: list[Message]
    tools: list[dict[str, Any]] | None  # OpenAI tools the models are shown (None: no tools)
    student_view: str
    spans: list[SpanDict]
    held: str
    started: bool
    student_turns: int
    student_tokens: int
    teacher_tokens: int
    teacher_calls: int
    student_discarded_tokens: int
    #: The tokens results report (``RelayConfig.token_count``); the two above are usage's.
    student_reported_tokens: int
    teacher_reported_tokens: int
    since_call: int | None
    student_prompt_tokens: int
    teacher_prompt_tokens: int
    student_cost_usd: float
    teacher_cost_usd: float
    call: CallDict | None
    calls_suppressed: bool
    events: list[EventDict]
    finish_reason: str | None
    finished_by: Source | None


Delta = tuple[Source, str]


def new_ledger() -> Ledger:
    return {"teacher_tokens": 0, "teacher_calls": 0, "teacher_cost_usd": 0.0}


def start_answer(
    messages: list[Message],
    config: RelayConfig,
    question_id: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> AnswerState:
    return {
        "question_id": question_id,
        "messages": messages,
        "tools": tools,
        "student_view": "",
        "spans": [],
        "held": "",
        "started": False,
        "student_turns": 0,
        "student_tokens": 0,
        "teacher_tokens": 0,
        "teacher_calls": 0,
        "student_discarded_tokens": 0,
        "student_reported_tokens": 0,
        "teacher_reported_tokens": 0,
        "since_call": None,
        "student_prompt_tokens": 0,
        "teacher_prompt_tokens": 0,
        "student_cost_usd": 0.0,
        "teacher_cost_usd": 0.0,
        "call": None,
        "calls_suppressed": isinstance(config.policy, TeacherFreePolicy),
        "events": [],
        "finish_reason": None,
        "finished_by": None,
    }


def context_room(wanted: int, context_tokens: int | None, prompt_tokens: int | None) -> int | None:
    """The tokens a request for ``wanted`` may ask for when the endpoint's context (of
    ``context_tokens``, after a prompt of ``prompt_tokens``; ``None``: not counted) holds fewer;
    ``None`` when it holds them all.

    0 means no room: the reply must end as "context full" without a request, because vLLM
    answers 400 to ``max_tokens=0`` and to a prompt that fills its context.
    """
    if context_tokens is None:
        return None
    room = max(context_tokens - (prompt_tokens or 0), 0)
    return room if room < wanted else None


def answer_tokens_left(answer: AnswerState, config: RelayConfig) -> int:
    return config.max_answer_tokens - answer["student_tokens"] - answer["teacher_tokens"]


def route(answer: AnswerState) -> Route:
    if answer["finish_reason"] is not None:
        return "finish"
    return "teacher" if answer["call"] is not None else "student"


# --------------------------------------------------------------------------- student


def _calls_open(answer: AnswerState, config: RelayConfig) -> bool:
    """Whether a call could still be granted by the answer's own limits."""
    turn = config.turn_budget
    return not (
        answer["calls_suppressed"]
        or (turn.max_teacher_calls is not None and answer["teacher_calls"] >= turn.max_teacher_calls)
        or (turn.max_teacher_tokens is not None and answer["teacher_tokens"] >= turn.max_teacher_tokens)
    )


def student_plan(answer: AnswerState, config: RelayConfig) -> TurnPlan:
    """What the policy lets the next student turn do (see :func:`relay_agents.core.policies.plan_turn`)."""
    so_far = AnswerSoFar(
        student_tokens=answer["student_tokens"],
        teacher_tokens=answer["teacher_tokens"],
        teacher_calls=answer["teacher_calls"],
        since_call=answer.get("since_call"),
        tokens_left=answer_tokens_left(answer, config),
        calls_open=_calls_open(answer, config),
        key=repr(answer["messages"]),
    )
    return plan_turn(
        config.policy,
        so_far,
        min_gap=config.min_tokens_between_calls,
        target_share=config.target_teacher_share,
    )


def student_request(answer: AnswerState, config: RelayConfig, plan: TurnPlan | None = None) -> Request:
    plan = plan or TurnPlan()
    left = answer_tokens_left(answer, config)
    return Request(
        messages=answer["messages"],
        answer=answer["student_view"],
        max_tokens=left if plan.max_tokens is None else min(plan.max_tokens, left),
        stop=[CALL_CLOSE],
        suppress_calls=answer["calls_suppressed"] or plan.suppress_calls,
        enable_thinking=config.enable_thinking,
        logprobs=plan.logprobs,
        count_with_tokenizer=config.token_count == "tokenizer",
        tools=answer.get("tools"),
    )


def skipped_student_turn() -> Generation:
    """The student turn of a plan that calls before the student writes (teacher-only)."""
    return Generation(
        text="", finish_reason=None, stop_reason=None, prompt_tokens=0, completion_tokens=0, cut=True
    )


def student_filter(answer: AnswerState) -> CleanTextFilter:
    return CleanTextFilter(answer_started=answer["started"])


def finish_student_turn(
    answer: AnswerState,
    ledger: Ledger | None,
    config: RelayConfig,
    generation: Generation,
    streamed: str,
    flt: CleanTextFilter,
    plan: TurnPlan | None = None,
) -> tuple[AnswerState, list[Delta]]:
    """Apply a student turn. ``streamed`` is the clean text already emitted by ``flt``.

    ``ledger`` is the thread's spend, checked against ``config.budget``; ``None`` when a
    budget store checks the conversation instead (:func:`apply_reservation`). ``plan`` is the
    turn's :class:`TurnPlan`: a turn cut before an unsure token, or one that reached the
    policy's quota, ends in a call the policy starts, granted like a command.
    """
    a: AnswerState = {**answer, "spans": list(answer["spans"]), "events": list(answer["events"])}
    text = generation.text
    if generation.stop_reason == CALL_CLOSE and not text.endswith(CALL_CLOSE):
        text += CALL_CLOSE  # a server that drops the stop string from the output
    a["student_turns"] += 1
    a["student_tokens"] += generation.completion_tokens
    a["student_discarded_tokens"] = a.get("student_discarded_tokens", 0) + generation.discarded_tokens
    reported = generation.reported_tokens
    a["student_reported_tokens"] += reported
    if a.get("since_call") is not None:
        a["since_call"] = (a["since_call"] or 0) + generation.completion_tokens
    a["student_prompt_tokens"] += generation.prompt_tokens
    a["student_cost_usd"] += config.student.price(
        generation.prompt_tokens, generation.completion_tokens + generation.discarded_tokens
    )
    deltas: list[Delta] = []

    def close_turn(answered: bool) -> None:
        tail = flt.finish(answered_call=answered)
        if tail:
            deltas.append(("student", tail))
        _add_span(a, "student", streamed + tail, reported)
        a["started"] = flt.answer_started

    if generation.context_full:
        # No room for another token: a call or another turn could only be refused.
        a["student_view"] += text
        a["events"].append(_context_full_event())
        close_turn(False)
        _finish(a, "length", "student")
        return a, deltas

    at_quota = plan is not None and plan.call_at_limit and generation.finish_reason == "length"
    if generation.cut or at_quota:
        requested = call_tokens(config.policy, answer_tokens_left(a, config))
        a["student_view"] += text
        grant = _grant(a, ledger, config, requested)
        if grant.declined:
            a["events"].append(_decline_event(grant))
            a["calls_suppressed"] = True
            close_turn(False)
            _continue_or_stop(a, config, "student")
            return a, deltas
        if grant.granted < requested:
            a["events"].append(_cut_event(grant))
        a["call"] = {
            "requested": requested,
            "granted": grant.granted,
            "view_before_command": len(a["student_view"]),
            "reservation": None,
            "source": config.policy.kind,
            "stop": teacher_stop(config.policy),
        }
        a["held"] = flt.pending
        _add_span(a, "student", streamed, reported)
        a["started"] = flt.answer_started
        return a, deltas

    command = parse_call(text)
    if command is None:
        a["student_view"] += text
        close_turn(False)
        if generation.finish_reason == "length":
            _continue_or_stop(a, config, "student")
        else:
            _finish(a, "stop", "student")
        return a, deltas

    if command.malformed:
        a["events"].append({"kind": "malformed_call", "message": f"malformed call command {command.raw!r}"})
        if config.on_malformed_call == "fail":
            a["student_view"] += text
            close_turn(False)
            _finish(a, "malformed_call", "student")
            return a, deltas
        a["student_view"] += command.prefix
        close_turn(False)
        _continue_or_stop(a, config, "student")
        return a, deltas

    assert command.tokens is not None
    if command.tokens == 0:
        a["events"].append({"kind": "ignored_call", "message": "call for 0 tokens ignored", "requested": 0})
        a["student_view"] += text
        close_turn(False)
        _continue_or_stop(a, config, "student")
        return a, deltas

    if a["student_turns"] >= config.max_student_turns:
        # As the published loop: a call that ends the last allowed turn is not answered; the
        # answer ends with the command in the student's view.
        a["student_view"] += text
        close_turn(False)
        _finish(a, "turn_limit", "student")
        return a, deltas

    grant = _grant(a, ledger, config, command.tokens)
    if grant.declined:
        a["events"].append(_decline_event(grant))
        a["student_view"] += command.prefix
        a["calls_suppressed"] = True
        close_turn(False)
        _continue_or_stop(a, config, "student")
        return a, deltas

    if grant.granted < command.tokens:
        a["events"].append(_cut_event(grant))
    a["call"] = {
        "requested": command.tokens,
        "granted": grant.granted,
        "view_before_command": len(a["student_view"]) + len(command.prefix),
        "reservation": None,
        "source": "command",
        "stop": None,
    }
    a["student_view"] += text
    a["held"] = flt.pending
    _add_span(a, "student", streamed, reported)
    a["started"] = flt.answer_started
    return a, deltas


def _grant(a: AnswerState, ledger: Ledger | None, config: RelayConfig, requested: int) -> Grant:
    """Cut a call to the answer's own limits, the turn budget and (without a store) the thread's."""
    return grant(call_quote(a, config, requested), call_limits(a, ledger, config))


def call_limits(a: AnswerState, ledger: Ledger | None, config: RelayConfig) -> list[Limit]:
    """Every limit the answer itself puts on its next call, in the order they are checked."""
    limits: list[Limit] = []
    if a["calls_suppressed"]:
        limits.append(Blocked("calls_suppressed"))
    limits.append(TokenCap("max_call_tokens", config.max_call_tokens))
    limits.append(TokenCap("answer_tokens", answer_tokens_left(a, config)))
    target = config.target_teacher_share
    if target is not None and call_ratio(a["student_tokens"], a["teacher_tokens"]) >= target:
        limits.append(Blocked("target_share"))
    since = a.get("since_call")
    if since is not None and since < config.min_tokens_between_calls:
        limits.append(Blocked("min_gap"))
    turn = Spend(a["teacher_tokens"], a["teacher_calls"], a["teacher_cost_usd"])
    limits.append(BudgetLimit("turn", config.turn_budget, turn))
    if ledger is not None:
        limits.append(BudgetLimit("conversation", config.budget, ledger_spend(ledger)))
    return limits


def call_quote(a: AnswerState, config: RelayConfig, tokens: int) -> CallQuote:
    """What a teacher call of ``tokens`` may cost.

    The teacher's prompt is estimated from the student's view of the same prompt (same
    family: the teacher's prompt is never longer), so a cost budget is not overspent.
    """
    teacher = config.teacher
    est_prompt = (
        a["student_prompt_tokens"] // max(a["student_turns"], 1) + a["student_tokens"] + a["teacher_tokens"]
    )
    return CallQuote(
        tokens,
        prompt_cost_usd=est_prompt * teacher.input_price_per_million / 1e6,
        output_price_usd=teacher.output_price_per_million / 1e6,
    )


def ledger_spend(ledger: Ledger) -> Spend:
    return Spend(ledger["teacher_tokens"], ledger["teacher_calls"], ledger["teacher_cost_usd"])


_SCOPE_TEXT: dict[str | None, str] = {
    "turn": "the answer's",
    "conversation": "the conversation's",
    "user": "the user's pooled",
    None: "the",
}
_DECLINE_TEXT = {
    "calls_suppressed": "calls are blocked for the rest of this answer",
    "budget_tokens": "{scope} teacher-token budget is spent",
    "budget_calls": "{scope} teacher-call budget is spent",
    "budget_cost": "{scope} teacher cost budget is spent",
    "answer_tokens": "the answer has no tokens left",
    "target_share": "the answer's teacher-token share reached its target",
    "min_gap": "too few student tokens since the last call",
    "context_full": "the teacher's context is full",
}


def _held_text(reason: str, held: Spend) -> str:
    """What calls in flight hold of the quantity that declined a call ("" when nothing)."""
    if reason == "budget_tokens" and held.teacher_tokens:
        return f"{held.teacher_tokens} held"
    if reason == "budget_calls" and held.teacher_calls:
        return f"{held.teacher_calls} held"
    if reason == "budget_cost" and held.cost_usd > 0:
        return f"${held.cost_usd:.6f} held"
    return ""


def _context_full_event() -> EventDict:
    return {
        "kind": "context_full",
        "message": "the student's context window is full: the answer ends here",
        "reason": "context_full",
    }


def _decline_event(grant: Grant) -> EventDict:
    assert grant.declined is not None
    why = _DECLINE_TEXT[grant.declined].format(scope=_SCOPE_TEXT[grant.scope])
    held = _held_text(grant.declined, grant.held)
    if held:
        why += f" ({held} by calls in flight)"
    event: EventDict = {
        "kind": "declined_call",
        "message": f"call for {grant.requested} tokens declined: {why}",
        "requested": grant.requested,
        "granted": 0,
        "reason": grant.declined,
    }
    if grant.scope is not None:
        event["scope"] = grant.scope
    return event


def _cut_event(grant: Grant) -> EventDict:
    limit = grant.limited_by or ""
    if grant.scope is not None:
        limit = f"{grant.scope} {limit}"
    event: EventDict = {
        "kind": "truncated_call",
        "message": f"call for {grant.requested} tokens cut to {grant.granted} ({limit})",
        "requested": grant.requested,
        "granted": grant.granted,
        "reason": grant.limited_by or "",
    }
    if grant.scope is not None:
        event["scope"] = grant.scope
    return event


def budget_declined(answer: AnswerState) -> EventDict | None:
    """The event of a call this student turn saw declined for a spent budget, if any."""
    events = answer["events"]
    if events and events[-1]["kind"] == "declined_call" and events[-1].get("reason", "").startswith("budget"):
        return events[-1]
    return None


def apply_reservation(
    answer: AnswerState, config: RelayConfig, grant: Grant, reservation: ReservationDict | None
) -> tuple[AnswerState, list[Delta]]:
    """Apply what a budget store granted to the pending call: hold, cut or decline it."""
    a: AnswerState = {**answer, "events": list(answer["events"]), "spans": list(answer["spans"])}
    call = a["call"]
    assert call is not None
    if grant.declined:
        a["events"].append(_decline_event(grant))
        deltas = _withdraw_call(a)
        _continue_or_stop(a, config, "student")
        return a, deltas
    if grant.granted < call["granted"]:
        a["events"].append(_cut_event(grant))
    a["call"] = {**call, "granted": grant.granted, "reservation": reservation}
    return a, []


def _withdraw_call(a: AnswerState) -> list[Delta]:
    """Take back a pending call: its command leaves the student's view, calls stop, and the
    student's held text is released."""
    call = a["call"]
    assert call is not None
    a["call"] = None
    a["student_view"] = a["student_view"][: call["view_before_command"]]
    a["calls_suppressed"] = True
    flt = CleanTextFilter(pending=a["held"], answer_started=a["started"])
    a["held"] = ""
    tail = flt.finish(answered_call=False)
    a["started"] = flt.answer_started
    if tail:
        _add_span(a, "student", tail, 0)
        return [("student", tail)]
    return []


# --------------------------------------------------------------------------- teacher


def teacher_request(answer: AnswerState, config: RelayConfig) -> Request:
    call = answer["call"]
    assert call is not None
    return Request(
        messages=answer["messages"],
        answer=teacher_view(answer["student_view"]),
        max_tokens=call["granted"],
        stop=call.get("stop"),
        enable_thinking=config.enable_thinking,
        count_with_tokenizer=config.token_count == "tokenizer",
        tools=answer.get("tools"),
    )


def held_student_text(answer: AnswerState) -> str:
    """The student's held text once a teacher has answered (white space before the call dropped)."""
    return CleanTextFilter(pending=answer["held"], answer_started=answer["started"]).finish(
        answered_call=True
    )


def finish_teacher_call(
    answer: AnswerState,
    ledger: Ledger,
    config: RelayConfig,
    generation: Generation | None,
    error: BaseException | None = None,
) -> tuple[AnswerState, Ledger, list[Delta]]:
    """Apply the teacher's reply (or its failure: ``generation`` None and ``error`` set)."""
    a: AnswerState = {**answer, "spans": list(answer["spans"]), "events": list(answer["events"])}
    call = a["call"]
    assert call is not None
    deltas: list[Delta] = []

    if generation is None:
        # Nothing came back: the command leaves the student's context, calls stop.
        deltas = _withdraw_call(a)
        a["events"].append(
            {
                "kind": "teacher_failure",
                "message": f"teacher unavailable, the student goes on alone: {_describe(error)}",
                "requested": call["requested"],
                "granted": call["granted"],
            }
        )
        _continue_or_stop(a, config, "student")
        return a, ledger, deltas

    room = generation.context_room
    if room is not None:
        fitted = replace(
            grant(CallQuote(call["granted"]), [TokenCap("context_tokens", room)]), requested=call["requested"]
        )
        if fitted.declined:  # nothing was asked: the teacher's context has no room
            a["events"].append(_decline_event(fitted))
            deltas = _withdraw_call(a)
            _continue_or_stop(a, config, "student")
            return a, ledger, deltas
        a["events"].append(_cut_event(fitted))

    a["call"], a["held"] = None, ""
    tail = held_student_text(answer)
    if tail:
        _add_span(a, "student", tail, 0)
    tokens = generation.completion_tokens
    cost = config.teacher.price(generation.prompt_tokens, tokens)
    if call.get("source", "command") != "command":
        # no command to keep: the view is what the teacher continued (its trailing space dropped)
        a["student_view"] = a["student_view"].rstrip()
    a["student_view"] += generation.text
    a["since_call"] = 0
    a["teacher_tokens"] += tokens
    a["teacher_reported_tokens"] += generation.reported_tokens
    a["teacher_calls"] += 1
    a["teacher_prompt_tokens"] += generation.prompt_tokens
    a["teacher_cost_usd"] += cost
    clean = clean_teacher_text(generation.text)
    a["started"] = a["started"] or bool(clean.strip())
    _add_span(a, "teacher", clean, generation.reported_tokens)
    new = {
        "teacher_tokens": ledger["teacher_tokens"] + tokens,
        "teacher_calls": ledger["teacher_calls"] + 1,
        "teacher_cost_usd": ledger["teacher_cost_usd"] + cost,
    }
    if generation.error is not None:
        a["calls_suppressed"] = True
        a["events"].append(
            {
                "kind": "teacher_failure",
                "message": f"teacher stream broke after {tokens} tokens, "
                f"the student goes on alone: {_describe(generation.error)}",
                "requested": call["requested"],
                "granted": call["granted"],
            }
        )
        _continue_or_stop(a, config, "teacher")
    elif generation.finish_reason == "stop" and not generation.hit_stop_string:
        _finish(a, "stop", "teacher")  # the teacher ended the answer (EOS), not at a step boundary
    else:
        _continue_or_stop(a, config, "teacher")
    return a, new, deltas


# --------------------------------------------------------------------------- helpers


def _add_span(a: AnswerState, source: Source, text: str, tokens: int) -> None:
    spans = a["spans"]
    if spans and spans[-1]["source"] == source:
        last = spans[-1]
        spans[-1] = {
            "source": source,
            "text": last["text"] + text,
            "tokens": last["tokens"] + tokens,
        }
    elif text or tokens:
        spans.append({"source": source, "text": text, "tokens": tokens})


def _finish(a: AnswerState, reason: str, by: Source) -> None:
    a["finish_reason"] = reason
    a["finished_by"] = by


def _continue_or_stop(a: AnswerState, config: RelayConfig, last: Source) -> None:
    if answer_tokens_left(a, config) <= 0:
        _finish(a, "length", last)
    elif a["student_turns"] >= config.max_student_turns:
        _finish(a, "turn_limit", last)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no reply"
    return f"{type(error).__name__}: {error}"


def relay_record(
    answer: AnswerState,
    ledger: Ledger,
    config: RelayConfig,
    store_balances: dict[ScopeKind, Balance] | None = None,
) -> RelayRecord:
    """The relay's account of one finished answer.

    ``budget`` describes the conversation (from the budget store when one keeps it, else from
    the thread's ledger); ``user_budget`` the user's pool when one applies.
    """
    store = store_balances or {}
    conversation = store.get("conversation")
    turn = Spend(answer["teacher_tokens"], answer["teacher_calls"], answer["teacher_cost_usd"])
    student = answer["student_reported_tokens"]
    teacher = answer["teacher_reported_tokens"]
    return RelayRecord(
        spans=[Span(**s) for s in answer["spans"]],
        usage=RelayUsage(
            student_tokens=student,
            teacher_tokens=teacher,
            teacher_calls=answer["teacher_calls"],
            student_discarded_tokens=answer.get("student_discarded_tokens", 0),
            call_ratio=call_ratio(student, teacher),
            cost_usd=answer["student_cost_usd"] + answer["teacher_cost_usd"],
            student_prompt_tokens=answer["student_prompt_tokens"],
            teacher_prompt_tokens=answer["teacher_prompt_tokens"],
            student_cost_usd=answer["student_cost_usd"],
            teacher_cost_usd=answer["teacher_cost_usd"],
        ),
        finish_reason=answer["finish_reason"],
        finished_by=answer["finished_by"],
        events=[RelayEvent(**e) for e in answer["events"]],
        budget=(
            BudgetState.of(config.budget, conversation.spent, conversation.held)
            if conversation is not None
            else BudgetState.of(config.budget, ledger_spend(ledger))
        ),
        user_budget=(
            BudgetState.of(config.user_budget, store["user"].spent, store["user"].held)
            if "user" in store
            else None
        ),
        turn_budget=BudgetState.of(config.turn_budget, turn) if has_limits(config.turn_budget) else None,
        student_model=config.student.model,
        teacher_model=config.teacher.model,
        enable_thinking=config.enable_thinking,
        preset=config.preset,
    )
