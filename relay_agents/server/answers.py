"""Relay results as OpenAI answer objects: whole responses, and the chunks of a stream."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from relay_agents.api import BudgetState, RelayDelta, RelayResult
from relay_agents.core.tools import CallPiece, ParsedAnswer, ToolAnswer, ToolChoiceUnmet
from relay_agents.server.errors import APIError
from relay_agents.server.schemas import (
    AssistantMessage,
    BudgetRemaining,
    ChatChoice,
    ChatCompletion,
    ChoiceRelay,
    Completion,
    CompletionChoice,
    RelayUsageInfo,
    ToolCallOut,
    Usage,
    openai_finish_reason,
)
from relay_agents.server.sse import DONE, ChunkEncoder
from relay_agents.server.streaming import End, Item


def _least(*values: float | None) -> float | None:
    """The tightest of several remainders; None (unlimited) only when all are unlimited."""
    limited = [v for v in values if v is not None]
    return min(limited) if limited else None


def _remaining(*states: BudgetState) -> BudgetRemaining:
    tokens = _least(*(s.remaining_teacher_tokens for s in states))
    calls = _least(*(s.remaining_teacher_calls for s in states))
    return BudgetRemaining(
        teacher_tokens=None if tokens is None else int(tokens),
        teacher_calls=None if calls is None else int(calls),
        cost_usd=_least(*(s.remaining_cost_usd for s in states)),
        held_teacher_tokens=max(s.held_teacher_tokens for s in states),
        held_teacher_calls=max(s.held_teacher_calls for s in states),
        held_cost_usd=max(s.held_cost_usd for s in states),
    )


def usage_of(result: RelayResult) -> Usage:
    """``relay.budget_remaining`` is what the conversation may still spend: the tightest of its
    own budget and its API key's pool; ``relay.user_budget_remaining`` is the pool alone."""
    u = result.usage
    pools = [result.user_budget] if result.user_budget is not None else []
    prompt = u.student_prompt_tokens + u.teacher_prompt_tokens
    completion = u.student_tokens + u.teacher_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        relay=RelayUsageInfo(
            **dict(u),
            budget_remaining=_remaining(result.budget, *pools),
            user_budget_remaining=_remaining(*pools) if pools else None,
        ),
    )


def choice_relay(result: RelayResult) -> ChoiceRelay:
    return ChoiceRelay(
        finish_reason=result.finish_reason,
        finished_by=result.finished_by,
        spans=result.spans,
        events=result.events,
    )


def _calls_out(parsed: ParsedAnswer) -> list[ToolCallOut]:
    """The answer's calls in OpenAI's shape; a malformed one carries its raw text as
    ``arguments`` (OpenAI's arguments are text a client parses, and may be invalid JSON)."""
    calls = [
        ToolCallOut(
            id=c["id"], function={"name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}
        )
        for c in parsed.tool_calls
    ]
    calls += [
        ToolCallOut(id=c["id"] or "", function={"name": c["name"] or "", "arguments": c["args"] or ""})
        for c in parsed.invalid_tool_calls
    ]
    return calls


def chat_completion(
    result: RelayResult, *, rid: str, created: int, model: str, tools: ToolAnswer | None = None
) -> ChatCompletion:
    """The answer as a chat completion; given tools, its calls parsed out of the text
    (``ToolChoiceUnmet`` when ``tool_choice`` required one the answer did not make)."""
    relay = choice_relay(result)
    message = AssistantMessage(content=result.text)
    finish = openai_finish_reason(result.finish_reason)
    if tools is not None:
        tools.stream.feed(result.text)
        tools.stream.finish()
        parsed = tools.checked()
        if calls := _calls_out(parsed):
            message = AssistantMessage(content=parsed.content or None, tool_calls=calls)
            finish = "tool_calls"
            relay.invalid_tool_calls = parsed.invalid_tool_calls or None
        else:
            message = AssistantMessage(content=parsed.content)
    choice = ChatChoice(message=message, finish_reason=finish, relay=relay)
    return ChatCompletion(id=rid, created=created, model=model, choices=[choice], usage=usage_of(result))


def text_completion(result: RelayResult, *, rid: str, created: int, model: str) -> Completion:
    choice = CompletionChoice(
        text=result.text,
        finish_reason=openai_finish_reason(result.finish_reason),
        relay=choice_relay(result),
    )
    return Completion(id=rid, created=created, model=model, choices=[choice], usage=usage_of(result))


class StreamRenderer:
    """Turns the items of a relay run into SSE text, in order, and sees the end of the stream.

    ``on_result`` gets the finished answer; ``on_error`` maps a failure to the error event sent
    (the HTTP status is already 200 once the stream started).
    """

    def __init__(
        self,
        encoder: ChunkEncoder,
        *,
        on_result: Callable[[RelayResult], None],
        on_error: Callable[[BaseException], APIError],
        tools: ToolAnswer | None = None,
    ) -> None:
        self.encoder = encoder
        self.on_result = on_result
        self.on_error = on_error
        self.tools = tools
        self._called = False
        self._opened = not encoder.chat  # a chat stream opens with the assistant role
        self.error: APIError | None = None

    def __call__(self, items: list[Item]) -> tuple[str, bool]:
        enc = self.encoder
        parts: list[str] = []
        if not self._opened:
            parts.append(enc.role())
            self._opened = True
        for item in items:
            if isinstance(item, RelayDelta):
                if self.tools is None:
                    parts.append(enc.delta(item.text, item.source))
                else:
                    parts.extend(self._events(self.tools.stream.feed(item.text), item.source))
            elif isinstance(item, End):
                parts.extend(self._end(item))
                return "".join(parts), True
        return "".join(parts), False

    def _events(self, events: list[str | CallPiece], source: str) -> list[str]:
        """Text and tool-call pieces as chunks (OpenAI's ``tool_calls`` deltas)."""
        parts = []
        for event in events:
            if isinstance(event, str):
                parts.append(self.encoder.delta(event, source))
            else:
                self._called = True
                parts.append(self.encoder.tool_call(event, source))
        return parts

    def _end(self, end: End) -> list[str]:
        enc = self.encoder
        parts: list[str] = []
        relay: dict[str, Any] = {}
        error = end.error
        if error is None and end.result is not None and self.tools is not None:
            parts += self._events(self.tools.stream.finish(), end.result.finished_by or "student")
            try:
                parsed = self.tools.checked()
            except ToolChoiceUnmet as exc:
                error = exc
            else:
                if parsed.invalid_tool_calls:
                    relay["invalid_tool_calls"] = parsed.invalid_tool_calls
        if error is not None or end.result is None:
            self.error = self.on_error(error or RuntimeError("the relay ended without a result"))
            return [*parts, enc.error(self.error), DONE]
        result = end.result
        self.on_result(result)
        relay = {
            "source": result.finished_by or "student",
            "finish_reason": result.finish_reason,
            "events": [e.model_dump() for e in result.events],
            **relay,
        }
        finish = "tool_calls" if self._called else openai_finish_reason(result.finish_reason)
        parts.append(enc.finish(finish, relay))
        if enc.include_usage:
            parts.append(enc.usage(usage_of(result).model_dump()))
        parts.append(DONE)
        return parts
