"""What the tutor shows, as plain JSON-ready dicts: messages with their spans, notices in
words, and the conversation's budget meter. Pure functions, shared by the page and the
terminal so both tell the same story."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from relay_agents.core.config import Budget
from relay_agents.core.grants import Spend
from relay_agents.core.result import BudgetState, RelayRecord

BUDGET_SPENT = "The teacher budget of this conversation is spent: the student answers alone from here."


def budget_view(budget: Budget, spent: Spend) -> dict[str, Any]:
    """The meter: limits, spent and remaining (the store's numbers) and whether it is spent."""
    return BudgetState.of(budget, spent).model_dump()


def notice(event: dict[str, Any]) -> dict[str, str]:
    """One relay event as a notice for a person: ``kind`` is budget, teacher or info."""
    kind, reason = event.get("kind", ""), event.get("reason") or ""
    if kind == "declined_call" and reason.startswith("budget"):
        return {
            "kind": "budget",
            "text": f"Teacher call declined: {_after_colon(event['message'])}. The student went on alone.",
        }
    if kind == "truncated_call" and reason == "context_tokens":
        return {
            "kind": "teacher",
            "text": f"Teacher call cut to fit the teacher's context ({event['message']}).",
        }
    if kind == "truncated_call":
        return {
            "kind": "budget",
            "text": f"Teacher call cut to what the budget had left ({event['message']}).",
        }
    if kind == "teacher_failure":
        return {
            "kind": "teacher",
            "text": f"The teacher could not help: {_after_colon(event['message'])}. "
            "The student went on alone.",
        }
    return {"kind": "info", "text": str(event.get("message", kind))}


def _after_colon(message: str) -> str:
    return message.split(": ", 1)[1] if ": " in message else message


def message_view(message: BaseMessage) -> dict[str, Any] | None:
    """A user or tutor message for display; other messages (system, tools) are not shown."""
    if isinstance(message, HumanMessage):
        return {"role": "user", "text": message.text}
    if not isinstance(message, AIMessage):
        return None
    meta = message.response_metadata.get("relay")
    if meta is None:
        return {
            "role": "assistant",
            "text": message.text,
            "spans": [{"source": "student", "text": message.text}],
        }
    relay = RelayRecord.model_validate(meta)
    return {
        "role": "assistant",
        "text": message.text,
        "spans": [{"source": s.source, "text": s.text} for s in relay.spans],
        "usage": relay.usage.model_dump(),
        "finish_reason": relay.finish_reason,
        "notices": [notice(e.model_dump()) for e in relay.events],
    }


def history_view(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """The conversation for display; a question the tutor never answered is marked so."""
    views = [v for m in messages if (v := message_view(m)) is not None]
    for i, view in enumerate(views):
        if view["role"] == "user":
            view["answered"] = i + 1 < len(views) and views[i + 1]["role"] == "assistant"
    return views


def usage_line(usage: dict[str, Any]) -> str:
    """``student 40 tokens, teacher 4 tokens in 1 call (9.1% teacher)``."""
    calls = usage["teacher_calls"]
    line = (
        f"student {usage['student_tokens']} tokens, teacher {usage['teacher_tokens']} tokens in "
        f"{calls} call{'' if calls == 1 else 's'} ({usage['call_ratio']:.1%} teacher)"
    )
    if usage.get("teacher_cost_usd"):
        line += f", teacher cost ${usage['teacher_cost_usd']:.6f}"
    return line


def _money(value: float) -> str:
    return f"${value:.6f}".rstrip("0").rstrip(".") if value else "$0"


def budget_line(meter: dict[str, Any]) -> str:
    """``teacher budget: 12 / 40 tokens, 3 calls, $0.00012 / $0.05``."""

    def part(spent: str, limit: str | None, unit: str) -> str:
        return f"{spent}{unit}" if limit is None else f"{spent} / {limit}{unit}"

    cost_limit = meter["max_cost_usd"]
    parts = [
        part(str(meter["spent_teacher_tokens"]), _str(meter["max_teacher_tokens"]), " tokens"),
        part(str(meter["spent_teacher_calls"]), _str(meter["max_teacher_calls"]), " calls"),
        part(_money(meter["spent_cost_usd"]), None if cost_limit is None else _money(cost_limit), ""),
    ]
    line = "teacher budget: " + ", ".join(parts)
    return line + " (spent)" if meter["exhausted"] else line


def _str(value: int | None) -> str | None:
    return None if value is None else str(value)
