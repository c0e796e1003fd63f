"""The budget store for several processes or machines: PostgreSQL through psycopg 3.

A reservation locks the spend rows of its scopes (``SELECT ... FOR UPDATE``, in key order so
two reservations never deadlock), sums their live holds, decides and inserts its own hold, all
in one transaction: concurrent reservations on the same scope queue on the row lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from relay_agents.budgets.base import BudgetStore, Scope
from relay_agents.core.grants import Balance, CallQuote, Grant, Spend

try:
    from psycopg import Connection
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the PostgreSQL budget store needs psycopg: pip install 'relay-agents[postgres]'"
    ) from exc

_SCHEMA = """
CREATE TABLE IF NOT EXISTS relay_budget_spend (
    scope TEXT PRIMARY KEY,
    teacher_tokens BIGINT NOT NULL DEFAULT 0,
    teacher_calls BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS relay_budget_holds (
    id TEXT NOT NULL,
    scope TEXT NOT NULL,
    teacher_tokens BIGINT NOT NULL,
    teacher_calls BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX IF NOT EXISTS relay_budget_holds_id ON relay_budget_holds (id);
"""


class PostgresBudgetStore(BudgetStore):
    """Budgets in PostgreSQL (a pooled connection per worker thread)."""

    def __init__(self, conninfo: str, *, reservation_ttl_s: float = 600.0, max_connections: int = 8):
        super().__init__(reservation_ttl_s=reservation_ttl_s)
        # Opened on first use, which the async methods run in a worker thread: building a
        # store inside a graph node must not block the event loop on connecting.
        self._pool = ConnectionPool(
            conninfo, min_size=1, max_size=max_connections, open=False, kwargs={"autocommit": True}
        )
        self._opened = False
        self._open_lock = threading.Lock()

    @property
    def pool(self) -> ConnectionPool:
        if not self._opened:
            with self._open_lock:
                if not self._opened:
                    self._pool.open(wait=True)
                    with self._pool.connection() as conn, conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(hashtext('relay_budget_schema'))")
                        conn.execute(_SCHEMA)
                    self._opened = True
        return self._pool

    @staticmethod
    def _held(conn: Connection[Any], keys: Sequence[str], now: float) -> dict[str, Spend]:
        held = {key: Spend() for key in keys}
        for scope, tokens, calls, cost in conn.execute(
            "SELECT scope, SUM(teacher_tokens), SUM(teacher_calls), SUM(cost_usd) "
            "FROM relay_budget_holds WHERE scope = ANY(%s) AND expires_at >= %s GROUP BY scope",
            (list(keys), now),
        ):
            held[scope] = Spend(int(tokens), int(calls), float(cost))
        return held

    def _reserve(self, scopes: Sequence[Scope], quote: CallQuote, reservation_id: str, ttl_s: float) -> Grant:
        keys = sorted({s.key for s in scopes})
        now = time.time()
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO relay_budget_spend (scope) SELECT unnest(%s::text[]) ORDER BY 1 "
                "ON CONFLICT (scope) DO NOTHING",
                (keys,),
            )
            spent: dict[str, Spend] = {}
            for scope, tokens, calls, cost in conn.execute(
                "SELECT scope, teacher_tokens, teacher_calls, cost_usd FROM relay_budget_spend "
                "WHERE scope = ANY(%s) ORDER BY scope FOR UPDATE",
                (keys,),
            ):
                spent[scope] = Spend(tokens, calls, cost)
            conn.execute(
                "DELETE FROM relay_budget_holds WHERE scope = ANY(%s) AND expires_at < %s", (keys, now)
            )
            grant = self._decide(scopes, quote, spent, self._held(conn, keys, now))
            if grant.granted > 0:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO relay_budget_holds VALUES (%s, %s, %s, 1, %s, %s)",
                        [
                            (
                                reservation_id,
                                key,
                                grant.granted,
                                quote.cost(grant.granted),
                                now + ttl_s,
                            )
                            for key in keys
                        ],
                    )
        return grant

    def _settle(self, reservation_id: str, keys: Sequence[str], spend: Spend) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("DELETE FROM relay_budget_holds WHERE id = %s", (reservation_id,))
            if spend.teacher_tokens or spend.teacher_calls or spend.cost_usd:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO relay_budget_spend VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (scope) DO UPDATE SET "
                        "teacher_tokens = relay_budget_spend.teacher_tokens + excluded.teacher_tokens, "
                        "teacher_calls = relay_budget_spend.teacher_calls + excluded.teacher_calls, "
                        "cost_usd = relay_budget_spend.cost_usd + excluded.cost_usd",
                        [
                            (key, spend.teacher_tokens, spend.teacher_calls, spend.cost_usd)
                            for key in sorted(keys)
                        ],
                    )

    def balances(self, keys: Sequence[str]) -> dict[str, Balance]:
        if not keys:
            return {}
        spent = {key: Spend() for key in keys}
        with self.pool.connection() as conn:
            for scope, tokens, calls, cost in conn.execute(
                "SELECT scope, teacher_tokens, teacher_calls, cost_usd FROM relay_budget_spend "
                "WHERE scope = ANY(%s)",
                (list(keys),),
            ):
                spent[scope] = Spend(tokens, calls, cost)
            held = self._held(conn, keys, time.time())
        return {key: Balance(spent[key], held[key]) for key in keys}

    def close(self) -> None:
        self._pool.close()
