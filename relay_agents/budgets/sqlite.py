"""The embedded budget store: one SQLite file in WAL mode, safe across threads and processes.

Every reservation runs in a ``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock
before reading, so two reservations (in any threads or processes) never read the same
remainder.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from relay_agents.budgets.base import BudgetStore, Scope
from relay_agents.core.grants import Balance, CallQuote, Grant, Spend

_SCHEMA = """
CREATE TABLE IF NOT EXISTS relay_budget_spend (
    scope TEXT PRIMARY KEY,
    teacher_tokens INTEGER NOT NULL DEFAULT 0,
    teacher_calls INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS relay_budget_holds (
    id TEXT NOT NULL,
    scope TEXT NOT NULL,
    teacher_tokens INTEGER NOT NULL,
    teacher_calls INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (scope, id)
);
"""


class SQLiteBudgetStore(BudgetStore):
    """Budgets in a SQLite file (WAL mode; one connection per thread)."""

    def __init__(self, path: str | Path, *, reservation_ttl_s: float = 600.0, busy_timeout_s: float = 30.0):
        super().__init__(reservation_ttl_s=reservation_ttl_s)
        self.path = Path(path).expanduser()
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._ready = False

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection; the first one creates the schema. Nothing is opened
        before first use, which the async methods run in a worker thread."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous=NORMAL")
            with self._lock:
                self._connections.append(conn)
                if not self._ready:
                    conn.execute("PRAGMA journal_mode=WAL")
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    self._ready = True
            self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _balances(
        self, conn: sqlite3.Connection, keys: Sequence[str], now: float
    ) -> tuple[dict[str, Spend], dict[str, Spend]]:
        """(spent, held by live holds) of each key."""
        marks = ",".join("?" * len(keys))
        spent = {key: Spend() for key in keys}
        held = {key: Spend() for key in keys}
        queries = (
            (spent, "relay_budget_spend", "", ()),
            (held, "relay_budget_holds", "AND expires_at >= ?", (now,)),
        )
        for out, table, live, args in queries:
            rows = conn.execute(
                f"SELECT scope, SUM(teacher_tokens), SUM(teacher_calls), SUM(cost_usd) FROM {table} "
                f"WHERE scope IN ({marks}) {live} GROUP BY scope",
                (*keys, *args),
            )
            for scope, tokens, calls, cost in rows:
                out[scope] = Spend(tokens, calls, cost)
        return spent, held

    def _reserve(self, scopes: Sequence[Scope], quote: CallQuote, reservation_id: str, ttl_s: float) -> Grant:
        keys = [s.key for s in scopes]
        now = time.time()
        marks = ",".join("?" * len(keys))
        with self._transaction() as conn:
            conn.execute(
                f"DELETE FROM relay_budget_holds WHERE scope IN ({marks}) AND expires_at < ?", (*keys, now)
            )
            grant = self._decide(scopes, quote, *self._balances(conn, keys, now))
            if grant.granted > 0:
                conn.executemany(
                    "INSERT INTO relay_budget_holds VALUES (?, ?, ?, 1, ?, ?)",
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
        with self._transaction() as conn:
            conn.execute("DELETE FROM relay_budget_holds WHERE id = ?", (reservation_id,))
            if spend.teacher_tokens or spend.teacher_calls or spend.cost_usd:
                conn.executemany(
                    "INSERT INTO relay_budget_spend VALUES (?, ?, ?, ?) ON CONFLICT (scope) DO UPDATE SET "
                    "teacher_tokens = teacher_tokens + excluded.teacher_tokens, "
                    "teacher_calls = teacher_calls + excluded.teacher_calls, "
                    "cost_usd = cost_usd + excluded.cost_usd",
                    [(key, spend.teacher_tokens, spend.teacher_calls, spend.cost_usd) for key in keys],
                )

    def balances(self, keys: Sequence[str]) -> dict[str, Balance]:
        if not keys:
            return {}
        spent, held = self._balances(self._connection(), keys, time.time())
        return {key: Balance(spent[key], held[key]) for key in keys}

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
