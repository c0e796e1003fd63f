"""Teacher budgets outside the graph's state: per conversation, per turn and per user pool."""

from relay_agents.budgets.limits import CallQuote, Spend
from relay_agents.budgets.sqlite import SQLiteBudgetStore
from relay_agents.budgets.store import (
    BudgetExceeded,
    BudgetStore,
    Reservation,
    Scope,
    close_budget_stores,
    conversation_key,
    default_store_path,
    open_budget_store,
    user_key,
)

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
    "open_budget_store",
    "user_key",
]
