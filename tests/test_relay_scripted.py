"""End-to-end relay against the scripted OpenAI-compatible server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket
import time

import openai
import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver

from relay_agents import Budget, arelay, astream_relay, build_relay_graph, relay, stream_relay
from relay_agents.testing import ScriptedServer, render_chat
from tests.conftest import relay_config

TWICE_STUDENT = [
    "First 12*34 = <call>3</call> never reached",
    ". Then 408+1 = <call>3</call>",
    ". So \\boxed{409}.",
]
TWICE_TEACHER = [" 408 and more", " 409 and more"]


def script_twice(server: ScriptedServer, key: str = "Q-twice") -> None:
    server.script("student", key, TWICE_STUDENT)
    server.script("teacher", key, TWICE_TEACHER)


def generation_requests(server: ScriptedServer, model: str) -> list[dict]:
    return [r for r in server.requests() if r["model"] == model and r["path"].startswith("/v1/")]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_student_that_calls_twice(scripted: ScriptedServer, mode: str) -> None:
    script_twice(scripted)
    config = relay_config(scripted)
    if mode == "sync":
        result = await asyncio.to_thread(relay, "Q-twice: what is 12*34+1?", config)
    else:
        result = await arelay("Q-twice: what is 12*34+1?", config)

    assert result.text == "First 12*34 = 408. Then 408+1 = 409. So \\boxed{409}."
    assert [(s.source, s.text) for s in result.spans] == [
        ("student", "First 12*34 ="),
        ("teacher", " 408"),
        ("student", ". Then 408+1 ="),
        ("teacher", " 409"),
        ("student", ". So \\boxed{409}."),
    ]
    assert result.finish_reason == "stop" and result.finished_by == "student"
    assert (result.usage.teacher_tokens, result.usage.teacher_calls) == (6, 2)
    assert result.usage.call_ratio == pytest.approx(6 / (6 + result.usage.student_tokens))
    assert result.events == []

    teacher = generation_requests(scripted, "teacher")
    assert [r["body"]["max_tokens"] for r in teacher] == [3, 3]
    assert all("stop" not in r["body"] for r in teacher)
    assert teacher[0]["prompt"].endswith("<|im_start|>assistant\nFirst 12*34 =")
    assert teacher[1]["prompt"].endswith("assistant\nFirst 12*34 =   408. Then 408+1 =")
    assert not any("<call>" in r["prompt"] for r in teacher)

    student = generation_requests(scripted, "student")
    assert len(student) == 3
    assert all(r["body"]["stop"] == ["</call>"] for r in student)
    assert all(r["body"]["include_stop_str_in_output"] is True for r in student)
    assert student[2]["prompt"].endswith(
        "assistant\nFirst 12*34 = <call>3</call> 408. Then 408+1 = <call>3</call> 409"
    )
    assert "Please reason step by step, and put your final answer within \\boxed{}." in student[0]["prompt"]

    usage = result.message.usage_metadata
    assert usage is not None
    assert usage["output_tokens"] == result.usage.student_tokens + result.usage.teacher_tokens
    assert usage["input_tokens"] == result.usage.student_prompt_tokens + result.usage.teacher_prompt_tokens
    assert result.usage.student_prompt_tokens > 0 and result.usage.teacher_prompt_tokens > 0


async def test_streamed_text_equals_the_result(scripted: ScriptedServer) -> None:
    script_twice(scripted)
    scripted.configure(token_interval_s=0.001)
    stream = astream_relay("Q-twice", relay_config(scripted))
    deltas = [d async for d in stream]
    assert stream.result is not None
    assert "".join(d.text for d in deltas) == stream.result.text
    assert len(deltas) > 5  # token by token, not one block
    teacher_text = "".join(d.text for d in deltas if d.source == "teacher")
    assert teacher_text == " 408 409"


async def test_whole_replies_unless_streaming(scripted: ScriptedServer) -> None:
    script_twice(scripted, "Q-whole")
    await arelay("Q-whole", relay_config(scripted))
    assert not any(r["body"].get("stream") for r in generation_requests(scripted, "student"))
    script_twice(scripted, "Q-live")
    stream = astream_relay("Q-live", relay_config(scripted))
    _ = [d async for d in stream]
    live = [r for r in generation_requests(scripted, "student") if "Q-live" in r["prompt"]]
    assert live and all(r["body"]["stream"] is True for r in live)
    assert all(r["body"]["stream_options"] == {"include_usage": True} for r in live)


async def test_a_dropped_connection_before_any_byte_is_retried(scripted: ScriptedServer) -> None:
    script_twice(scripted, "Q-drop-whole")
    scripted.faults("teacher", ["drop"])
    result = await arelay("Q-drop-whole", relay_config(scripted))
    assert result.events == [] and result.usage.teacher_calls == 2


def test_sync_stream(scripted: ScriptedServer) -> None:
    script_twice(scripted)
    stream = stream_relay("Q-twice", relay_config(scripted))
    text = "".join(d.text for d in stream)
    assert stream.result is not None and text == stream.result.text


async def test_the_budget_persists_across_turns_of_a_thread(scripted: ScriptedServer) -> None:
    config = relay_config(scripted, budget=Budget(max_teacher_tokens=4))
    graph = build_relay_graph(config, checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "t1"}}
    scripted.script("student", "Q-one", ["a <call>3</call>", " done."])
    scripted.script("teacher", "Q-one", [" 1 2 3 4"])
    state = await graph.ainvoke({"messages": [HumanMessage("Q-one")]}, thread)
    first = state["messages"][-1].response_metadata["relay"]
    assert first["budget"]["spent_teacher_tokens"] == 3
    assert first["budget"]["remaining_teacher_tokens"] == 1

    scripted.script("student", "Q-two", ["b <call>5</call>", " c <call>2</call>", "end."])
    scripted.script("teacher", "Q-two", [" 9 9 9 9 9"])
    state = await graph.ainvoke({"messages": [HumanMessage("Q-two")]}, thread)
    second = state["messages"][-1].response_metadata["relay"]
    assert len(state["messages"]) == 4
    assert second["budget"]["spent_teacher_tokens"] == 4
    kinds = [e["kind"] for e in second["events"]]
    assert kinds == ["truncated_call", "declined_call"]
    assert second["budget"]["exhausted"] is True
    # The declined call left the student's context and calls were blocked (vLLM bad_words).
    last_student = generation_requests(scripted, "student")[-1]
    assert last_student["body"]["bad_words"] == ["<call>", "</call>"]
    assert "<call>2</call>" not in last_student["prompt"]
    assert state["messages"][-1].text == "b 9 c end."

    # A new thread has a fresh budget.
    scripted.script("student", "Q-three", ["x <call>2</call>", " y"])
    scripted.script("teacher", "Q-three", [" 7 7"])
    other = await graph.ainvoke(
        {"messages": [HumanMessage("Q-three")]}, {"configurable": {"thread_id": "t2"}}
    )
    assert other["messages"][-1].response_metadata["relay"]["budget"]["spent_teacher_tokens"] == 2


async def test_a_failed_answer_resumes_and_a_new_question_starts_afresh(scripted: ScriptedServer) -> None:
    """An answer belongs to its question: resuming a failed run continues it; the thread's
    next question does not."""
    config = relay_config(scripted, on_teacher_failure="raise", teacher={"retry_initial_delay": 0.01})
    graph = build_relay_graph(config, checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "t-fail"}}
    scripted.script("student", "Q-fail", ["So x = <call>2</call>", " so x = 7."])
    scripted.script("teacher", "Q-fail", [" 3 4"])
    scripted.faults("teacher", ["500", "500", "500"])
    with pytest.raises(openai.InternalServerError):
        await graph.ainvoke({"messages": [HumanMessage("Q-fail")]}, thread)
    resumed = await graph.ainvoke(None, thread)
    assert resumed["messages"][-1].text == "So x = 3 4 so x = 7."
    assert len(resumed["messages"]) == 2

    scripted.script("student", "Q-again", ["So y = <call>2</call>", " never."])
    scripted.faults("teacher", ["500", "500", "500"])
    with pytest.raises(openai.InternalServerError):
        await graph.ainvoke({"messages": [HumanMessage("Q-again")]}, thread)
    scripted.script("student", "Q-next", ["Fresh answer."])
    state = await graph.ainvoke({"messages": [HumanMessage("Q-next")]}, thread)
    assert state["messages"][-1].text == "Fresh answer."
    assert [m.type for m in state["messages"]] == ["human", "ai", "human", "human", "ai"]


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_dead_teacher_costs_seconds_and_is_reported(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-dead", ["So x = <call>4</call>", "5 by myself."])
    config = relay_config(
        scripted,
        teacher={"base_url": f"http://127.0.0.1:{_dead_port()}/v1", "retry_initial_delay": 0.25},
    )
    started = time.monotonic()
    result = await arelay("Q-dead", config)
    assert (
        time.monotonic() - started < 2.5
    )  # the default retry settings: two retries, then the student goes on
    assert result.text == "So x = 5 by myself."
    assert [e.kind for e in result.events] == ["teacher_failure"]
    assert "teacher unavailable" in result.events[0].message
    resumed = generation_requests(scripted, "student")[-1]
    assert resumed["prompt"].endswith("assistant\nSo x = ") and resumed["body"]["bad_words"] == [
        "<call>",
        "</call>",
    ]


async def test_transient_teacher_errors_are_retried(scripted: ScriptedServer) -> None:
    script_twice(scripted, "Q-retry")
    scripted.faults("teacher", ["429", "503"])
    result = await arelay("Q-retry", relay_config(scripted))
    assert result.events == [] and result.usage.teacher_calls == 2
    assert len(generation_requests(scripted, "teacher")) == 4


async def test_a_400_is_not_retried(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-400", ["x <call>2</call>", " y"])
    scripted.script("teacher", "Q-400", [{"fault": "400"}])
    result = await arelay("Q-400", relay_config(scripted))
    assert [e.kind for e in result.events] == ["teacher_failure"]
    assert len(generation_requests(scripted, "teacher")) == 1


async def test_a_hanging_teacher_times_out(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-hang", ["x <call>2</call>", "y"])
    scripted.faults("teacher", ["hang", "hang"])
    config = relay_config(scripted, teacher={"timeout": 0.3, "max_retries": 1})
    started = time.monotonic()
    result = await arelay("Q-hang", config)
    assert time.monotonic() - started < 3
    assert [e.kind for e in result.events] == ["teacher_failure"]
    assert "Timeout" in result.events[0].message
    assert result.text == "x y"


async def test_a_teacher_stream_that_drops_keeps_what_arrived(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-drop", ["x <call>5</call>", " y"])
    scripted.script("teacher", "Q-drop", [" 1 2 3 4 5"])
    scripted.faults("teacher", ["drop"])
    stream = astream_relay("Q-drop", relay_config(scripted))
    streamed = "".join([d.text async for d in stream])
    result = stream.result
    assert result is not None and streamed == result.text
    assert [e.kind for e in result.events] == ["teacher_failure"]
    assert "broke after 2 tokens" in result.events[0].message
    assert result.usage.teacher_tokens == 2
    assert result.text == "x 1 2 y"


async def test_malformed_json_from_the_teacher(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-garbled", ["x <call>2</call>", "y"])
    scripted.faults("teacher", ["malformed"])
    result = await arelay("Q-garbled", relay_config(scripted))
    assert [e.kind for e in result.events] == ["teacher_failure"]
    assert result.text == "x y"


async def test_on_teacher_failure_raise(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-raise", ["x <call>2</call>", " y"])
    scripted.faults("teacher", ["500", "500", "500"])
    with pytest.raises(openai.InternalServerError):
        await arelay("Q-raise", relay_config(scripted, on_teacher_failure="raise"))


async def test_a_failing_student_raises_the_sdk_error(scripted: ScriptedServer) -> None:
    scripted.faults("student", ["500", "500", "500"])
    with pytest.raises(openai.InternalServerError):
        await arelay("Q-student-down", relay_config(scripted))


async def test_teacher_eos_ends_the_answer(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-eos", ["Let me ask <call>50</call>", " never"])
    scripted.script("teacher", "Q-eos", [" the end."])
    result = await arelay("Q-eos", relay_config(scripted))
    assert result.finish_reason == "stop" and result.finished_by == "teacher"
    assert result.text == "Let me ask the end."
    assert len(generation_requests(scripted, "student")) == 1


async def test_chat_mode_continues_the_final_message(scripted: ScriptedServer) -> None:
    script_twice(scripted, "Q-chat")
    config = relay_config(scripted, student={"api": "chat"}, teacher={"api": "chat"})
    result = await arelay("Q-chat", config)
    assert result.text == "First 12*34 = 408. Then 408+1 = 409. So \\boxed{409}."
    student = generation_requests(scripted, "student")
    assert student[0]["body"]["add_generation_prompt"] is True
    assert student[1]["body"]["continue_final_message"] is True
    assert student[1]["body"]["messages"][-1] == {
        "role": "assistant",
        "content": "First 12*34 = <call>3</call> 408",
    }
    assert student[1]["body"]["chat_template_kwargs"] == {"enable_thinking": False}
    teacher = generation_requests(scripted, "teacher")
    assert teacher[0]["body"]["messages"][-1]["content"] == "First 12*34 ="


async def test_chat_instruct_teacher_is_trimmed_to_n(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-instruct", ["So 12*34 = <call>3</call>", ". Done."])
    scripted.script("teacher", "Q-instruct", [" 408 is the product, surely"])
    config = relay_config(
        scripted, teacher={"api": "chat-instruct", "max_tokens_param": "max_completion_tokens"}
    )
    result = await arelay("Q-instruct", config)
    assert result.text == "So 12*34 = 408. Done."
    (request,) = generation_requests(scripted, "teacher")
    body = request["body"]
    assert body["max_completion_tokens"] == 3
    assert "continue_final_message" not in body and "include_stop_str_in_output" not in body
    assert body["messages"][-1]["role"] == "user"
    assert "<partial_answer>\nSo 12*34 =\n</partial_answer>" in body["messages"][-1]["content"]


async def test_prompt_rendered_by_the_server(scripted: ScriptedServer) -> None:
    script_twice(scripted, "Q-server-template")
    config = relay_config(scripted, student={"chat_template": None}, teacher={"chat_template": None})
    result = await arelay("Q-server-template", config)
    assert result.text.startswith("First 12*34 = 408.")
    # The prompt is exactly the server's own chat template over the protocol's messages.
    user = "Q-server-template\nPlease reason step by step, and put your final answer within \\boxed{}."
    expected = render_chat([{"role": "user", "content": user}])
    first_student = generation_requests(scripted, "student")[0]
    assert first_student["body"]["prompt"] == expected
    assert generation_requests(scripted, "teacher")[0]["body"]["prompt"] == expected + "First 12*34 ="


async def test_logit_bias_suppression(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-bias", ["a <call>2</call>", "b <call>2</call>c"])
    config = relay_config(
        scripted,
        student={"call_suppression": "logit_bias"},
        budget=Budget(max_teacher_calls=0),
    )
    result = await arelay("Q-bias", config)
    assert result.text == "a b c"
    resumed = generation_requests(scripted, "student")[-1]
    assert list(resumed["body"]["logit_bias"].values()) == [-100, -100]


async def test_concurrent_conversations_do_not_mix(scripted: ScriptedServer) -> None:
    letters = "abcdefghijklmnopqrst"
    for i, letter in enumerate(letters):
        scripted.script("student", f"Q-c{i}:", [f"n{i} <call>1</call>", f" end{i}"])
        scripted.script("teacher", f"Q-c{i}:", [f" t{letter} x"])
    questions = [f"Q-c{i}:" for i in range(len(letters))]
    results = await asyncio.gather(*(arelay(q, relay_config(scripted)) for q in questions))
    assert [r.text for r in results] == [f"n{i} t{c} end{i}" for i, c in enumerate(letters)]


async def test_closing_a_stream_early_cancels_the_upstream_request(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-leave", [" ".join(f"w{i}" for i in range(400))])
    scripted.configure(token_interval_s=0.01)
    stream = astream_relay("Q-leave", relay_config(scripted))
    deltas = aiter(stream)
    first = await anext(deltas)
    assert first.source == "student" and first.text
    await deltas.aclose()  # the consumer leaves: the graph's task and its request are cancelled
    deadline = time.monotonic() + 2
    while not generation_requests(scripted, "student")[0]["disconnected"]:
        assert time.monotonic() < deadline, "the upstream request was not cancelled"
        await asyncio.sleep(0.02)
    assert stream.result is None


async def test_image_content_is_refused_not_dropped(scripted: ScriptedServer) -> None:
    question = HumanMessage(
        [{"type": "text", "text": "What is in this picture?"}, {"type": "image", "url": "https://x/y.png"}]
    )
    with pytest.raises(ValueError, match="not supported: relay prompts are text only"):
        await arelay([question], relay_config(scripted))
    assert generation_requests(scripted, "student") == []  # nothing was sent without the image
    text_parts = HumanMessage([{"type": "text", "text": "Q-parts"}, {"type": "text", "text": " twice"}])
    scripted.script("student", "Q-parts", ["Fine."])
    assert (await arelay([text_parts], relay_config(scripted))).text == "Fine."
