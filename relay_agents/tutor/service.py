"""The tutor's conversations: ask, retry, history and the budget meter, for the page and the
terminal alike.

Messages persist in the tutor graph's checkpointer (one thread per conversation), the
conversation list in a table beside it, and the teacher budget in the relay's budget store,
whose numbers the meter shows. With a ``postgresql://`` budget store all three live in that
database (any host continues any conversation); else in SQLite files on this host. Answers
come as a stream of plain events:

* ``{"type": "delta", "source": "student" | "teacher", "text": ...}`` as the models write;
* ``{"type": "budget", "budget": {...}}`` when a teacher span ends (the store's numbers);
* ``{"type": "done", "message": {...}, "budget": {...}}`` with the answer's spans and notices;
* ``{"type": "error", "message": ..., "budget": {...}}`` when the answer failed; the question
  stays in the conversation and :meth:`Tutor.retry` answers it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.base import BaseCheckpointSaver

from relay_agents.budgets import (
    BudgetExceeded,
    BudgetStore,
    conversation_key,
    default_store_path,
    is_postgres_url,
    open_budget_store,
)
from relay_agents.checkpoints import open_checkpointer
from relay_agents.core.config import RelayConfig
from relay_agents.tutor.graph import (
    DEFAULT_HISTORY_MESSAGES,
    TUTOR_SYSTEM_PROMPT,
    build_tutor_graph,
    tutor_config,
)
from relay_agents.tutor.index import Index, open_conversation_index
from relay_agents.tutor.views import budget_view, history_view, message_view

MAX_MESSAGE_CHARS = 4000
#: An answer holds its conversation for this long and renews the hold every third of it, so a
#: host that dies mid-answer keeps its conversation busy for at most this long.
ANSWER_LEASE_S = 30.0
BUSY = "This conversation is still answering: wait for the answer to finish."

Event = dict[str, Any]


class TutorInputError(ValueError):
    """A message the tutor does not send (empty, too long, nothing to retry); in words."""


class UnknownConversation(LookupError):
    """No conversation has this id."""


class ConversationBusy(RuntimeError):
    """The conversation is answering already; one answer at a time."""


@dataclass(frozen=True)
class TutorOptions:
    """How the tutor talks: its system prompt (``None``: none), how much history the relay
    sees, the longest message accepted, and what the page and terminal show."""

    system_prompt: str | None = TUTOR_SYSTEM_PROMPT
    history_messages: int = DEFAULT_HISTORY_MESSAGES
    max_message_chars: int = MAX_MESSAGE_CHARS
    world: str = ""
    """Where the models come from, in words (shown in the page's header)."""
    suggestions: tuple[str, ...] = field(default_factory=tuple)


def default_db_path() -> Path:
    """``tutor.sqlite`` beside the default budget store (``$RELAY_AGENTS_STATE`` or ~/.local/state)."""
    return default_store_path().parent / "tutor.sqlite"


def describe_failure(exc: BaseException, config: RelayConfig) -> str:
    """Why an answer failed, for a person; says that the question is kept."""
    who = "The student model" if config.on_teacher_failure == "continue" else "A model endpoint"
    if isinstance(exc, BudgetExceeded):
        why = f"the teacher budget is spent ({exc})"
        who = "The tutor"
    elif isinstance(exc, openai.APITimeoutError):
        why = "did not answer in time"
    elif isinstance(exc, openai.APIConnectionError):
        why = "could not be reached"
    elif isinstance(exc, openai.APIStatusError):
        why = f"answered HTTP {exc.status_code} ({exc.message})"
    elif isinstance(exc, openai.APIError):
        why = f"failed: {exc.message}"
    else:
        who, why = "The tutor", f"failed: {type(exc).__name__}: {exc}"
    return f"{who} {why}. Your question is kept: retry it when the model is back."


class Tutor:
    """Conversations with the tutor graph; open with :meth:`open` (an async context manager)."""

    def __init__(
        self,
        config: RelayConfig,
        saver: BaseCheckpointSaver,
        index: Index,
        options: TutorOptions,
        store: BudgetStore,
    ) -> None:
        self.config = config
        self.options = options
        self.index = index
        self.store = store
        self.graph = build_tutor_graph(
            config,
            checkpointer=saver,
            system_prompt=options.system_prompt,
            history_messages=options.history_messages,
        )
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, config: RelayConfig, db_path: Path | None = None, options: TutorOptions | None = None
    ) -> AsyncIterator[Tutor]:
        """The tutor over the budget store's PostgreSQL database when ``config.budget_store`` is
        ``postgresql://...``, else over the SQLite file ``db_path`` (default :func:`default_db_path`)."""
        path = db_path or default_db_path()
        config = tutor_config(config)
        url = config.budget_store
        if not is_postgres_url(url):
            path.parent.mkdir(parents=True, exist_ok=True)
        store = open_budget_store(url)
        async with open_conversation_index(url, path) as index, open_checkpointer(url, path) as saver:
            yield cls(config, saver, index, options or TutorOptions(), store)

    # -- reading ----------------------------------------------------------------------------

    async def conversations(self) -> list[dict[str, Any]]:
        return await self.index.all()

    async def new_conversation(self) -> dict[str, Any]:
        return await self.index.create()

    async def _require(self, conversation_id: str) -> dict[str, Any]:
        conversation = await self.index.get(conversation_id)
        if conversation is None:
            raise UnknownConversation(f"no conversation {conversation_id!r}")
        return conversation

    @staticmethod
    def _thread(conversation_id: str) -> dict[str, Any]:
        return {"configurable": {"thread_id": conversation_id}}

    async def budget(self, conversation_id: str) -> dict[str, Any]:
        """The conversation's teacher budget as the budget store has it."""
        key = conversation_key(conversation_id)
        spent = (await self.store.aspent([key]))[key]
        return budget_view(self.config.budget, spent)

    async def conversation(self, conversation_id: str) -> dict[str, Any]:
        """The conversation: its messages for display, its budget, and whether a question
        waits for a retry (``pending``)."""
        conversation = await self._require(conversation_id)
        state = await self.graph.aget_state(self._thread(conversation_id))
        return {
            **conversation,
            "messages": history_view(state.values.get("messages", [])),
            "pending": bool(state.next),
            "busy": await self.busy(conversation_id),
            "budget": await self.budget(conversation_id),
        }

    async def busy(self, conversation_id: str) -> bool:
        """Whether a process (this one or another host on the same database) is answering."""
        lock = self._locks.get(conversation_id)
        return (lock is not None and lock.locked()) or await self.index.answering(conversation_id)

    # -- answering --------------------------------------------------------------------------

    def check_message(self, text: Any) -> str:
        """The question to send, or :class:`TutorInputError` saying what is wrong with it."""
        if not isinstance(text, str) or not text.strip():
            raise TutorInputError("The message is empty: type a question first.")
        limit = self.options.max_message_chars
        if len(text) > limit:
            raise TutorInputError(
                f"The message has {len(text)} characters; the tutor takes at most {limit}. "
                "Shorten it and send it again."
            )
        return text.strip()

    async def prepare(self, conversation_id: str, text: Any | None = None, *, retry: bool = False) -> str:
        """Check a question (or a retry) before it is answered; raises what is wrong."""
        await self._require(conversation_id)
        if await self.busy(conversation_id):
            raise ConversationBusy(BUSY)
        if retry:
            state = await self.graph.aget_state(self._thread(conversation_id))
            if not state.next:
                raise TutorInputError("There is no unanswered question to retry.")
            return ""
        return self.check_message(text)

    async def ask(self, conversation_id: str, text: str) -> AsyncIterator[Event]:
        """Answer ``text`` in the conversation (call :meth:`prepare` first)."""
        question = await self.prepare(conversation_id, text)
        await self.index.touch(conversation_id, question)
        async for event in self._answer(conversation_id, {"messages": [HumanMessage(question)]}):
            yield event

    async def retry(self, conversation_id: str) -> AsyncIterator[Event]:
        """Answer the question whose answer failed, from where the graph stopped."""
        await self.prepare(conversation_id, retry=True)
        async for event in self._answer(conversation_id, None):
            yield event

    @contextlib.asynccontextmanager
    async def _claimed(self, conversation_id: str) -> AsyncIterator[None]:
        """Hold the conversation in the index for one answer, renewing the lease meanwhile."""
        if not await self.index.claim(conversation_id, ANSWER_LEASE_S):
            raise ConversationBusy(BUSY)

        async def renew() -> None:
            while True:
                await asyncio.sleep(ANSWER_LEASE_S / 3)
                await self.index.renew(conversation_id, ANSWER_LEASE_S)

        renewing = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewing.cancel()
            await self.index.release(conversation_id)

    async def _answer(self, conversation_id: str, inputs: dict[str, Any] | None) -> AsyncIterator[Event]:
        lock = self._locks.setdefault(conversation_id, asyncio.Lock())
        if lock.locked():
            raise ConversationBusy(BUSY)
        async with lock, self._claimed(conversation_id):
            last_source: str | None = None
            reply = None
            try:
                async for mode, payload in self.graph.astream(
                    inputs, self._thread(conversation_id), stream_mode=["custom", "updates"]
                ):
                    if mode == "custom":
                        if last_source == "teacher" and payload["source"] != "teacher":
                            yield {"type": "budget", "budget": await self.budget(conversation_id)}
                        last_source = payload["source"]
                        yield {"type": "delta", "source": payload["source"], "text": payload["text"]}
                    elif "tutor" in payload:
                        reply = payload["tutor"]["messages"][-1]
            except Exception as exc:
                yield {
                    "type": "error",
                    "message": describe_failure(exc, self.config),
                    "budget": await self.budget(conversation_id),
                }
                return
            view = message_view(reply) if reply is not None else None
            yield {"type": "done", "message": view, "budget": await self.budget(conversation_id)}
