"""What a budget still allows, as pure arithmetic (no I/O): shared by the answer state
machine (per-turn and in-thread limits) and by the budget stores (per conversation and
per user pool)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypedDict

from relay_agents.core.config import Budget
from relay_agents.protocol import CallGrant, grant_call

ScopeKind = Literal["turn", "conversation", "user"]


class SpendDict(TypedDict):
    teacher_tokens: int
    teacher_calls: int
    cost_usd: float


@dataclass(frozen=True)
class Spend:
    """Teacher spend charged to one budget."""

    teacher_tokens: int = 0
    teacher_calls: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(
            self.teacher_tokens + other.teacher_tokens,
            self.teacher_calls + other.teacher_calls,
            self.cost_usd + other.cost_usd,
        )

    def as_dict(self) -> SpendDict:
        return {
            "teacher_tokens": self.teacher_tokens,
            "teacher_calls": self.teacher_calls,
            "cost_usd": self.cost_usd,
        }

    @classmethod
    def from_dict(cls, data: SpendDict) -> Spend:
        return cls(data["teacher_tokens"], data["teacher_calls"], data["cost_usd"])


@dataclass(frozen=True)
class CallQuote:
    """What one teacher call may cost: ``tokens`` wanted, the estimated prompt cost, and the
    price of each output token (USD)."""

    tokens: int
    prompt_cost_usd: float = 0.0
    output_price_usd: float = 0.0

    def cost(self, tokens: int) -> float:
        return self.prompt_cost_usd + tokens * self.output_price_usd


def has_limits(budget: Budget | None) -> bool:
    return budget is not None and any(
        v is not None for v in (budget.max_teacher_tokens, budget.max_teacher_calls, budget.max_cost_usd)
    )


def grant_within(budget: Budget, used: Spend, quote: CallQuote) -> CallGrant:
    """Cut ``quote.tokens`` to what ``budget`` allows after ``used`` (spent plus held).

    The cost limit is turned into output tokens after the prompt's estimated cost, rounded
    down, so a granted call never costs more than remains.
    """
    cost_tokens: int | None = None
    if budget.max_cost_usd is not None:
        left = budget.max_cost_usd - used.cost_usd - quote.prompt_cost_usd
        if left <= 0:
            cost_tokens = 0
        elif quote.output_price_usd > 0:
            cost_tokens = math.floor(left / quote.output_price_usd + 1e-9)
    return grant_call(
        quote.tokens,
        max_call_tokens=None,
        answer_tokens_left=quote.tokens,
        budget_tokens_left=None
        if budget.max_teacher_tokens is None
        else budget.max_teacher_tokens - used.teacher_tokens,
        budget_calls_left=None
        if budget.max_teacher_calls is None
        else budget.max_teacher_calls - used.teacher_calls,
        budget_cost_tokens_left=cost_tokens,
        calls_suppressed=False,
    )


@dataclass(frozen=True)
class ScopedGrant:
    """A grant across several budgets, and the budget that limited it (if any)."""

    requested: int
    granted: int
    limited_by: str | None = None
    declined: str | None = None
    scope: ScopeKind | None = None


def grant_across(quote: CallQuote, budgets: list[tuple[ScopeKind, Budget, Spend]]) -> ScopedGrant:
    """The most every budget allows together; the first budget to decline or cut names the scope."""
    best = ScopedGrant(quote.tokens, quote.tokens)
    for scope, budget, used in budgets:
        grant = grant_within(budget, used, quote)
        if grant.declined:
            return ScopedGrant(quote.tokens, 0, grant.limited_by, grant.declined, scope)
        if grant.granted < best.granted:
            best = ScopedGrant(quote.tokens, grant.granted, grant.limited_by, None, scope)
    return best


def remaining(budget: Budget, spent: Spend) -> dict[str, float | int | None]:
    return {
        "remaining_teacher_tokens": None
        if budget.max_teacher_tokens is None
        else budget.max_teacher_tokens - spent.teacher_tokens,
        "remaining_teacher_calls": None
        if budget.max_teacher_calls is None
        else budget.max_teacher_calls - spent.teacher_calls,
        "remaining_cost_usd": None if budget.max_cost_usd is None else budget.max_cost_usd - spent.cost_usd,
    }


def exhausted(budget: Budget, spent: Spend) -> bool:
    return any(v is not None and v <= 0 for v in remaining(budget, spent).values())
