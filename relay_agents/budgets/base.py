"""Budget stores: teacher spend per conversation and per user pool, outside the graph's state.

A teacher call first *reserves* its granted tokens (and their cost) in every budget it draws
on, in one transaction, so concurrent calls never grant the same remainder twice; when the
teacher's reply is in, the call is *settled*: the hold is dropped and only what was actually
received is charged. A hold whose process died expires after its time to live (the relay's
``hold_ttl_s``; ``reservation_ttl_s`` for callers that give none).

The stores are synchronous (a transaction is a few hundred microseconds on loopback); the
async methods run them in worker threads so the event loop never blocks. A thread cannot be
cancelled, so a cancelled caller must not lose what its thread does: :meth:`areserve` releases
the hold its thread took for a caller cancelled meanwhile, and :meth:`asettle` always finishes.
"""

from __future__ import annotations

import asyncio
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from relay_agents.core.config import Budget
from relay_agents.core.grants import Balance, BudgetLimit, CallQuote, Grant, ScopeKind, Spend, grant


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
    def _reserve(self, scopes: Sequence[Scope], quote: CallQuote, reservation_id: str, ttl_s: float) -> Grant:
        """In one transaction: read spend and live holds of ``scopes``, decide, hold the grant."""

    @abstractmethod
    def _settle(self, reservation_id: str, keys: Sequence[str], spend: Spend) -> None:
        """In one transaction: drop the hold and charge ``spend`` to every key."""

    @abstractmethod
    def balances(self, keys: Sequence[str]) -> dict[str, Balance]:
        """What each key has been charged (settled calls) and what its live holds (calls in
        flight, not expired) keep."""

    @abstractmethod
    def close(self) -> None: ...

    def reserve(
        self, scopes: Sequence[Scope], quote: CallQuote, *, ttl_s: float | None = None
    ) -> Reservation:
        """Hold what ``quote`` may be granted in every scope; the hold expires after ``ttl_s``
        (default ``reservation_ttl_s``) unless settled before."""
        return self._reserved(scopes, quote, uuid.uuid4().hex, ttl_s)

    def _reserved(
        self, scopes: Sequence[Scope], quote: CallQuote, reservation_id: str, ttl_s: float | None
    ) -> Reservation:
        grant = self._reserve(
            scopes, quote, reservation_id, self.reservation_ttl_s if ttl_s is None else ttl_s
        )
        held = grant.granted > 0
        return Reservation(grant, reservation_id if held else None, tuple(s.key for s in scopes))

    def settle(self, reservation_id: str, keys: Sequence[str], spend: Spend) -> None:
        self._settle(reservation_id, keys, spend)

    def spent(self, keys: Sequence[str]) -> dict[str, Spend]:
        """What each key has been charged (settled calls only)."""
        return {key: balance.spent for key, balance in self.balances(keys).items()}

    def held(self, keys: Sequence[str]) -> dict[str, Spend]:
        """What the live holds of each key keep."""
        return {key: balance.held for key, balance in self.balances(keys).items()}

    async def areserve(
        self, scopes: Sequence[Scope], quote: CallQuote, *, ttl_s: float | None = None
    ) -> Reservation:
        """:meth:`reserve` in a worker thread. A caller cancelled meanwhile gets no reservation,
        so the hold the thread may still take is released before the cancellation goes on."""
        reservation_id = uuid.uuid4().hex
        keys = [s.key for s in scopes]
        reserving = asyncio.ensure_future(
            asyncio.to_thread(self._reserved, scopes, quote, reservation_id, ttl_s)
        )
        try:
            return await asyncio.shield(reserving)
        except asyncio.CancelledError:
            await asyncio.shield(self._release_when_reserved(reserving, reservation_id, keys))
            raise

    async def _release_when_reserved(
        self, reserving: asyncio.Future[Reservation], reservation_id: str, keys: Sequence[str]
    ) -> None:
        try:
            reservation = await reserving
        except Exception:
            return  # a reservation that failed holds nothing
        if reservation.id is not None:
            await asyncio.to_thread(self._settle, reservation_id, keys, Spend())

    async def asettle(self, reservation_id: str, keys: Sequence[str], spend: Spend) -> None:
        """:meth:`settle` in a worker thread, finished even when the caller is cancelled (a second
        cancellation stops the wait, never the settle)."""
        settling = asyncio.ensure_future(asyncio.to_thread(self.settle, reservation_id, keys, spend))
        try:
            await asyncio.shield(settling)
        except asyncio.CancelledError:
            await asyncio.shield(settling)
            raise

    async def aspent(self, keys: Sequence[str]) -> dict[str, Spend]:
        return await asyncio.to_thread(self.spent, keys)

    async def abalances(self, keys: Sequence[str]) -> dict[str, Balance]:
        return await asyncio.to_thread(self.balances, keys)

    @staticmethod
    def _decide(
        scopes: Sequence[Scope], quote: CallQuote, spent: dict[str, Spend], held: dict[str, Spend]
    ) -> Grant:
        limits = []
        for s in scopes:
            scope_held = held.get(s.key, Spend())
            limits.append(BudgetLimit(s.kind, s.budget, spent.get(s.key, Spend()) + scope_held, scope_held))
        return grant(quote, limits)
