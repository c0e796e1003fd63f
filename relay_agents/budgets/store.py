"""Opening the shared budget store named by a URL (SQLite or PostgreSQL), one per URL and process."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from relay_agents.budgets.base import BudgetStore
from relay_agents.budgets.sqlite import SQLiteBudgetStore


def default_store_path() -> Path:
    """``$RELAY_AGENTS_STATE/budgets.sqlite``, else under ``$XDG_STATE_HOME`` or ``~/.local/state``."""
    state = os.environ.get("RELAY_AGENTS_STATE")
    if state:
        return Path(state).expanduser() / "budgets.sqlite"
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "relay-agents" / "budgets.sqlite"


_STORES: dict[str, BudgetStore] = {}
_STORES_LOCK = threading.Lock()


def open_budget_store(url: str | None = None) -> BudgetStore:
    """The shared store for ``url`` (one per URL and process).

    ``None``: the default SQLite file (:func:`default_store_path`). ``sqlite:///relative.db``,
    ``sqlite:////absolute.db`` or a plain file path: SQLite. ``postgresql://...``: PostgreSQL
    (needs the ``postgres`` extra).
    """
    key = url or f"sqlite:///{default_store_path()}"
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = _open(key)
        return store


def is_postgres_url(url: str | None) -> bool:
    """Whether ``url`` names a PostgreSQL database (then every host's state can live there)."""
    return url is not None and url.startswith(("postgresql://", "postgres://"))


def _open(url: str) -> BudgetStore:
    if is_postgres_url(url):
        from relay_agents.budgets.postgres import PostgresBudgetStore  # the optional postgres extra

        return PostgresBudgetStore(url)
    if url.startswith("sqlite:///"):
        return SQLiteBudgetStore(Path(url[len("sqlite:///") :]))
    if "://" in url:
        raise ValueError(f"unsupported budget store {url!r}: use sqlite:///PATH or postgresql://...")
    return SQLiteBudgetStore(Path(url))


def close_budget_stores() -> None:
    """Close every shared store (tests; a server's shutdown)."""
    with _STORES_LOCK:
        for store in _STORES.values():
            store.close()
        _STORES.clear()
