"""Conversation checkpoints where the budgets live: PostgreSQL for several hosts, else SQLite.

One URL (``RelayConfig.budget_store``) names all of a deployment's state: with a
``postgresql://`` URL the budgets, the graphs' checkpoints and the tutor's conversation list
share that database, so any host behind a load balancer can continue any conversation.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from langgraph.checkpoint.base import BaseCheckpointSaver

from relay_agents.budgets import is_postgres_url

#: Connections one host's checkpointer keeps open to PostgreSQL.
POOL_SIZE = 8
#: Two hosts starting at once must not run LangGraph's schema migrations together.
_SCHEMA_LOCK = "SELECT pg_advisory_lock(hashtext('relay_checkpoint_schema'))"
_SCHEMA_UNLOCK = "SELECT pg_advisory_unlock(hashtext('relay_checkpoint_schema'))"


@contextlib.asynccontextmanager
async def open_checkpointer(url: str | None, sqlite_path: Path) -> AsyncIterator[BaseCheckpointSaver]:
    """An async checkpointer for the block: LangGraph's PostgreSQL saver over a connection pool
    when ``url`` is ``postgresql://...`` (needs the ``postgres`` extra), else its SQLite saver
    over the file ``sqlite_path`` (needs ``langgraph-checkpoint-sqlite``)."""
    if url is not None and is_postgres_url(url):
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        options = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
        async with AsyncConnectionPool(
            url, min_size=1, max_size=POOL_SIZE, kwargs=options, open=False
        ) as pool:
            saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
            async with pool.connection() as conn:
                await conn.execute(_SCHEMA_LOCK)
                try:
                    await saver.setup()
                finally:
                    await conn.execute(_SCHEMA_UNLOCK)
            yield saver
        return
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(sqlite_path)) as saver:
        yield saver
