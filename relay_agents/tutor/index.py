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
#: Added later: until when a host answers the conversation (``NULL``: nobody).
_LEASE_COLUMN = "answering_until"
_INSERT = "INSERT INTO tutor_conversations (id, title, created, updated) VALUES ({})"
_CLAIM = (
    "UPDATE tutor_conversations SET answering_until = {until} "
    "WHERE id = {id} AND (answering_until IS NULL OR answering_until < {now})"
)


class Index(Protocol):
    """What the tutor asks of its conversation list, on either database."""

    async def create(self) -> dict[str, Any]: ...
    async def get(self, conversation_id: str) -> dict[str, Any] | None: ...
    async def all(self) -> list[dict[str, Any]]: ...
    async def touch(self, conversation_id: str, question: str) -> None: ...
    async def claim(self, conversation_id: str, lease_s: float) -> bool: ...
    async def renew(self, conversation_id: str, lease_s: float) -> None: ...
    async def release(self, conversation_id: str) -> None: ...
    async def answering(self, conversation_id: str) -> bool: ...


@contextlib.asynccontextmanager
async def open_conversation_index(url: str | None, sqlite_path: Path) -> AsyncIterator[Index]:
    """The list in PostgreSQL when ``url`` is ``postgresql://...``, else in ``sqlite_path``."""
    if url is not None and is_postgres_url(url):
        from psycopg_pool import AsyncConnectionPool

        async with AsyncConnectionPool(
            url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
        ) as pool:
            async with pool.connection() as conn, conn.transaction():
                # two hosts starting at once must not create the table together
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tutor_conversations'))")
                await conn.execute(_SCHEMA)
                await conn.execute(
                    f"ALTER TABLE tutor_conversations ADD COLUMN IF NOT EXISTS {_LEASE_COLUMN} FLOAT8"
                )
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
            await conn.execute(_INSERT.format("%(id)s, %(title)s, %(created)s, %(updated)s"), row)
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

    async def claim(self, conversation_id: str, lease_s: float) -> bool:
        """Take the conversation for one answer, unless a host holds an unexpired lease on it."""
        now = time.time()
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                _CLAIM.format(until="%s", id="%s", now="%s"), (now + lease_s, conversation_id, now)
            )
        return cursor.rowcount == 1

    async def renew(self, conversation_id: str, lease_s: float) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE tutor_conversations SET answering_until = %s WHERE id = %s",
                (time.time() + lease_s, conversation_id),
            )

    async def release(self, conversation_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE tutor_conversations SET answering_until = NULL WHERE id = %s", (conversation_id,)
            )

    async def answering(self, conversation_id: str) -> bool:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT answering_until FROM tutor_conversations WHERE id = %s", (conversation_id,)
            )
            row = await cursor.fetchone()
        return row is not None and row[0] is not None and row[0] >= time.time()


class ConversationIndex:
    """Conversations by id in SQLite; open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, path: Path) -> ConversationIndex:
        conn = await aiosqlite.connect(path, timeout=30)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(_SCHEMA)
        async with conn.execute("PRAGMA table_info(tutor_conversations)") as cursor:
            columns = {row[1] for row in await cursor.fetchall()}
        if _LEASE_COLUMN not in columns:  # a file from before the lease
            await conn.execute(f"ALTER TABLE tutor_conversations ADD COLUMN {_LEASE_COLUMN} REAL")
        await conn.commit()
        return cls(conn)

    async def close(self) -> None:
        await self._conn.close()

    async def create(self) -> dict[str, Any]:
        row = _new_row()
        await self._conn.execute(_INSERT.format(":id, :title, :created, :updated"), row)
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

    async def claim(self, conversation_id: str, lease_s: float) -> bool:
        """Take the conversation for one answer, unless a process holds an unexpired lease on it."""
        now = time.time()
        cursor = await self._conn.execute(
            _CLAIM.format(until="?", id="?", now="?"), (now + lease_s, conversation_id, now)
        )
        await self._conn.commit()
        return cursor.rowcount == 1

    async def renew(self, conversation_id: str, lease_s: float) -> None:
        await self._conn.execute(
            "UPDATE tutor_conversations SET answering_until = ? WHERE id = ?",
            (time.time() + lease_s, conversation_id),
        )
        await self._conn.commit()

    async def release(self, conversation_id: str) -> None:
        await self._conn.execute(
            "UPDATE tutor_conversations SET answering_until = NULL WHERE id = ?", (conversation_id,)
        )
        await self._conn.commit()

    async def answering(self, conversation_id: str) -> bool:
        async with self._conn.execute(
            "SELECT answering_until FROM tutor_conversations WHERE id = ?", (conversation_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return row is not None and row[0] is not None and row[0] >= time.time()
