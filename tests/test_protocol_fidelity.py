"""Where the relay follows the published evaluation loop on odd student and teacher text
(stray and unclosed tags, huge N, a call on the last turn, markup written by the teacher),
end to end against the scripted server."""

from __future__ import annotations

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver

from relay_agents import RelayConfig, RelayResult, arelay, astream_relay, build_relay_graph
from relay_agents.testing import ScriptedServer, tokenize
from tests.conftest import relay_config


def generation_requests(server: ScriptedServer, model: str) -> list[dict]:
    return [r for r in server.requests() if r["model"] == model and r["path"].startswith("/v1/")]


async def streamed_and_result(question: str, config: RelayConfig) -> tuple[str, RelayResult]:
    stream = astream_relay(question, config)
    text = "".join([d.text async for d in stream])
    assert stream.result is not None
    return text, stream.result


async def test_a_stray_call_tag_is_student_text(scripted: ScriptedServer) -> None:
    """The command is the last <call> before </call>: the stray tag and the text after it
    reach the teacher as written, and the clean text keeps the text (not the tag)."""
    for key in ("Q-stray-live", "Q-stray-whole"):
        scripted.script("student", key, ["I will <call> maybe later, now 7*8 = <call>2</call>", ". So 56."])
        scripted.script("teacher", key, [" 56"])
    streamed, live = await streamed_and_result("Q-stray-live", relay_config(scripted))
    whole = await arelay("Q-stray-whole", relay_config(scripted))
    expected = "I will maybe later, now 7*8 = 56. So 56."
    assert streamed == live.text == whole.text == expected
    teacher = generation_requests(scripted, "teacher")
    assert [r["body"]["max_tokens"] for r in teacher] == [2, 2]
    assert teacher[0]["prompt"].endswith("assistant\nI will <call> maybe later, now 7*8 =")
    resumed = generation_requests(scripted, "student")[1]
    assert resumed["prompt"].endswith("assistant\nI will <call> maybe later, now 7*8 = <call>2</call> 56")


async def test_text_after_an_unclosed_call_is_released_when_the_answer_ends(
    scripted: ScriptedServer,
) -> None:
    scripted.script("student", "Q-unclosed", ["Hmm <call> no, I know: \\boxed{2}"])
    streamed, result = await streamed_and_result("Q-unclosed", relay_config(scripted))
    assert streamed == result.text == "Hmm no, I know: \\boxed{2}"
    assert result.finish_reason == "stop" and result.usage.teacher_calls == 0


async def test_a_huge_n_is_clamped_for_a_checkpointer(scripted: ScriptedServer) -> None:
    student = "x <call>99999999999999999999</call>"
    scripted.script("student", "Q-huge", [student, " y"])
    scripted.script("teacher", "Q-huge", [{"text": " t u v"}])
    graph = build_relay_graph(relay_config(scripted), checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "huge"}}
    state = await graph.ainvoke({"messages": [HumanMessage("Q-huge")]}, thread)
    assert state["messages"][-1].text == "x t u v"
    (request,) = generation_requests(scripted, "teacher")
    assert request["body"]["max_tokens"] == 8192 - len(tokenize(student))  # min(N, tokens left)
    saved = (await graph.aget_state(thread)).values["answer"]
    assert saved["teacher_calls"] == 1 and saved["call"] is None
    assert (saved["finish_reason"], saved["finished_by"]) == ("stop", "teacher")


async def test_a_call_on_the_last_turn_ends_the_answer(scripted: ScriptedServer) -> None:
    """As the published loop: the 5th turn's call is not answered; the command stays in the
    student's view, and the clean text has no markup."""
    scripted.script("student", "Q-last", [f"s{i} <call>1</call>" for i in range(5)])
    scripted.script("teacher", "Q-last", [f" t{c}" for c in "abcde"])
    graph = build_relay_graph(relay_config(scripted), checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "last"}}
    state = await graph.ainvoke({"messages": [HumanMessage("Q-last")]}, thread)
    assert len(generation_requests(scripted, "teacher")) == 4
    assert len(generation_requests(scripted, "student")) == 5
    answer = (await graph.aget_state(thread)).values["answer"]
    assert (answer["finish_reason"], answer["finished_by"]) == ("turn_limit", "student")
    assert answer["teacher_calls"] == 4 and answer["student_turns"] == 5
    assert answer["student_view"].endswith(" tds4 <call>1</call>")
    assert state["messages"][-1].text == "s0 tas1 tbs2 tcs3 tds4 "


async def test_markup_written_by_the_teacher_is_not_shown(scripted: ScriptedServer) -> None:
    for key in ("Q-tmark-live", "Q-tmark-whole"):
        scripted.script("student", key, ["a <call>6</call>", " then <call>20</call>"])
        scripted.script("teacher", key, [" b <call>zz</call> c", " d <call>3</call> e"])
    streamed, live = await streamed_and_result("Q-tmark-live", relay_config(scripted))
    whole = await arelay("Q-tmark-whole", relay_config(scripted))
    assert streamed == live.text == whole.text == "a b  c then d  e"
    assert [s.text for s in whole.spans if s.source == "teacher"] == [" b  c", " d  e"]
    assert whole.finished_by == "teacher"
    # The student's context keeps the teacher's text as written; the teacher's view drops
    # only well-formed commands.
    teacher = generation_requests(scripted, "teacher")
    assert teacher[1]["prompt"].endswith("assistant\na   b <call>zz</call> c then")
    resumed = generation_requests(scripted, "student")[1]
    assert resumed["prompt"].endswith("assistant\na <call>6</call> b <call>zz</call> c")
