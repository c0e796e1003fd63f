"""Budget stores: teacher spend per conversation and per user pool, outside the graph's state.

A teacher call first *reserves* its granted tokens (and their cost) in every budget it draws
on, in one transaction, so concurrent calls never grant the same remainder twice; when the
teacher's reply is in, the call is *settled*: the hold is dropped and only what was actually
received is charged. A hold whose process died expires after ``reservation_ttl_s``.

The stores are synchronous (a transaction is a few hundred microseconds on loopback); the
async methods run them in worker threads so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from relay_agents.core.config import Budget
from relay_agents.core.grants import BudgetLimit, CallQuote, Grant, ScopeKind, Spend, grant


class BudgetExceeded(RuntimeError):
    """A teacher call was declined because a budget is spent (``on_budget_exhausted="raise"``)."""

    def __init__(self, message: str, *, scope: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.scope = scope
        self.reason = reason


@dataclass(frozen=True)
class Scope:
    """One budget a call draws on: its kind, its key in the store, and its limits."""

    kind: ScopeKind
    key: str
    budget: Budget


@dataclass(frozen=True)
class Reservation:
    """The outcome of :meth:`BudgetStore.reserve`; ``id`` is None when nothing was held."""

    grant: Grant
    id: str | None
    keys: tuple[str, ...]


def conversation_key(conversation_id: str) -> str:
    """The store key of a conversation's budget (``conversation_id=`` or a LangGraph thread)."""
    return f"conversation:{conversation_id}"


def user_key(user: str) -> str:
    """The store key of a user's (or API key's) pooled budget (``user=``)."""
    return f"user:{user}"


class BudgetStore(ABC):
    """Reserve-then-settle teacher budgets keyed by scope (``conversation:<id>``, ``user:<id>``)."""

    def __init__(self, *, reservation_ttl_s: float = 600.0) -> None:
        self.reservation_ttl_s = reservation_ttl_s

    @abstractmethod
    def _reserve(self, scopes: Sequence[Scope], quote: CallQuote, reservation_id: str) -> Grant:
        """In one transaction: read spend and live holds of ``scopes``, decide, hold the grant."""

    @abstractmethod
    def _settle(self, reservation_id: str, keys: Sequence[str], spend: Spend) -> None:
        """In one transaction: drop the hold and charge ``spend`` to every key."""

    @abstractmethod
    def spent(self, keys: Sequence[str]) -> dict[str, Spend]:
        """What each key has been charged (settled calls only)."""

    @abstractmethod
    def close(self) -> None: ...

    def reserve(self, scopes: Sequence[Scope], quote: CallQuote) -> Reservation:
        reservation_id = uuid.uuid4().hex
        grant = self._reserve(scopes, quote, reservation_id)
        held = grant.granted > 0
        return Reservation(grant, reservation_id if held else None, tuple(s.key for s in scopes))

    def settle(self, reservation_id: str, keys: Sequence[str], spend: Spend) -> None:
        self._settle(reservation_id, keys, spend)

    async def areserve(self, scopes: Sequence[Scope], quote: CallQuote) -> Reservation:
        return await asyncio.to_thread(self.reserve, scopes, quote)

    async def asettle(self, reservation_id: str, keys: Sequence[str], spend: Spend) -> None:
        await asyncio.to_thread(self.settle, reservation_id, keys, spend)

    async def aspent(self, keys: Sequence[str]) -> dict[str, Spend]:
        return await asyncio.to_thread(self.spent, keys)

    @staticmethod
    def _decide(scopes: Sequence[Scope], quote: CallQuote, used: dict[str, Spend]) -> Grant:
        return grant(quote, [BudgetLimit(s.kind, s.budget, used.get(s.key, Spend())) for s in scopes])
