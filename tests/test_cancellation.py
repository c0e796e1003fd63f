"""Budgets stay exact when requests are cancelled: whatever point a relayed request is cancelled
at (inside the budget store's reservation, between the student and teacher steps, in the middle
of the teacher's stream), afterwards it holds nothing and the conversation is charged exactly
the teacher tokens that were delivered. On SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relay_agents import Budget, RelayConfig
from relay_agents.api import RelayDelta, astream_relay
from relay_agents.budgets import Spend, conversation_key, open_budget_store
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config

QUESTION = "Q-cancel: how much is it?"
STUDENT_CALL = "Let me ask. <call>40</call>"
STUDENT_AFTER = " Done."
TEACHER_WORD = " tok"  # one token of the scripted tokenizer
TEACHER = TEACHER_WORD * 60  # the grant of 40 cuts it


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'budgets.sqlite'}"
    return request.getfixturevalue("postgres_url")


def scripted_call(scripted: ScriptedServer, token_interval_s: float) -> None:
    """A student that asks for 40 teacher tokens, a teacher that writes more, one token a chunk."""
    scripted.script("student", "Q-cancel", [STUDENT_CALL], repeat=True)
    scripted.script("student", TEACHER_WORD.strip(), [STUDENT_AFTER], repeat=True)  # after the call
    scripted.script("teacher", "Q-cancel", [TEACHER], repeat=True)
    scripted.configure(token_interval_s=token_interval_s)


def cancel_config(scripted: ScriptedServer, url: str) -> RelayConfig:
    return relay_config(scripted, budget=Budget(max_teacher_tokens=1000), budget_store=url)


def standing(url: str, conversation: str) -> tuple[Spend, int]:
    """What a conversation was charged, and how many live holds its rows in the store keep
    (read with SQL, not through the store)."""
    key = conversation_key(conversation)
    spent = open_budget_store(url).spent([key])[key]
    query = "SELECT COUNT(*) FROM relay_budget_holds WHERE scope = {mark} AND expires_at >= {mark}"
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            (live,) = conn.execute(query.format(mark="?"), (key, time.time())).fetchone()
    else:
        with psycopg.connect(url) as conn:
            (live,) = conn.execute(query.format(mark="%s"), (key, time.time())).fetchone()
    return spent, live


async def test_a_client_that_leaves_mid_teacher_stream_is_charged_what_it_was_delivered(
    scripted: ScriptedServer, store_url: str
) -> None:
    """A client reads 5 teacher deltas of a 40-token grant and leaves: 5 tokens, 1 call charged."""
    scripted_call(scripted, token_interval_s=0.1)
    conversation = f"leaves-{uuid.uuid4().hex}"
    teacher: list[str] = []
    stream = astream_relay(QUESTION, cancel_config(scripted, store_url), conversation_id=conversation)
    async with contextlib.aclosing(aiter(stream)) as deltas:
        async for delta in deltas:
            if delta.source == "teacher":
                teacher.append(delta.text)
                if len(teacher) == 5:
                    break
    assert "".join(teacher) == TEACHER_WORD * 5
    assert standing(store_url, conversation) == (Spend(5, 1, 0.0), 0)
    teacher_requests = [r for r in scripted.requests() if r["model"] == "teacher"]
    assert teacher_requests[0]["body"]["max_tokens"] == 40


class _StoreLock:
    """Another transaction holding the budget store's write lock (SQLite) or the conversation's
    spend row (PostgreSQL) for a while: a reservation started meanwhile waits inside the store,
    so a cancellation can land inside it."""

    def __init__(self, url: str, key: str, seconds: float) -> None:
        self.url, self.key, self.seconds = url, key, seconds
        self.taken = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def __enter__(self) -> _StoreLock:
        self.thread.start()
        assert self.taken.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()

    def _hold(self) -> None:
        if self.url.startswith("sqlite:///"):
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"), isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            self.taken.set()
            time.sleep(self.seconds)
            conn.execute("ROLLBACK")
            conn.close()
            return
        with psycopg.connect(self.url, autocommit=True) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO relay_budget_spend (scope) VALUES (%s) ON CONFLICT DO NOTHING", (self.key,)
            )
            conn.execute("SELECT 1 FROM relay_budget_spend WHERE scope = %s FOR UPDATE", (self.key,))
            self.taken.set()
            time.sleep(self.seconds)


def _phase(student: str, teacher_tokens: int, locked: bool, finished: bool) -> str:
    """Where a request was when its cancellation landed (for Hypothesis' statistics)."""
    if finished:
        return "not cancelled"
    if teacher_tokens:
        return "mid-teacher-stream"
    if STUDENT_CALL.split("<")[0].strip() not in student:
        return "student step"
    return "inside the reservation" if locked else "between the steps, or the teacher's connect"


#: Each example: three requests on one conversation, each cancelled after its own delay (or never),
#: while another transaction holds the store for a while (so some cancellations land inside the
#: reservation).
REQUESTS = st.lists(st.one_of(st.none(), st.floats(0.0, 0.6)), min_size=3, max_size=3)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(cancel_after_s=REQUESTS, lock_s=st.sampled_from([0.0, 0.1, 0.25]))
def test_cancelled_requests_hold_nothing_and_are_charged_what_was_delivered(
    scripted: ScriptedServer, store_url: str, cancel_after_s: list[float | None], lock_s: float
) -> None:
    scripted.reset()
    scripted_call(scripted, token_interval_s=0.01)
    config = cancel_config(scripted, store_url)
    conversation = f"property-{uuid.uuid4().hex}"
    open_budget_store(store_url).spent([conversation_key(conversation)])  # the schema exists

    lock_until = time.monotonic() + lock_s

    async def one(cancel_after: float | None) -> int:
        student: list[str] = []
        teacher: list[str] = []

        def on_delta(delta: RelayDelta) -> None:
            (teacher if delta.source == "teacher" else student).append(delta.text)

        run = asyncio.ensure_future(
            astream_relay(QUESTION, config, conversation_id=conversation).run(on_delta)
        )
        if cancel_after is not None:
            await asyncio.wait([run], timeout=cancel_after)
            run.cancel()
        locked = time.monotonic() < lock_until
        with contextlib.suppress(asyncio.CancelledError):
            await run
        event(_phase("".join(student), len(teacher), locked, not run.cancelled()))
        return len(teacher)

    async def all_of_them() -> list[int]:
        return await asyncio.gather(*(one(c) for c in cancel_after_s))

    with (
        _StoreLock(store_url, conversation_key(conversation), lock_s) if lock_s else contextlib.nullcontext()
    ):
        delivered = asyncio.run(all_of_them())

    spent, held = standing(store_url, conversation)
    assert held == 0, f"{held} holds left behind"
    assert spent.teacher_tokens == sum(delivered)  # budget drift: 0 tokens
    assert spent.teacher_calls == sum(1 for n in delivered if n)
