"""The fault matrix: every upstream fault, for the teacher and for the student, on whole and
streamed answers, through the Python API and through the server (real HTTP on 127.0.0.1).

Each case asserts the outcome (a teacher fault: the answer goes on without the teacher and says
so in a ``teacher_failure`` event, or comes out whole after a retry; a student fault: the API
raises, the server answers 502/503 with an OpenAI error object or ends its stream with an error
event), a time bound, the exact text (so no token is lost or duplicated by a retry) and the
exact charge in the budget store (what the teacher delivered, never more than its grant).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import openai
import pytest

from relay_agents import Budget, RelayConfig, arelay, astream_relay
from relay_agents.budgets import close_budget_stores, conversation_key, open_budget_store
from relay_agents.clients import StreamError
from relay_agents.testing import ScriptedServer
from relay_agents.transport import DeadlineExceeded
from tests.conftest import relay_config
from tests.server_support import serving

DEADLINE_S = 1.0  # room for a retry after a 0.1 s Retry-After on a machine that stalls a moment
DRIP = "drip:0.6"  # a token every 0.6 s: one or two arrive within the deadline, never three
GRANT = 3
STUDENT = ["x <call>3</call>", " y"]
TEACHER = [" 1 2 3 4 5 6 7 8 9 10"]  # ten tokens: a teacher that overruns writes them all
WHOLE_ANSWER = "x 1 2 3 y"
ALONE = "x  y"  # the student's own text around the failed call
#: Every case ends within this much more than its wait (the deadline, a Retry-After).
SLACK_S = 3.0  # far below the 20 s read timeout a hang would otherwise take; room for a loaded machine


@dataclass(frozen=True)
class Outcome:
    """What a case ends in: ``error`` (a student failure: the API's exception type, the
    server's status and error code) or an answer (``text``, a teacher failure or not) with
    ``charged`` teacher tokens (``None``: what the teacher delivered before the deadline)."""

    text: str | None = None
    teacher_failure: bool = False
    charged: int | None = 0
    error: type[Exception] | None = None
    status: int | None = None
    code: str | None = None
    waits_s: float = 0.0  # the least time the case takes (a Retry-After)


OK = Outcome(WHOLE_ANSWER, charged=GRANT)
TEACHER_FAILED = Outcome(ALONE, teacher_failure=True)
TIMED_OUT = Outcome(error=DeadlineExceeded, status=503, code="upstream_timeout")
INVALID = Outcome(error=StreamError, status=502, code="upstream_invalid_response")

#: fault (queued faults) -> (teacher whole, teacher stream, student whole, student stream)
MATRIX: dict[str, tuple[list[str], Outcome, Outcome, Outcome, Outcome]] = {
    "429 with Retry-After": (
        ["429:retry-after=0.1"],
        *[Outcome(WHOLE_ANSWER, charged=GRANT, waits_s=0.1)] * 4,
    ),
    "503 until retries run out": (
        ["503:retry-after-ms=100"] * 2,
        TEACHER_FAILED,
        TEACHER_FAILED,
        *[Outcome(error=openai.InternalServerError, status=503, code="upstream_unavailable")] * 2,
    ),
    "hang": (["hang"], TEACHER_FAILED, TEACHER_FAILED, TIMED_OUT, TIMED_OUT),
    "slow drip": (
        [DRIP],
        TEACHER_FAILED,
        Outcome(teacher_failure=True, charged=None),  # what arrived is kept and charged
        TIMED_OUT,
        TIMED_OUT,
    ),
    "SSE comments only": (["comments:0.05"], TEACHER_FAILED, TEACHER_FAILED, TIMED_OUT, TIMED_OUT),
    "drop": (
        ["drop"],
        OK,  # before the first byte: retried
        Outcome("x 1 2 y", teacher_failure=True, charged=2),  # mid-stream: kept, not retried
        OK,
        Outcome(error=openai.APIConnectionError, status=503, code="upstream_unreachable"),
    ),
    "overrun of max_tokens": (["overrun"], OK, OK, OK, OK),
    "malformed JSON": (["malformed"], TEACHER_FAILED, TEACHER_FAILED, INVALID, INVALID),
    "usage not a number": (["bad-usage"], OK, OK, OK, OK),
    "negative usage": (["negative-usage"], OK, OK, OK, OK),
    "choices null": (["null-choices"], TEACHER_FAILED, TEACHER_FAILED, INVALID, INVALID),
    "HTML body": (["html"], TEACHER_FAILED, TEACHER_FAILED, INVALID, INVALID),
    "lone surrogate": (
        ["surrogate"],
        Outcome("x 1\ufffd 2 3 y", charged=GRANT),
        Outcome("x 1\ufffd 2 3 y", charged=GRANT),
        Outcome("x\ufffd 1 2 3 y", charged=GRANT),
        Outcome("x\ufffd 1 2 3 y", charged=GRANT),
    ),
}


def cases() -> list[object]:
    return list(_cases())


def _cases() -> Iterator[object]:
    for name, (faults, *outcomes) in MATRIX.items():
        for (role, stream), outcome in zip(
            [(r, s) for r in ("teacher", "student") for s in (False, True)], outcomes, strict=True
        ):
            for surface in ("api", "server"):
                mode = "stream" if stream else "whole"
                yield pytest.param(
                    faults, role, stream, surface, outcome, id=f"{name}-{role}-{mode}-{surface}"
                )


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("faults") / "budgets.db"
    close_budget_stores()


@pytest.fixture(scope="module")
async def relay_url(scripted_server: ScriptedServer, store_path: Path) -> AsyncIterator[str]:
    """One relay server for the whole matrix (the scripted server is reset between cases)."""
    async with serving(config(scripted_server, store_path)) as url:
        yield url


def config(server: ScriptedServer, store: Path) -> RelayConfig:
    short = {"call_deadline_s": DEADLINE_S, "max_retries": 1, "retry_initial_delay": 0.01}
    return relay_config(
        server,
        student=short,
        teacher=short,
        budget=Budget(max_teacher_tokens=100),
        budget_store=str(store),
    )


def charged(store: Path, conversation: str) -> int:
    key = conversation_key(conversation)
    return open_budget_store(str(store)).spent([key])[key].teacher_tokens


@dataclass
class Seen:
    """What one case produced, whichever surface it went through."""

    text: str | None = None
    streamed: str | None = None
    events: list[str] | None = None
    teacher_tokens: int = 0
    error: BaseException | None = None
    status: int | None = None
    body: dict | None = None


async def through_api(config: RelayConfig, question: str, stream: bool) -> Seen:
    seen = Seen()
    try:
        if stream:
            relay_stream = astream_relay(question, config, conversation_id=question)
            deltas: list[str] = []
            async for delta in relay_stream:
                deltas.append(delta.text)
            result = relay_stream.result
            assert result is not None
            seen.streamed = "".join(deltas)
        else:
            result = await arelay(question, config, conversation_id=question)
    except Exception as exc:  # the outcome under test
        seen.error = exc
        return seen
    seen.text, seen.events = result.text, [e.kind for e in result.events]
    seen.teacher_tokens = result.usage.teacher_tokens
    return seen


async def through_server(url: str, question: str, stream: bool) -> Seen:
    seen = Seen()
    body: dict[str, object] = {"model": "relay", "messages": [{"role": "user", "content": question}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"X-Relay-Conversation": question}
    async with httpx2.AsyncClient(timeout=10) as http:
        reply = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    seen.status = reply.status_code
    if reply.status_code != 200:
        seen.body = reply.json()
        return seen
    if not stream:
        answer = reply.json()
        seen.text = answer["choices"][0]["message"]["content"]
        seen.events = [e["kind"] for e in answer["choices"][0]["relay"]["events"]]
        seen.teacher_tokens = answer["usage"]["relay"]["teacher_tokens"]
        return seen
    payloads = [line[5:].strip() for line in reply.text.splitlines() if line.startswith("data:")]
    assert payloads[-1] == "[DONE]", "every stream ends with [DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    errors = [c for c in chunks if "error" in c]
    if errors:
        seen.body = errors[-1]
        return seen
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    seen.streamed = seen.text = "".join(c["delta"].get("content") or "" for c in choices)
    seen.events = [e["kind"] for e in choices[-1]["relay"]["events"]]  # the finish chunk's
    seen.teacher_tokens = chunks[-1]["usage"]["relay"]["teacher_tokens"]
    return seen


@pytest.mark.parametrize(("faults", "role", "stream", "surface", "outcome"), cases())
async def test_fault(
    scripted: ScriptedServer,
    store_path: Path,
    relay_url: str,
    faults: list[str],
    role: str,
    stream: bool,
    surface: str,
    outcome: Outcome,
) -> None:
    question = f"Q-{role}-{faults[0]}-{stream}-{surface}"
    scripted.script("student", question, STUDENT)
    scripted.script("teacher", question, TEACHER)
    scripted.faults(role, faults)
    started = time.monotonic()
    if surface == "api":
        seen = await through_api(config(scripted, store_path), question, stream)
    else:
        seen = await through_server(relay_url, question, stream)
    elapsed = time.monotonic() - started

    assert outcome.waits_s <= elapsed < outcome.waits_s + DEADLINE_S * 2 + SLACK_S
    spent = charged(store_path, question)
    if outcome.error is not None:
        assert spent == 0
        if surface == "api":
            assert isinstance(seen.error, outcome.error), seen.error
            return
        assert seen.body is not None and set(seen.body["error"]) >= {"message", "type", "code"}
        assert seen.body["error"]["code"] == outcome.code
        assert seen.status in (outcome.status, 200)  # 200: the stream had started (an error event)
        assert seen.status == outcome.status or stream
        return
    assert seen.error is None and seen.body is None, (seen.error, seen.body)
    assert seen.events == (["teacher_failure"] if outcome.teacher_failure else [])
    if seen.streamed is not None:
        assert seen.streamed == seen.text  # no token lost or sent twice
    if outcome.charged is None:  # cut by the deadline mid-stream: what was delivered
        assert 0 < spent == seen.teacher_tokens < GRANT
        assert seen.text == f"x{''.join(f' {i}' for i in range(1, spent + 1))} y"
    else:
        assert seen.text == outcome.text
        assert spent == seen.teacher_tokens == outcome.charged
