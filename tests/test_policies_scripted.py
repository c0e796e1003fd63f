"""Call policies end to end against the scripted server (real HTTP, vLLM's wire formats).

The scripted student reports a probability for each token it writes; the tests assert the exact
token where the teacher takes over, in the completions and chat formats, streamed and whole.
"""

from __future__ import annotations

import pytest

from relay_agents import (
    Budget,
    ConfidencePolicy,
    IntervalPolicy,
    RandomPolicy,
    RelayResult,
    TeacherOnlyPolicy,
    arelay,
    astream_relay,
)
from relay_agents.testing import ScriptedServer, tokenize
from tests.conftest import relay_config

ANSWER = "So 47*6 = 282, then 282 + 8 = 290. \\boxed{290}"
TOKENS = tokenize(ANSWER)
UNSURE = TOKENS.index(" 2")  # the first digit of the hard product
REST = "".join(TOKENS[UNSURE + 3 :])  # what the student writes after the teacher's " 282"


def probs(low: dict[int, float]) -> list[float | None]:
    return [low.get(i) for i in range(len(TOKENS))]


def requests(server: ScriptedServer, model: str) -> list[dict]:
    return [r for r in server.requests() if r["model"] == model and r["path"].startswith("/v1/")]


async def run(question: str, config, streamed: bool) -> tuple[RelayResult, str | None]:
    if not streamed:
        return await arelay(question, config), None
    stream = astream_relay(question, config)
    text = "".join([d.text async for d in stream])
    assert stream.result is not None
    return stream.result, text


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_the_teacher_writes_from_the_first_unsure_token(
    scripted: ScriptedServer, api: str, streamed: bool
) -> None:
    # " 2" has probability 0.3; a later token is unsure too, but the teacher has taken over by then
    scripted.script(
        "student", "Q-conf", [{"text": ANSWER, "probs": probs({UNSURE: 0.3, UNSURE + 5: 0.1})}, REST]
    )
    scripted.script("teacher", "Q-conf", [" 282 and more"])
    policy = ConfidencePolicy(threshold=0.5, call_tokens=3, top_logprobs=2)
    config = relay_config(scripted, student={"api": api}, teacher={"api": api}, policy=policy)
    result, text = await run("Q-conf", config, streamed)

    assert [(s.source, s.text, s.tokens) for s in result.spans] == [
        ("student", "So 47*6 =", UNSURE),
        ("teacher", " 282", 3),
        ("student", REST, len(tokenize(REST))),
    ]
    assert result.text == ANSWER and result.events == []
    assert (result.usage.teacher_calls, result.usage.teacher_tokens) == (1, 3)
    if streamed:
        assert text == result.text
        assert result.usage.student_discarded_tokens == 1  # the stream stopped at the unsure token
    else:  # the whole reply came back and was cut after the fact
        assert result.usage.student_discarded_tokens == len(TOKENS) - UNSURE

    first, second = requests(scripted, "student")
    if api == "completions":
        assert first["body"]["logprobs"] == 2 and "top_logprobs" not in first["body"]
    else:
        assert first["body"]["logprobs"] is True and first["body"]["top_logprobs"] == 2
    (teacher,) = requests(scripted, "teacher")
    assert teacher["body"]["max_tokens"] == 3
    assert teacher["prompt"].endswith("assistant\nSo 47*6 =")
    # the student resumes after the teacher's text; no command was ever written
    resumed = second["prompt"] if api == "completions" else second["body"]["messages"][-1]["content"]
    assert resumed.endswith("So 47*6 = 282") and "<call>" not in resumed


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_a_whole_reply_is_cut_where_its_stream_is(scripted: ScriptedServer, api: str) -> None:
    # a whole reply that ended on EOS lists the EOS token in its log-probabilities but not in its
    # text (as vLLM does): the text before the unsure token is still the student's span
    answer = "65*7 = 455\n455 + 3 = 458\n\\boxed{458}"
    tokens = tokenize(answer)
    unsure = tokens.index(" 4") + 1  # the second digit of the product
    rest = answer[len("65*7 = 455") :]
    low = [0.2 if i == unsure else None for i in range(len(tokens))]
    spans = []
    for streamed in (False, True):
        scripted.reset()
        scripted.script("student", "Q-eos", [{"text": answer, "probs": low}, rest])
        scripted.script("teacher", "Q-eos", ["55"])
        policy = ConfidencePolicy(threshold=0.5, call_tokens=2, top_logprobs=1)
        config = relay_config(scripted, student={"api": api}, teacher={"api": api}, policy=policy)
        result, _ = await run("Q-eos", config, streamed)
        assert result.text == answer
        spans.append([(s.source, s.text, s.tokens) for s in result.spans])
    whole, streamed = spans
    assert whole == streamed
    assert whole == [
        ("student", "65*7 = 4", unsure),
        ("teacher", "55", 2),
        ("student", rest, len(tokenize(rest))),
    ]


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_the_entropy_bound_cuts_where_the_probability_alone_does_not(
    scripted: ScriptedServer, streamed: bool
) -> None:
    # p=0.6 passes the 0.5 threshold; with 4 alternatives at 0.1 each its top-5 entropy is 1.23 nats
    scripted.script("student", "Q-ent", [{"text": ANSWER, "probs": probs({UNSURE: 0.6})}, REST])
    scripted.script("teacher", "Q-ent", [" 282"])
    policy = ConfidencePolicy(threshold=0.5, max_entropy=1.0, call_tokens=3, top_logprobs=5)
    result, _ = await run("Q-ent", relay_config(scripted, policy=policy), streamed)
    assert [s.source for s in result.spans] == ["student", "teacher", "student"]
    assert result.spans[0].text == "So 47*6 ="


async def test_a_confident_student_is_never_interrupted(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-sure", [{"text": ANSWER, "probs": probs({UNSURE: 0.9})}])
    result = await arelay("Q-sure", relay_config(scripted, policy=ConfidencePolicy(threshold=0.5)))
    assert result.text == ANSWER and result.usage.teacher_calls == 0
    assert requests(scripted, "teacher") == []


async def test_the_teacher_stops_at_a_step_boundary(scripted: ScriptedServer) -> None:
    answer = "47*6 = 282\n282 + 8 = 290\n\\boxed{290}"
    tokens = tokenize(answer)
    unsure = tokens.index(" 2")
    rest = "282 + 8 = 290\n\\boxed{290}"
    low = [0.2 if i == unsure else None for i in range(len(tokens))]
    scripted.script("student", "Q-step", [{"text": answer, "probs": low}, rest])
    scripted.script("teacher", "Q-step", [" 282\n282 + 8"])
    policy = ConfidencePolicy(threshold=0.5, call_tokens=20, until="step")
    result = await arelay("Q-step", relay_config(scripted, policy=policy))
    assert [(s.source, s.text) for s in result.spans] == [
        ("student", "47*6 ="),
        ("teacher", " 282\n"),
        ("student", rest),
    ]
    assert result.finish_reason == "stop" and result.finished_by == "student"
    (teacher,) = requests(scripted, "teacher")
    assert teacher["body"]["stop"] == ["\n"] and teacher["body"]["include_stop_str_in_output"] is True
    assert teacher["body"]["max_tokens"] == 20


async def test_min_tokens_between_calls_skips_an_unsure_token_too_close(scripted: ScriptedServer) -> None:
    # unsure at " 2" and again two tokens after the teacher's text: the second is inside the gap
    second = "".join(TOKENS[UNSURE + 3 :])
    tail = tokenize(second)
    low_again = [0.1 if i == 2 else None for i in range(len(tail))]
    scripted.script(
        "student",
        "Q-gap",
        [{"text": ANSWER, "probs": probs({UNSURE: 0.1})}, {"text": second, "probs": low_again}],
    )
    scripted.script("teacher", "Q-gap", [" 282"])
    policy = ConfidencePolicy(threshold=0.5, call_tokens=3)
    result = await arelay("Q-gap", relay_config(scripted, policy=policy, min_tokens_between_calls=3))
    assert result.usage.teacher_calls == 1 and result.text == ANSWER
    # without the gap the second unsure token is a call of its own
    scripted.reset()
    scripted.script(
        "student",
        "Q-gap",
        [
            {"text": ANSWER, "probs": probs({UNSURE: 0.1})},
            {"text": second, "probs": low_again},
            "".join(tail[2:]),
        ],
    )
    scripted.script("teacher", "Q-gap", [" 282", "".join(tail[2:5])])
    result = await arelay("Q-gap", relay_config(scripted, policy=policy))
    assert result.usage.teacher_calls == 2
    assert [s.source for s in result.spans] == ["student", "teacher", "student", "teacher", "student"]
    assert result.spans[2].text == "".join(tail[:2])


async def test_a_spent_budget_declines_the_call_and_the_student_goes_on_from_the_cut(
    scripted: ScriptedServer,
) -> None:
    scripted.script("student", "Q-spent", [{"text": ANSWER, "probs": probs({UNSURE: 0.1})}, " 282" + REST])
    config = relay_config(
        scripted, policy=ConfidencePolicy(threshold=0.5), budget=Budget(max_teacher_calls=0)
    )
    result = await arelay("Q-spent", config, conversation_id="conv-spent")
    assert [e.kind for e in result.events] == ["declined_call"]
    assert result.events[0].reason == "budget_calls" and result.events[0].scope == "conversation"
    assert result.text == ANSWER and result.usage.teacher_calls == 0
    _, second = requests(scripted, "student")
    # the resumed student is not watched any more and may not call
    assert "logprobs" not in second["body"] and second["body"]["bad_words"] == ["<call>", "</call>"]
    assert second["prompt"].endswith("So 47*6 =")


async def test_calls_per_answer_come_from_the_turn_budget(scripted: ScriptedServer) -> None:
    second = "".join(TOKENS[UNSURE + 3 :])
    scripted.script(
        "student",
        "Q-turn",
        [{"text": ANSWER, "probs": probs({UNSURE: 0.1})}, {"text": second, "probs": [None, None, None, 0.1]}],
    )
    scripted.script("teacher", "Q-turn", [" 282"])
    config = relay_config(
        scripted,
        policy=ConfidencePolicy(threshold=0.5, call_tokens=3),
        turn_budget=Budget(max_teacher_calls=1),
    )
    result = await arelay("Q-turn", config)
    assert result.usage.teacher_calls == 1 and result.events == [] and result.text == ANSWER
    assert "logprobs" not in requests(scripted, "student")[1]["body"]  # no call could be granted


async def test_target_share_holds_the_next_call_back(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-share", ["a b", " c d e f g h", " i j"])
    scripted.script("teacher", "Q-share", [" 1 2", " 3 4"])
    policy = IntervalPolicy(every=2, call_tokens=2)
    result = await arelay("Q-share", relay_config(scripted, policy=policy, target_teacher_share=0.25))
    # after the first call the share is 2/4: the student must write 5 more tokens (2/9 < 0.25)
    assert [r["body"]["max_tokens"] for r in requests(scripted, "student")][:2] == [2, 5]
    assert result.usage.teacher_calls == 2


async def test_interval_policy_calls_every_k_student_tokens(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-int", ["a b c d e f g", " e f g h", " i"])
    scripted.script("teacher", "Q-int", [" 1 2", " 3 4"])
    result = await arelay("Q-int", relay_config(scripted, policy=IntervalPolicy(every=4, call_tokens=2)))
    assert [(s.source, s.text) for s in result.spans] == [
        ("student", "a b c d"),
        ("teacher", " 1 2"),
        ("student", " e f g h"),
        ("teacher", " 3 4"),
        ("student", " i"),
    ]
    assert [r["body"]["max_tokens"] for r in requests(scripted, "student")][:2] == [4, 4]
    assert all("logprobs" not in r["body"] for r in requests(scripted, "student"))


async def test_random_policy_is_reproducible(scripted: ScriptedServer) -> None:
    long = " ".join(f"w{i}" for i in range(60))
    config = relay_config(
        scripted, policy=RandomPolicy(rate=0.2, call_tokens=1, seed=5), max_student_turns=100
    )

    async def once() -> tuple[list[int], RelayResult]:
        scripted.reset()
        scripted.configure(default_response=long)
        result = await arelay("Q-rand", config)
        return [r["body"]["max_tokens"] for r in requests(scripted, "student")], result

    limits, result = await once()
    assert (limits, result.text) == ((await once())[0], (await once())[1].text)
    assert result.usage.teacher_calls >= 3
    assert len(set(limits)) > 1  # drawn gaps, not a fixed interval


async def test_teacher_only_writes_the_whole_answer(scripted: ScriptedServer) -> None:
    scripted.script("teacher", "Q-only", ["The teacher answers. \\boxed{1}"])
    result = await arelay("Q-only", relay_config(scripted, policy=TeacherOnlyPolicy(), max_answer_tokens=50))
    assert [s.source for s in result.spans] == ["teacher"] and result.finished_by == "teacher"
    assert requests(scripted, "student") == []
    assert requests(scripted, "teacher")[0]["body"]["max_tokens"] == 50


async def test_teacher_only_falls_back_to_the_student_when_the_budget_is_spent(
    scripted: ScriptedServer,
) -> None:
    scripted.script("student", "Q-only-spent", ["The student answers."])
    config = relay_config(scripted, policy="teacher_only", turn_budget=Budget(max_teacher_calls=0))
    result = await arelay("Q-only-spent", config)
    assert result.text == "The student answers." and requests(scripted, "teacher") == []


async def test_teacher_free_never_watches_or_calls(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-free", [{"text": ANSWER, "probs": probs({UNSURE: 0.1})}])
    result = await arelay("Q-free", relay_config(scripted, policy="teacher_free"))
    assert result.text == ANSWER and result.usage.teacher_calls == 0
    (request,) = requests(scripted, "student")
    assert "logprobs" not in request["body"] and request["body"]["bad_words"] == ["<call>", "</call>"]


async def test_command_policy_waits_the_gap_after_a_call(scripted: ScriptedServer) -> None:
    scripted.script("student", "Q-cmd-gap", ["x =<call>2</call>", " y z w", " <call>2</call>", " v"])
    scripted.script("teacher", "Q-cmd-gap", [" 1 2", " 3 4"])
    result = await arelay("Q-cmd-gap", relay_config(scripted, min_tokens_between_calls=3))
    student = requests(scripted, "student")
    assert student[1]["body"]["max_tokens"] == 3 and student[1]["body"]["bad_words"] == ["<call>", "</call>"]
    assert "bad_words" not in student[2]["body"]
    assert result.usage.teacher_calls == 2
