"""The budget stores themselves: reserve-then-settle on a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from relay_agents import Budget
from relay_agents.budgets import (
    BudgetStore,
    CallQuote,
    Scope,
    Spend,
    SQLiteBudgetStore,
    open_budget_store,
)
from relay_agents.budgets.postgres import PostgresBudgetStore


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'budgets.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[BudgetStore]:
    store = _open(store_url)
    yield store
    store.close()


def _open(url: str, **kw: float) -> BudgetStore:
    if url.startswith("postgresql://"):
        return PostgresBudgetStore(url, **kw)
    return SQLiteBudgetStore(Path(url.removeprefix("sqlite:///")), **kw)


def conversation(budget: Budget) -> Scope:
    return Scope("conversation", f"conversation:{uuid.uuid4().hex}", budget)


def test_a_call_is_cut_to_what_remains_then_declined(store: BudgetStore) -> None:
    scope = conversation(Budget(max_teacher_tokens=10))
    first = store.reserve([scope], CallQuote(8))
    assert (first.grant.granted, first.grant.declined) == (8, None)
    assert first.id is not None
    # The hold counts before anything is settled.
    second = store.reserve([scope], CallQuote(8))
    assert (second.grant.granted, second.grant.limited_by, second.grant.scope) == (
        2,
        "budget_tokens",
        "conversation",
    )
    assert second.id is not None
    third = store.reserve([scope], CallQuote(8))
    assert (third.grant.granted, third.grant.declined, third.id) == (0, "budget_tokens", None)
    assert store.spent([scope.key])[scope.key] == Spend()


def test_settle_charges_only_what_was_received(store: BudgetStore) -> None:
    scope = conversation(Budget(max_teacher_tokens=10))
    held = store.reserve([scope], CallQuote(8))
    assert held.id is not None
    store.settle(held.id, held.keys, Spend(3, 1, 0.5))
    assert store.spent([scope.key])[scope.key] == Spend(3, 1, 0.5)
    # The unused 5 tokens of the hold are free again.
    assert store.reserve([scope], CallQuote(8)).grant.granted == 7


def test_a_released_hold_charges_nothing(store: BudgetStore) -> None:
    scope = conversation(Budget(max_teacher_calls=1))
    held = store.reserve([scope], CallQuote(5))
    assert held.id is not None
    assert store.reserve([scope], CallQuote(5)).grant.declined == "budget_calls"
    store.settle(held.id, held.keys, Spend())
    assert store.spent([scope.key])[scope.key] == Spend()
    assert store.reserve([scope], CallQuote(5)).grant.granted == 5


def test_the_cost_budget_is_turned_into_tokens(store: BudgetStore) -> None:
    scope = conversation(Budget(max_cost_usd=0.01))
    # 0.004 for the prompt leaves 0.006, at 0.001 per token: 6 tokens.
    quote = CallQuote(20, prompt_cost_usd=0.004, output_price_usd=0.001)
    held = store.reserve([scope], quote)
    assert (held.grant.granted, held.grant.limited_by) == (6, "budget_cost")
    assert held.id is not None
    store.settle(held.id, held.keys, Spend(6, 1, 0.0099))
    assert store.reserve([scope], quote).grant.declined == "budget_cost"


def test_a_user_pool_is_shared_by_its_conversations(store: BudgetStore) -> None:
    user = Scope("user", f"user:{uuid.uuid4().hex}", Budget(max_teacher_tokens=12))
    one, two = conversation(Budget(max_teacher_tokens=100)), conversation(Budget(max_teacher_tokens=100))
    a = store.reserve([one, user], CallQuote(8))
    b = store.reserve([two, user], CallQuote(8))
    assert (a.grant.granted, b.grant.granted, b.grant.scope) == (8, 4, "user")
    assert a.id is not None and b.id is not None
    store.settle(a.id, a.keys, Spend(8, 1, 0))
    store.settle(b.id, b.keys, Spend(4, 1, 0))
    spent = store.spent([one.key, two.key, user.key])
    assert (spent[one.key].teacher_tokens, spent[two.key].teacher_tokens, spent[user.key].teacher_tokens) == (
        8,
        4,
        12,
    )
    declined = store.reserve([one, user], CallQuote(1)).grant
    assert (declined.declined, declined.scope) == ("budget_tokens", "user")


def test_an_expired_hold_is_released(store_url: str) -> None:
    store = _open(store_url, reservation_ttl_s=0.2)
    try:
        scope = conversation(Budget(max_teacher_tokens=5))
        assert store.reserve([scope], CallQuote(5)).grant.granted == 5
        assert store.reserve([scope], CallQuote(5)).grant.declined == "budget_tokens"
        time.sleep(0.3)  # the process holding it died: its hold lapses
        assert store.reserve([scope], CallQuote(5)).grant.granted == 5
    finally:
        store.close()


async def test_64_concurrent_reservations_never_grant_more_than_the_budget(store: BudgetStore) -> None:
    scope = conversation(Budget(max_teacher_tokens=100, max_teacher_calls=40))
    granted: list[int] = []

    async def call(i: int) -> int | None:
        held = await store.areserve([scope], CallQuote(7))
        if held.id is None:
            return None
        granted.append(held.grant.granted)
        await asyncio.sleep(0.01 * (i % 3))
        got = held.grant.granted - i % 2  # some replies come back short
        await store.asettle(held.id, held.keys, Spend(got, 1, 0.0))
        return got

    got = [g for g in await asyncio.gather(*(call(i) for i in range(64))) if g is not None]
    spent = (await store.aspent([scope.key]))[scope.key]
    assert spent.teacher_tokens == sum(got) <= 100
    assert spent.teacher_calls == len(got) <= 40
    # Demand (64 x 7) far exceeds the budget, so every token was granted at some point.
    assert sum(granted) >= 100
    # Settling returned what the short replies left unused: the next call gets exactly that.
    left = 100 - spent.teacher_tokens
    after = (await store.areserve([scope], CallQuote(7))).grant
    assert (after.granted, after.declined) == ((min(7, left), None) if left else (0, "budget_tokens"))


def _reserve_in_process(url: str, key: str, n: int) -> int:
    store = _open(url)
    try:
        total = 0
        for _ in range(n):
            held = store.reserve([Scope("conversation", key, Budget(max_teacher_tokens=150))], CallQuote(4))
            if held.id is not None:
                store.settle(held.id, held.keys, Spend(held.grant.granted, 1, 0.0))
                total += held.grant.granted
        return total
    finally:
        store.close()


def test_processes_share_one_budget(store_url: str) -> None:
    key = f"conversation:{uuid.uuid4().hex}"
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        totals = list(pool.map(_reserve_in_process, [store_url] * 4, [key] * 4, [16] * 4))
    store = _open(store_url)
    try:
        assert sum(totals) == store.spent([key])[key].teacher_tokens == 150
    finally:
        store.close()


def test_the_sqlite_store_uses_wal_mode(tmp_path: Path) -> None:
    store = SQLiteBudgetStore(tmp_path / "state" / "b.sqlite")
    assert not (tmp_path / "state").exists()  # nothing is opened before first use
    store.spent(["conversation:x"])
    store.close()
    with sqlite3.connect(tmp_path / "state" / "b.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_open_budget_store_reads_urls(tmp_path: Path, postgres_url: str) -> None:
    store = open_budget_store(f"sqlite:///{tmp_path / 'a.sqlite'}")
    assert isinstance(store, SQLiteBudgetStore)
    store.spent(["conversation:x"])
    assert open_budget_store(str(tmp_path / "b.sqlite")) is open_budget_store(str(tmp_path / "b.sqlite"))
    assert isinstance(open_budget_store(postgres_url), PostgresBudgetStore)
    assert (tmp_path / "a.sqlite").exists()
    with pytest.raises(ValueError, match="unsupported budget store"):
        open_budget_store("redis://localhost")
