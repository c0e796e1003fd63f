"""The list of tutor conversations (id, title, times) in a SQLite table.

The checkpointer keeps each conversation's messages; this table only lets the page and the
terminal list conversations, newest first, without walking every checkpoint.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import aiosqlite

TITLE_CHARS = 60


class ConversationIndex:
    """Conversations by id; open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, path: Path) -> ConversationIndex:
        conn = await aiosqlite.connect(path, timeout=30)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tutor_conversations ("
            "id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)"
        )
        await conn.commit()
        return cls(conn)

    async def close(self) -> None:
        await self._conn.close()

    async def create(self) -> dict[str, Any]:
        now = time.time()
        row = {"id": uuid.uuid4().hex[:12], "title": "", "created": now, "updated": now}
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
        return None if row is None else dict(zip(("id", "title", "created", "updated"), row, strict=True))

    async def all(self) -> list[dict[str, Any]]:
        async with self._conn.execute(
            "SELECT id, title, created, updated FROM tutor_conversations ORDER BY updated DESC"
        ) as cursor:
            rows = await cursor.fetchall()
        return [dict(zip(("id", "title", "created", "updated"), row, strict=True)) for row in rows]

    async def touch(self, conversation_id: str, question: str) -> None:
        """Mark the conversation as used now; its first question becomes its title."""
        title = " ".join(question.split())
        if len(title) > TITLE_CHARS:
            title = title[: TITLE_CHARS - 1] + "…"
        await self._conn.execute(
            "UPDATE tutor_conversations SET updated = ?, "
            "title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
            (time.time(), title, conversation_id),
        )
        await self._conn.commit()
