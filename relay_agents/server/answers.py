"""Relay results as OpenAI answer objects: whole responses, and the chunks of a stream."""

from __future__ import annotations

from collections.abc import Callable

from relay_agents.api import BudgetState, RelayDelta, RelayResult
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


def chat_completion(result: RelayResult, *, rid: str, created: int, model: str) -> ChatCompletion:
    choice = ChatChoice(
        message=AssistantMessage(content=result.text),
        finish_reason=openai_finish_reason(result.finish_reason),
        relay=choice_relay(result),
    )
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
    ) -> None:
        self.encoder = encoder
        self.on_result = on_result
        self.on_error = on_error
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
                parts.append(enc.delta(item.text, item.source))
            elif isinstance(item, End):
                parts.extend(self._end(item))
                return "".join(parts), True
        return "".join(parts), False

    def _end(self, end: End) -> list[str]:
        enc = self.encoder
        if end.error is not None or end.result is None:
            self.error = self.on_error(end.error or RuntimeError("the relay ended without a result"))
            return [enc.error(self.error), DONE]
        result = end.result
        self.on_result(result)
        relay = {
            "source": result.finished_by or "student",
            "finish_reason": result.finish_reason,
            "events": [e.model_dump() for e in result.events],
        }
        parts = [enc.finish(openai_finish_reason(result.finish_reason), relay)]
        if enc.include_usage:
            parts.append(enc.usage(usage_of(result).model_dump()))
        parts.append(DONE)
        return parts
