"""Whether a teacher call may start, and how many tokens it may write: one decision.

Every limit is one entry of the list :func:`grant` walks, in order: a closed gate
(:class:`Blocked`), a token cap (:class:`TokenCap`: the call cap, the answer's tokens left, the
room in the teacher's context) or a budget (:class:`BudgetLimit`: the answer's, the
conversation's, the user's pool). The answer
state machine and the budget stores build their entries and call the same function, so a
call is cut or declined for the same reason wherever it is decided.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypedDict

from relay_agents.core.config import Budget

ScopeKind = Literal["turn", "conversation", "user"]
DeclineReason = Literal[
    "calls_suppressed",
    "budget_tokens",
    "budget_calls",
    "budget_cost",
    "answer_tokens",
    "target_share",
    "min_gap",
    "context_full",
]


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


#: No spend: the default of what is held.
NOTHING = Spend()


@dataclass(frozen=True)
class Balance:
    """One budget's standing in a store: what settled calls were charged, and what the calls
    still in flight hold."""

    spent: Spend = NOTHING
    held: Spend = NOTHING


@dataclass(frozen=True)
class CallQuote:
    """What one teacher call may cost: ``tokens`` wanted, the estimated prompt cost, and the
    price of each output token (USD)."""

    tokens: int
    prompt_cost_usd: float = 0.0
    output_price_usd: float = 0.0

    def cost(self, tokens: int) -> float:
        return self.prompt_cost_usd + tokens * self.output_price_usd


@dataclass(frozen=True, slots=True)
class Grant:
    """How many tokens a call may write, the limit that cut it and that limit's scope, or why
    it may write none."""

    requested: int
    granted: int
    limited_by: str | None = None
    declined: DeclineReason | None = None
    scope: ScopeKind | None = None
    held: Spend = NOTHING
    """What calls in flight hold in the budget that declined the call."""


@dataclass(frozen=True, slots=True)
class Blocked:
    """A closed gate: the call is declined whatever it asks (calls blocked, share reached, gap)."""

    reason: DeclineReason


@dataclass(frozen=True, slots=True)
class TokenCap:
    """At most ``tokens`` (``None``: no cap); ``name`` is the limit, as events report it."""

    name: Literal["max_call_tokens", "answer_tokens", "context_tokens"]
    tokens: int | None

    @property
    def exhausted(self) -> DeclineReason:
        """Why a call is declined when this cap leaves nothing."""
        return "context_full" if self.name == "context_tokens" else "answer_tokens"


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    """What ``budget`` allows in ``scope`` after ``used`` (spent, plus ``held`` by other calls)."""

    scope: ScopeKind
    budget: Budget
    used: Spend
    held: Spend = NOTHING


Limit = Blocked | TokenCap | BudgetLimit


def grant(quote: CallQuote, limits: Iterable[Limit]) -> Grant:
    """Cut ``quote.tokens`` to every limit in order.

    The first limit that leaves nothing declines the call and names the reason; otherwise
    the smallest cap wins, and the first limit that reached it is the one reported. A cost
    limit is turned into output tokens after the prompt's estimated cost, rounded down, so a
    granted call never costs more than remains.
    """
    requested = granted = quote.tokens
    limited_by: str | None = None
    scope: ScopeKind | None = None
    for limit in limits:
        if isinstance(limit, Blocked):
            return Grant(requested, 0, None, limit.reason)
        if isinstance(limit, TokenCap):
            caps: list[tuple[DeclineReason, int | None]] = [(limit.exhausted, limit.tokens)]
            names = [limit.name]
            limit_scope: ScopeKind | None = None
            held = NOTHING
        else:
            budget, used = limit.budget, limit.used
            if budget.max_teacher_calls is not None and budget.max_teacher_calls - used.teacher_calls <= 0:
                return Grant(requested, 0, None, "budget_calls", limit.scope, limit.held)
            tokens_left = (
                None if budget.max_teacher_tokens is None else budget.max_teacher_tokens - used.teacher_tokens
            )
            caps = [("budget_tokens", tokens_left), ("budget_cost", _cost_tokens(budget, used, quote))]
            names = ["budget_tokens", "budget_cost"]
            limit_scope, held = limit.scope, limit.held
        for (reason, cap), name in zip(caps, names, strict=True):
            if cap is not None and cap < granted:
                granted, limited_by, scope = max(cap, 0), name, limit_scope
                if granted == 0:
                    return Grant(requested, 0, name, reason, limit_scope, held)
    return Grant(requested, granted, limited_by, None, scope)


def _cost_tokens(budget: Budget, used: Spend, quote: CallQuote) -> int | None:
    """Output tokens the cost budget still pays for after the prompt (``None``: no cost limit)."""
    if budget.max_cost_usd is None:
        return None
    left = budget.max_cost_usd - used.cost_usd - quote.prompt_cost_usd
    if left <= 0:
        return 0
    if quote.output_price_usd > 0:
        return math.floor(left / quote.output_price_usd + 1e-9)
    return None


def has_limits(budget: Budget | None) -> bool:
    return budget is not None and any(
        v is not None for v in (budget.max_teacher_tokens, budget.max_teacher_calls, budget.max_cost_usd)
    )


def remaining(budget: Budget, spent: Spend, held: Spend = NOTHING) -> dict[str, float | int | None]:
    """What a new call could still be granted: the limits less ``spent`` and less what calls in
    flight ``held``."""
    used = spent + held
    return {
        "remaining_teacher_tokens": None
        if budget.max_teacher_tokens is None
        else budget.max_teacher_tokens - used.teacher_tokens,
        "remaining_teacher_calls": None
        if budget.max_teacher_calls is None
        else budget.max_teacher_calls - used.teacher_calls,
        "remaining_cost_usd": None if budget.max_cost_usd is None else budget.max_cost_usd - used.cost_usd,
    }


def exhausted(budget: Budget, spent: Spend) -> bool:
    return any(v is not None and v <= 0 for v in remaining(budget, spent).values())
