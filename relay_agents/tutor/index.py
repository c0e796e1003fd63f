"""The list of tutor conversations (id, title, times) in a table beside the checkpoints:
SQLite on one host, PostgreSQL (the deployment's one state URL) for several.

The checkpointer keeps each conversation's messages; this table only lets the page and the
terminal list conversations, newest first, without walking every checkpoint.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiosqlite

from relay_agents.budgets import is_postgres_url

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

TITLE_CHARS = 60
_FIELDS = ("id", "title", "created", "updated")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tutor_conversations ("
    "id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)"
)


class Index(Protocol):
    """What the tutor asks of its conversation list, on either database."""

    async def create(self) -> dict[str, Any]: ...
    async def get(self, conversation_id: str) -> dict[str, Any] | None: ...
    async def all(self) -> list[dict[str, Any]]: ...
    async def touch(self, conversation_id: str, question: str) -> None: ...


@contextlib.asynccontextmanager
async def open_conversation_index(url: str | None, sqlite_path: Path) -> AsyncIterator[Index]:
    """The list in PostgreSQL when ``url`` is ``postgresql://...``, else in ``sqlite_path``."""
    if url is not None and is_postgres_url(url):
        from psycopg_pool import AsyncConnectionPool

        async with AsyncConnectionPool(
            url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
        ) as pool:
            async with pool.connection() as conn:
                await conn.execute(_SCHEMA)
            yield PostgresConversationIndex(pool)
        return
    index = await ConversationIndex.open(sqlite_path)
    try:
        yield index
    finally:
        await index.close()


def _new_row() -> dict[str, Any]:
    now = time.time()
    return {"id": uuid.uuid4().hex[:12], "title": "", "created": now, "updated": now}


def _title(question: str) -> str:
    """A conversation's title: its first question on one line, cut to TITLE_CHARS."""
    title = " ".join(question.split())
    return title[: TITLE_CHARS - 1] + "…" if len(title) > TITLE_CHARS else title


class PostgresConversationIndex:
    """Conversations by id in PostgreSQL, shared by every host."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def create(self) -> dict[str, Any]:
        row = _new_row()
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO tutor_conversations VALUES (%(id)s, %(title)s, %(created)s, %(updated)s)", row
            )
        return row

    async def get(self, conversation_id: str) -> dict[str, Any] | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT id, title, created, updated FROM tutor_conversations WHERE id = %s",
                (conversation_id,),
            )
            row = await cursor.fetchone()
        return None if row is None else dict(zip(_FIELDS, row, strict=True))

    async def all(self) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT id, title, created, updated FROM tutor_conversations ORDER BY updated DESC"
            )
            rows = await cursor.fetchall()
        return [dict(zip(_FIELDS, row, strict=True)) for row in rows]

    async def touch(self, conversation_id: str, question: str) -> None:
        """Mark the conversation as used now; its first question becomes its title."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE tutor_conversations SET updated = %s, "
                "title = CASE WHEN title = '' THEN %s ELSE title END WHERE id = %s",
                (time.time(), _title(question), conversation_id),
            )


class ConversationIndex:
    """Conversations by id in SQLite; open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, path: Path) -> ConversationIndex:
        conn = await aiosqlite.connect(path, timeout=30)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(_SCHEMA)
        await conn.commit()
        return cls(conn)

    async def close(self) -> None:
        await self._conn.close()

    async def create(self) -> dict[str, Any]:
        row = _new_row()
        await self._conn.execute(
            "INSERT INTO tutor_conversations VALUES (:id, :title, :created, :updated)", row
        )
        await self._conn.commit()
        return row

    async def get(self, conversation_id: str) -> dict[str, Any] | None:
        async with self._conn.execute(
            "SELECT id, title, created, updated FROM tutor_conversations WHERE id = ?", (conversation_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else dict(zip(_FIELDS, row, strict=True))

    async def all(self) -> list[dict[str, Any]]:
        async with self._conn.execute(
            "SELECT id, title, created, updated FROM tutor_conversations ORDER BY updated DESC"
        ) as cursor:
            rows = await cursor.fetchall()
        return [dict(zip(_FIELDS, row, strict=True)) for row in rows]

    async def touch(self, conversation_id: str, question: str) -> None:
        """Mark the conversation as used now; its first question becomes its title."""
        await self._conn.execute(
            "UPDATE tutor_conversations SET updated = ?, "
            "title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
            (time.time(), _title(question), conversation_id),
        )
        await self._conn.commit()
