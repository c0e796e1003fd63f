"""The batch path (``abatch_relay``, ``batch_relay``) against the scripted server: the answers
``arelay`` gives, answer for answer, with the requests of ready answers sent together."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import openai
import pytest

from relay_agents import Budget, ChatRelay, abatch_relay, arelay, batch_relay
from relay_agents.api import RelayResult
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config

N = 24


def key(i: int) -> str:
    return f"<Q{i:03d}>"


def script_answers(server: ScriptedServer) -> None:
    """Answers of different shapes: no call, one call, two calls, a call cut by the cap, a
    malformed call; short and long, so that they end at different moments."""
    for i in range(N):
        filler = " and so on" * (i % 5)
        shape = i % 4
        if shape == 0:
            student = [f"Plainly{filler} \\boxed{{{i}}}."]
        elif shape == 1:
            student = [f"First {i}*2 = <call>3</call>", f". So{filler} \\boxed{{{2 * i}}}."]
        elif shape == 2:
            student = [f"A{filler} <call>4</call>", ". B = <call>2</call>", f". Done \\boxed{{{i}}}."]
        else:
            student = [f"Odd <call>x</call> then{filler} \\boxed{{{i}}}."]
        server.script("student", key(i), student)
        server.script("teacher", key(i), [f" teacher{i} says {i + 1} and more", f" again {i}"])


def comparable(result: RelayResult) -> dict[str, Any]:
    """Everything of a result but the reply message (whose id differs run to run)."""
    return result.model_dump(exclude={"message"})


async def both(server: ScriptedServer, config: Any, **batch: Any) -> tuple[list, list]:
    questions = [f"{key(i)} what is {i}?" for i in range(N)]
    script_answers(server)
    alone = [await arelay(q, config) for q in questions]
    server.reset()
    script_answers(server)
    together = await abatch_relay(questions, config, **batch)
    return alone, together


def generation_requests(server: ScriptedServer, model: str) -> list[dict]:
    return [r for r in server.requests() if r["model"] == model and r["path"].startswith("/v1/")]


async def test_the_same_answers_as_arelay_with_batched_requests(scripted: ScriptedServer) -> None:
    config = relay_config(scripted, max_answer_tokens=60)
    alone, together = await both(scripted, config)
    assert [comparable(r) for r in together] == [comparable(r) for r in alone]
    assert any(r.usage.teacher_calls == 2 for r in alone) and any(r.events for r in alone)

    student = generation_requests(scripted, "student")
    first_turns = student[0]
    assert isinstance(first_turns["prompt"], list) and len(first_turns["prompt"]) == N
    assert first_turns["body"]["return_token_ids"] is True and "stream" not in first_turns["body"]
    student_turns = sum(r.usage.teacher_calls for r in alone) + N
    assert len(student) < student_turns  # batched: fewer requests than turns
    teacher = generation_requests(scripted, "teacher")
    assert any(isinstance(r["prompt"], list) and len(r["prompt"]) > 1 for r in teacher)


async def test_budgets_hold_through_the_store(scripted: ScriptedServer) -> None:
    """A user's pool of 3 teacher calls is drawn call by call, as by ``arelay`` one at a time."""
    config = relay_config(scripted, user_budget=Budget(max_teacher_calls=3), max_answer_tokens=60)
    questions = [f"{key(i)} what is {i}?" for i in range(N)]
    script_answers(scripted)
    results = await abatch_relay(questions, config, users=["pool-batch"] * N)
    calls = sum(r.usage.teacher_calls for r in results)
    assert calls == 3
    assert all(r.user_budget is not None for r in results)
    declined = [e for r in results for e in r.events if e.kind == "declined_call"]
    assert declined and all(e.scope == "user" for e in declined)


async def test_a_chat_api_sends_each_request_alone(scripted: ScriptedServer) -> None:
    chat = {"api": "chat"}
    config = relay_config(scripted, student=chat, teacher=chat, max_answer_tokens=60)
    alone, together = await both(scripted, config)
    assert [comparable(r) for r in together] == [comparable(r) for r in alone]
    assert all(isinstance(r["prompt"], str) for r in scripted.requests() if r["path"].startswith("/v1/"))


async def test_a_failed_answer_raises_or_takes_its_place(scripted: ScriptedServer) -> None:
    config = relay_config(scripted, student={"max_retries": 0}, max_answer_tokens=60)
    script_answers(scripted)
    scripted.faults("student", ["500"] * 4)  # the list request, then each prompt alone
    questions = [f"{key(i)} what is {i}?" for i in range(3)]
    with pytest.raises(Exception, match="student endpoint"):
        await abatch_relay(questions, config)
    scripted.faults("student", ["500"] * 4)
    results = await abatch_relay(questions, config, return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results)


async def test_one_prompt_that_fails_fails_its_answer_alone(scripted: ScriptedServer) -> None:
    """A list request that fails is sent again prompt by prompt: a failed list request costs
    the others nothing, and a prompt that always fails fails only its own answer."""
    config = relay_config(scripted, student={"max_retries": 0}, max_answer_tokens=60)
    script_answers(scripted)
    scripted.script("student", key(1), [{"fault": "500"}], repeat=True)
    questions = [f"{key(i)} what is {i}?" for i in range(4)]
    results = await abatch_relay(questions, config, return_exceptions=True)
    assert isinstance(results[1], Exception) and "student endpoint" in str(results[1])
    student = generation_requests(scripted, "student")
    scripted.reset()
    script_answers(scripted)
    alone = [await arelay(questions[i], config) for i in (0, 2, 3)]
    assert [comparable(results[i]) for i in (0, 2, 3)] == [comparable(r) for r in alone]
    assert isinstance(student[0]["prompt"], list) and len(student[0]["prompt"]) == 4
    assert [len(r["prompt"]) if isinstance(r["prompt"], list) else 1 for r in student[1:5]] == [1, 1, 1, 1]


def test_batch_relay_blocks(scripted: ScriptedServer) -> None:
    config = relay_config(scripted, max_answer_tokens=60)
    script_answers(scripted)
    (result,) = batch_relay([f"{key(0)} what is 0?"], config)
    assert isinstance(result, RelayResult) and result.text.endswith("\\boxed{0}.")
    assert asyncio.run(arelay(f"{key(4)} what is 4?", config)).finish_reason == "stop"


async def test_chat_relay_abatch_takes_the_batch_path(scripted: ScriptedServer) -> None:
    config = relay_config(scripted, max_answer_tokens=60)
    script_answers(scripted)
    chat = ChatRelay(config=config)
    questions = [f"{key(i)} what is {i}?" for i in range(8)]
    replies = await chat.abatch(questions)
    student = generation_requests(scripted, "student")
    assert isinstance(student[0]["prompt"], list) and len(student[0]["prompt"]) == 8
    scripted.reset()
    script_answers(scripted)
    alone = [await chat.ainvoke(q) for q in questions]
    assert [r.text for r in replies] == [r.text for r in alone]
    assert [r.response_metadata["relay"] for r in replies] == [r.response_metadata["relay"] for r in alone]
    assert [r.usage_metadata for r in replies] == [r.usage_metadata for r in alone]


def test_chat_relay_batch_with_callbacks_runs_each_call(scripted: ScriptedServer) -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Starts(BaseCallbackHandler):
        count = 0

        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            Starts.count += 1

    script_answers(scripted)
    chat = ChatRelay(config=relay_config(scripted, max_answer_tokens=60))
    replies = chat.batch([f"{key(0)} q", f"{key(4)} q"], config={"callbacks": [Starts()]})
    assert Starts.count == 2 and all(r.text.endswith("}.") for r in replies)


async def test_a_cancelled_batch_closes_its_requests(scripted: ScriptedServer) -> None:
    script_answers(scripted)
    scripted.faults("student", ["hang"])
    config = relay_config(scripted, max_answer_tokens=60)
    run = asyncio.ensure_future(abatch_relay([f"{key(i)} q" for i in range(4)], config))
    await asyncio.sleep(0.5)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    for _ in range(50):
        if generation_requests(scripted, "student")[0]["disconnected"]:
            break
        await asyncio.sleep(0.05)
    assert generation_requests(scripted, "student")[0]["disconnected"]


async def test_concurrent_arelay_calls_share_requests(scripted: ScriptedServer) -> None:
    """``arelay`` calls running at once in one event loop batch their requests; one running
    alone sends its own request at once, as before."""
    config = relay_config(scripted, max_answer_tokens=60)
    questions = [f"{key(i)} what is {i}?" for i in range(8)]
    script_answers(scripted)
    alone = [await arelay(q, config) for q in questions]
    assert all(isinstance(r["prompt"], str) for r in generation_requests(scripted, "student"))
    scripted.reset()
    script_answers(scripted)
    together = await asyncio.gather(*(arelay(q, config) for q in questions))
    assert [comparable(r) for r in together] == [comparable(r) for r in alone]
    first = generation_requests(scripted, "student")[0]
    assert isinstance(first["prompt"], list) and len(first["prompt"]) == 8


@pytest.mark.parametrize("answers", [1, 3])
async def test_cancelled_answers_close_the_request_they_were_alone_in(
    scripted: ScriptedServer, answers: int
) -> None:
    config = relay_config(scripted, max_answer_tokens=60)
    scripted.faults("student", ["hang"])
    tasks = [asyncio.ensure_future(arelay(f"{key(i)} what is {i}?", config)) for i in range(answers)]
    for _ in range(100):
        if generation_requests(scripted, "student"):
            break
        await asyncio.sleep(0.02)
    (request,) = generation_requests(scripted, "student")
    if answers == 1:
        assert isinstance(request["prompt"], str)  # a request of its own
    else:
        assert isinstance(request["prompt"], list) and len(request["prompt"]) == answers
    for task in tasks[:-1]:
        task.cancel()
    await asyncio.sleep(0.2)
    assert not generation_requests(scripted, "student")[0]["disconnected"]  # one answer still waits
    tasks[-1].cancel()
    for _ in range(100):
        if generation_requests(scripted, "student")[0]["disconnected"]:
            break
        await asyncio.sleep(0.02)
    assert generation_requests(scripted, "student")[0]["disconnected"]


class ClosingServer:
    """A TCP server that accepts each connection, reads the request and closes it unanswered:
    an upstream that cannot be reached for a reply; counts the requests it was sent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.requests.append(conn.recv(65536).split(b"\r\n", 1)[0])

    def close(self) -> None:
        self.sock.close()


async def test_a_server_that_cannot_answer_fails_the_list_request_once(scripted: ScriptedServer) -> None:
    """Sent again prompt by prompt, a request the server cannot answer would fail as often: the
    list request's connection error is every answer's, with the endpoint named."""
    closing = ClosingServer()
    try:
        config = relay_config(
            scripted,
            student={"base_url": closing.url, "max_retries": 0, "context_tokens": 512},
            max_answer_tokens=60,
        )
        questions = [f"{key(i)} what is {i}?" for i in range(3)]
        results = await abatch_relay(questions, config, return_exceptions=True)
    finally:
        closing.close()
    assert all(isinstance(r, openai.APIConnectionError) for r in results), results
    assert all(f"student endpoint {closing.url}" in str(r) for r in results)
    generations = [line for line in closing.requests if b"/completions" in line]
    assert generations == [b"POST /v1/completions HTTP/1.1"]
