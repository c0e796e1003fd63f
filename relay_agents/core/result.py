"""One relayed answer as the library reports it, everywhere: the Python API's result, the
``response_metadata["relay"]`` of ``ChatRelay``'s messages (as a plain dict, so any
checkpointer stores it), the server's responses (embedded, as vLLM embeds its usage model)
and the tutor."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from relay_agents.core.config import Budget
from relay_agents.core.grants import NOTHING, ScopeKind, Spend, exhausted, remaining

Source = Literal["student", "teacher"]


class Span(BaseModel):
    """A run of answer text written by one model."""

    source: Source
    text: str
    tokens: int


class RelayUsage(BaseModel):
    student_tokens: int = 0
    teacher_tokens: int = 0
    teacher_calls: int = 0
    student_discarded_tokens: int = 0
    """Student tokens generated after a policy's cut: paid for, not in the answer."""
    call_ratio: float = 0.0
    cost_usd: float = 0.0
    student_prompt_tokens: int = 0
    teacher_prompt_tokens: int = 0
    student_cost_usd: float = 0.0
    teacher_cost_usd: float = 0.0


class RelayEvent(BaseModel):
    """A declined, cut, ignored or malformed call, or a teacher failure, in words."""

    kind: str
    message: str
    requested: int | None = None
    granted: int | None = None
    reason: str | None = None
    scope: ScopeKind | None = None
    """The budget that declined or cut the call."""

    def __str__(self) -> str:
        return self.message


class BudgetState(BaseModel):
    """A budget's limits, what was spent and what remains (``None``: unlimited)."""

    max_teacher_tokens: int | None = None
    max_teacher_calls: int | None = None
    max_cost_usd: float | None = None
    spent_teacher_tokens: int = 0
    spent_teacher_calls: int = 0
    spent_cost_usd: float = 0.0
    held_teacher_tokens: int = 0
    """Tokens held by calls still in flight: not spent yet, not free either."""
    held_teacher_calls: int = 0
    held_cost_usd: float = 0.0
    remaining_teacher_tokens: int | None = None
    remaining_teacher_calls: int | None = None
    remaining_cost_usd: float | None = None
    exhausted: bool = False

    @classmethod
    def of(cls, budget: Budget, spent: Spend, held: Spend = NOTHING) -> BudgetState:
        """``remaining_*`` is what a new call could be granted: less what is spent and held."""
        return cls(
            max_teacher_tokens=budget.max_teacher_tokens,
            max_teacher_calls=budget.max_teacher_calls,
            max_cost_usd=budget.max_cost_usd,
            spent_teacher_tokens=spent.teacher_tokens,
            spent_teacher_calls=spent.teacher_calls,
            spent_cost_usd=spent.cost_usd,
            held_teacher_tokens=held.teacher_tokens,
            held_teacher_calls=held.teacher_calls,
            held_cost_usd=held.cost_usd,
            **remaining(budget, spent, held),
            exhausted=exhausted(budget, spent),
        )


class RelayRecord(BaseModel):
    """The relay's account of one answer: who wrote what, usage, events and budgets."""

    spans: list[Span]
    usage: RelayUsage
    finish_reason: str | None
    finished_by: Source | None = None
    events: list[RelayEvent] = Field(default_factory=list)
    budget: BudgetState = Field(default_factory=BudgetState)
    """The conversation's budget after this answer."""
    user_budget: BudgetState | None = None
    """The user's pooled budget after this answer, when the call named a ``user``."""
    turn_budget: BudgetState | None = None
    """The answer's own budget, when ``turn_budget`` sets limits."""
    student_model: str | None = None
    teacher_model: str | None = None
    enable_thinking: bool = False
    """The thinking mode the prompts were rendered with (results differ with it)."""
    preset: str | None = None
    """The preset the config came from (``published``), if any."""
