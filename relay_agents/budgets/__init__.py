"""Teacher budgets outside the graph's state: per conversation, per turn and per user pool."""

from relay_agents.budgets.base import (
    BudgetExceeded,
    BudgetStore,
    Reservation,
    Scope,
    conversation_key,
    user_key,
)
from relay_agents.budgets.sqlite import SQLiteBudgetStore
from relay_agents.budgets.store import (
    close_budget_stores,
    default_store_path,
    is_postgres_url,
    open_budget_store,
)
from relay_agents.core.grants import CallQuote, Spend

__all__ = [
    "BudgetExceeded",
    "BudgetStore",
    "CallQuote",
    "Reservation",
    "SQLiteBudgetStore",
    "Scope",
    "Spend",
    "close_budget_stores",
    "conversation_key",
    "default_store_path",
    "is_postgres_url",
    "open_budget_store",
    "user_key",
]
