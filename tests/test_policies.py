"""Call policies as data: parsing from code, TOML and environment, and the pure decisions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from relay_agents import (
    CommandPolicy,
    ConfidencePolicy,
    IntervalPolicy,
    RandomPolicy,
    RelayConfig,
    TeacherFreePolicy,
    TeacherOnlyPolicy,
    load_config,
)
from relay_agents.clients import _Collector, parse_logprobs
from relay_agents.config import ConfigError
from relay_agents.core.config import identity
from relay_agents.core.policies import AnswerSoFar, plan_turn, share_gate, top_entropy
from relay_agents.core.types import TokenLogprob

ENDPOINTS = {
    "student": {"base_url": "http://127.0.0.1:1/v1", "model": "s"},
    "teacher": {"base_url": "http://127.0.0.1:2/v1", "model": "t"},
}
ENDPOINTS_ENV = {
    "RELAY_STUDENT_BASE_URL": "http://127.0.0.1:1/v1",
    "RELAY_STUDENT_MODEL": "s",
    "RELAY_TEACHER_BASE_URL": "http://127.0.0.1:2/v1",
    "RELAY_TEACHER_MODEL": "t",
}


def config(**kw: object) -> RelayConfig:
    return RelayConfig.model_validate({**ENDPOINTS, **kw})


def so_far(**kw: object) -> AnswerSoFar:
    values: dict = {
        "student_tokens": 0,
        "teacher_tokens": 0,
        "teacher_calls": 0,
        "since_call": None,
        "tokens_left": 1000,
        "calls_open": True,
        "key": "q",
    }
    values.update(kw)
    return AnswerSoFar(**values)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("shorthand", "cls"),
    [
        ("command", CommandPolicy),
        ("teacher_free", TeacherFreePolicy),
        ("teacher_only", TeacherOnlyPolicy),
        ("confidence", ConfidencePolicy),
        ("interval", IntervalPolicy),
        ("random", RandomPolicy),
    ],
)
def test_string_shorthands(shorthand: str, cls: type) -> None:
    policy = config(policy=shorthand).policy
    assert type(policy) is cls and policy == shorthand and policy.kind == shorthand


def test_default_is_the_command_policy() -> None:
    assert config().policy == CommandPolicy() == "command"


def test_a_policy_with_settings_is_not_its_bare_shorthand() -> None:
    policy = config(policy=ConfidencePolicy(threshold=0.3)).policy
    assert policy != "confidence" and policy == ConfidencePolicy(threshold=0.3)
    assert hash(policy) == hash(ConfidencePolicy(threshold=0.3))


def test_policy_table_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[student]\nbase_url = "http://127.0.0.1:1/v1"\nmodel = "s"\n'
        '[teacher]\nbase_url = "http://127.0.0.1:2/v1"\nmodel = "t"\n'
        '[policy]\nkind = "confidence"\nthreshold = 0.25\ncall_tokens = 6\nuntil = "step"\n'
    )
    loaded = load_config(path, env={})
    assert loaded.policy == ConfidencePolicy(threshold=0.25, call_tokens=6, until="step")


def test_policy_from_environment() -> None:
    env = {
        **ENDPOINTS_ENV,
        "RELAY_POLICY": "interval",
        "RELAY_POLICY_EVERY": "12",
        "RELAY_MIN_TOKENS_BETWEEN_CALLS": "3",
        "RELAY_TARGET_TEACHER_SHARE": "0.1",
    }
    loaded = load_config(None, env=env)
    assert loaded.policy == IntervalPolicy(every=12)
    assert loaded.min_tokens_between_calls == 3 and loaded.target_teacher_share == 0.1


def test_environment_settings_join_a_toml_shorthand(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('policy = "confidence"\n')
    env = {
        **ENDPOINTS_ENV,
        "RELAY_POLICY_THRESHOLD": "0.2",
    }
    assert load_config(path, env=env).policy == ConfidencePolicy(threshold=0.2)


def test_a_policy_of_another_kind_in_the_environment_replaces_the_toml_table(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[policy]\nkind = "confidence"\nthreshold = 0.25\n')
    interval = {**ENDPOINTS_ENV, "RELAY_POLICY": "interval"}
    assert load_config(path, env=interval).policy == IntervalPolicy()
    # The same kind keeps the file's settings and takes the environment's on top.
    same = {**ENDPOINTS_ENV, "RELAY_POLICY": "confidence", "RELAY_POLICY_CALL_TOKENS": "6"}
    assert load_config(path, env=same).policy == ConfidencePolicy(threshold=0.25, call_tokens=6)


def test_bad_policies_name_the_field() -> None:
    env = {
        **ENDPOINTS_ENV,
        "RELAY_POLICY": "confidence",
        "RELAY_POLICY_THRESHOLD": "1.5",
    }
    with pytest.raises(ConfigError, match=r"threshold.*RELAY_POLICY_THRESHOLD"):
        load_config(None, env=env)
    with pytest.raises(ValueError, match="policy"):
        config(policy="sometimes")


def test_config_round_trips_through_json() -> None:
    original = config(policy=RandomPolicy(rate=0.2, seed=7, call_tokens=3), target_teacher_share=0.1)
    # the shared graph is keyed and rebuilt this way (relay_agents.graph.shared_relay_graph)
    assert RelayConfig.model_validate_json(identity(original)) == original


# --------------------------------------------------------------------------- decisions


def test_confidence_cuts_below_the_threshold_or_above_the_entropy_bound() -> None:
    policy = ConfidencePolicy(threshold=0.5, max_entropy=1.0)
    sure = TokenLogprob("a", math.log(0.9), (("a", math.log(0.9)), ("b", math.log(0.1))))
    unsure = TokenLogprob("a", math.log(0.4), ())
    spread = TokenLogprob("a", math.log(0.6), tuple((str(i), math.log(0.1)) for i in range(4)))
    assert not policy.is_unsure(sure)
    assert policy.is_unsure(unsure)
    assert top_entropy(spread.top) == pytest.approx(math.log(4))  # renormalised: uniform over 4
    assert policy.is_unsure(spread)  # p=0.6 passes the threshold, the entropy does not
    assert not ConfidencePolicy(threshold=0.5).is_unsure(spread)


def test_confidence_plan_watches_from_the_gap() -> None:
    policy = ConfidencePolicy(threshold=0.5, top_logprobs=3)
    plan = plan_turn(policy, so_far(since_call=2), min_gap=5, target_share=None)
    assert plan.logprobs == 3 and plan.watch_from == 3 and plan.max_tokens is None
    unsure = TokenLogprob("x", math.log(0.1))
    assert not plan.unsure(2, unsure) and plan.unsure(3, unsure)
    # before the first call the gap does not apply
    assert plan_turn(policy, so_far(), min_gap=5, target_share=None).watch_from == 0


def test_target_share_delays_the_next_call() -> None:
    # 10 teacher tokens, 20 student: the share falls below 0.2 only after 31 more student tokens
    answer = so_far(student_tokens=20, teacher_tokens=10)
    assert share_gate(answer, 0.2) == 21
    assert 10 / (20 + 21 + 10) < 0.2 <= 10 / (20 + 20 + 10)
    assert share_gate(answer, None) == 0 and share_gate(so_far(), 0.2) == 0


def test_interval_plan_counts_from_the_last_call() -> None:
    policy = IntervalPolicy(every=10)
    assert plan_turn(policy, so_far(), min_gap=0, target_share=None).max_tokens == 10
    after_length = plan_turn(policy, so_far(student_tokens=4), min_gap=0, target_share=None)
    assert after_length.max_tokens == 6 and after_length.call_at_limit
    assert plan_turn(policy, so_far(since_call=3), min_gap=0, target_share=None).max_tokens == 7
    near_the_end = plan_turn(policy, so_far(tokens_left=5), min_gap=0, target_share=None)
    assert near_the_end.max_tokens is None and not near_the_end.call_at_limit


def test_random_plan_is_reproducible_and_keeps_its_rate() -> None:
    policy = RandomPolicy(rate=0.1, seed=3)
    gaps = [
        plan_turn(policy, so_far(key=f"q{i}"), min_gap=0, target_share=None).max_tokens for i in range(4000)
    ]
    again = [
        plan_turn(policy, so_far(key=f"q{i}"), min_gap=0, target_share=None).max_tokens for i in range(4000)
    ]
    assert gaps == again
    assert all(g is not None and g >= 1 for g in gaps)
    mean = sum(gaps) / len(gaps)  # type: ignore[arg-type]
    assert 9.3 < mean < 10.7  # a geometric gap with p=0.1 has mean 10
    other_seed = RandomPolicy(rate=0.1, seed=4)
    assert gaps[:50] != [
        plan_turn(other_seed, so_far(key=f"q{i}"), min_gap=0, target_share=None).max_tokens for i in range(50)
    ]


def test_closed_calls_plan_a_plain_turn() -> None:
    for policy in (ConfidencePolicy(), IntervalPolicy(), RandomPolicy(), TeacherOnlyPolicy()):
        plan = plan_turn(policy, so_far(calls_open=False), min_gap=0, target_share=None)
        assert plan.logprobs is None and plan.max_tokens is None and not plan.call_at_start


def test_teacher_only_calls_before_the_student_writes() -> None:
    assert plan_turn(TeacherOnlyPolicy(), so_far(), min_gap=0, target_share=None).call_at_start


def test_command_policy_blocks_calls_inside_the_gap() -> None:
    plan = plan_turn(CommandPolicy(), so_far(since_call=1), min_gap=4, target_share=None)
    assert plan.max_tokens == 3 and plan.suppress_calls and not plan.call_at_limit
    assert plan_turn(CommandPolicy(), so_far(since_call=4), min_gap=4, target_share=None).max_tokens is None


# --------------------------------------------------------------------------- the wire formats


def test_logprobs_in_the_completions_format() -> None:
    payload = {
        "tokens": [" 4", "0"],
        "token_logprobs": [-0.1, -2.0],
        "top_logprobs": [{" 4": -0.1, " 5": -2.4}, {"0": -2.0}],
        "text_offset": [0, 2],
    }
    assert parse_logprobs(payload) == [
        TokenLogprob(" 4", -0.1, ((" 4", -0.1), (" 5", -2.4))),
        TokenLogprob("0", -2.0, (("0", -2.0),)),
    ]


def test_logprobs_in_the_chat_format() -> None:
    payload = {
        "content": [
            {
                "token": " 4",
                "logprob": -0.1,
                "bytes": [32, 52],
                "top_logprobs": [{"token": " 4", "logprob": -0.1}, {"token": " 5", "logprob": -2.4}],
            }
        ]
    }
    assert parse_logprobs(payload) == [TokenLogprob(" 4", -0.1, ((" 4", -0.1), (" 5", -2.4)))]


def whole_reply(text: str, tokens: list[str], probs: list[float], usage: int | None = None) -> dict:
    """A whole (non-streamed) completions reply in vLLM's format."""
    return {
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": {"tokens": tokens, "token_logprobs": [math.log(p) for p in probs]},
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": usage or len(tokens)},
    }


def test_a_whole_reply_that_ended_on_eos_is_cut_before_the_unsure_token() -> None:
    # vLLM lists the EOS token in a whole reply's log-probabilities, not in its text: the token
    # texts do not spell the text, yet the text before the unsure token is kept (a bug dropped it)
    tokens = ["6", "5", "*", "7", " =", " ", "4", "4", "4", "\n", "\\boxed{", "444", "}", "<|im_end|>"]
    text = "".join(tokens[:-1])
    probs = [0.99] * len(tokens)
    probs[7] = 0.2  # the second digit of the product
    policy = ConfidencePolicy(threshold=0.9)
    collector = _Collector(None, lambda _i, t: policy.is_unsure(t))
    collector.add(whole_reply(text, tokens, probs))
    gen = collector.result()
    assert (gen.text, gen.completion_tokens, gen.discarded_tokens, gen.cut) == ("65*7 = 4", 7, 7, True)
    assert gen.finish_reason is None


def test_a_chunk_whose_tokens_do_not_start_its_text_is_dropped_with_its_tokens() -> None:
    # undecodable bytes: the token texts are not the text; nothing of the chunk is kept, and the
    # kept token count says so too (the text and its token count stay one answer)
    tokens = ["bytes:\\xe2", "bytes:\\x82\\xac", "5", "0"]
    probs = [0.99, 0.99, 0.99, 0.1]
    policy = ConfidencePolicy(threshold=0.9)
    collector = _Collector(None, lambda _i, t: policy.is_unsure(t))
    collector.add(whole_reply("€50", tokens, probs))
    gen = collector.result()
    assert (gen.text, gen.completion_tokens, gen.discarded_tokens) == ("", 0, 4)


def test_the_watch_sees_each_token_at_its_place_in_the_turn() -> None:
    seen: list[tuple[int, str]] = []
    collector = _Collector(None, lambda i, t: bool(seen.append((i, t.token))) or t.token == "c")
    for chunk in (["a", "b"], ["c", "d"]):
        reply = whole_reply("".join(chunk), chunk, [1.0, 1.0])
        collector.add(reply)
    assert seen == [(0, "a"), (1, "b"), (2, "c")]
    assert "".join(collector.parts) == "ab" and collector.tokens == 2
