"""The difficulty-aware GRPO rewards of the RelayLLM paper, for one group of rollouts.

The reward teaches the student *when* to call: 1.5 for solving a problem alone (the
independence bonus), 1 − call ratio for solving it with the teacher, −1.0 for failing
without a call where a call was needed, and the call ratio itself (an exploration reward)
when neither model solves the problem. Two ways to decide a problem's difficulty:

* ``mode="group"`` infers it from the group of rollouts, exactly as the published code does
  (``GROUP_TABLE``);
* ``mode="oracle"`` takes it per problem (``alone``, ``teacher``, ``neither``), as the paper
  defines the cases (``ORACLE_TABLE``), e.g. from the teacher-pass filter's counts and a
  student-alone pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from relay_agents.core.protocol import call_ratio as teacher_share
from relay_agents.core.result import RelayRecord

RewardMode = Literal["group", "oracle"]
Difficulty = Literal["alone", "teacher", "neither"]
#: ``requested``: the sum of requested N over the response length (the published code's);
#: ``teacher``: teacher tokens over all answer tokens (the paper's reported call ratio).
CallRatioDefinition = Literal["requested", "teacher"]

#: The published code caps every requested N at this many tokens before summing.
CALL_TOKEN_CAP = 4096
INDEPENDENCE_BONUS = 1.5
FAILURE_PENALTY = -1.0

#: A well-formed command; N is read from its digits (any other ``<call>`` text requests nothing).
_COMMAND = re.compile(r"<call>\s*(\d+)\s*</call>")


def requested_calls(text: str) -> list[int]:
    """The N of every well-formed ``<call>N</call>`` in a rollout's text, in order."""
    return [int(n) for n in _COMMAND.findall(text)]


def requested_call_ratio(text: str, response_tokens: int, *, cap: int = CALL_TOKEN_CAP) -> float:
    """The published code's call ratio: the sum of requested N, each at most ``cap``, over the
    response's length in tokens, at most 1 (an empty response has ratio 0)."""
    if response_tokens <= 0:
        return 0.0
    requested = sum(min(n, cap) for n in requested_calls(text))
    return min(requested / response_tokens, 1.0)


def record_call_ratio(record: RelayRecord) -> float:
    """The paper's call ratio of a relayed answer: teacher tokens over all answer tokens."""
    return teacher_share(record.usage.student_tokens, record.usage.teacher_tokens)


def record_called(record: RelayRecord) -> bool:
    """Whether the student asked for the teacher at all (answered, declined or cut alike)."""
    return record.usage.teacher_calls > 0 or any(e.requested is not None for e in record.events)


def _group_reward(correct: bool, called: bool, ratio: float, *, alone: bool, with_teacher: bool) -> float:
    """One cell of the published code's table; ``alone``/``with_teacher``: the group holds a
    correct answer without / with a call."""
    if correct:
        return INDEPENDENCE_BONUS if not called else 1.0 - ratio
    if alone:
        return 0.0
    if with_teacher:
        return FAILURE_PENALTY if not called else 0.0
    return ratio if called else 0.0


def _oracle_reward(correct: bool, called: bool, ratio: float, difficulty: Difficulty) -> float:
    """One cell of the paper's table by difficulty: a correct answer earns the same whatever
    the difficulty; only the failures differ (a missed call on a problem that needed the
    teacher is punished, a call on one that neither model solves is explored)."""
    if correct:
        return INDEPENDENCE_BONUS if not called else 1.0 - ratio
    if difficulty == "teacher":
        return FAILURE_PENALTY if not called else 0.0
    if difficulty == "neither":
        return ratio if called else 0.0
    return 0.0


def relay_rewards(
    correct: Sequence[bool],
    called: Sequence[bool],
    call_ratio: Sequence[float],
    *,
    mode: RewardMode = "group",
    difficulty: Difficulty | None = None,
) -> list[float]:
    """The rewards of one GRPO group: the rollouts of one problem, in order.

    ``call_ratio`` values must lie in [0, 1] (:func:`requested_call_ratio` and
    :func:`record_call_ratio` compute them). ``difficulty`` is required with ``mode="oracle"``
    and refused with ``mode="group"``, where the group itself decides it.
    """
    if not len(correct) == len(called) == len(call_ratio):
        counts = f"{len(correct)} correct, {len(called)} called, {len(call_ratio)} ratios"
        raise ValueError(f"one entry per rollout: {counts}")
    if any(not 0.0 <= r <= 1.0 for r in call_ratio):
        raise ValueError(f"call ratios must lie in [0, 1]: {list(call_ratio)}")
    rows = list(zip(correct, called, call_ratio, strict=True))
    if mode == "group":
        if difficulty is not None:
            raise ValueError("mode='group' infers the difficulty from the group: pass no difficulty")
        alone = any(ok and not c for ok, c, _ in rows)
        with_teacher = any(ok and c for ok, c, _ in rows)
        return [_group_reward(ok, c, r, alone=alone, with_teacher=with_teacher) for ok, c, r in rows]
    if mode == "oracle":
        if difficulty not in get_args(Difficulty):
            raise ValueError(f"mode='oracle' needs difficulty in {get_args(Difficulty)}, not {difficulty!r}")
        return [_oracle_reward(ok, c, r, difficulty) for ok, c, r in rows]
    raise ValueError(f"mode must be one of {get_args(RewardMode)}, not {mode!r}")


def _text(completion: Any) -> str:
    """A completion in TRL's standard (text) or conversational (messages) form, as text."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion)


def _group_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)


@dataclass(frozen=True)
class RelayReward:
    """:func:`relay_rewards` as a TRL reward function: ``(prompts, completions, **kwargs)``.

    Rollouts with the same prompt in one call form a group (TRL's sampler puts a prompt's
    ``num_generations`` rollouts in one batch; a group split across processes is scored by
    the part each process holds). Per rollout it reads, first found:

    * correctness: a ``correct`` column (a rollout function's extra field), else the
      completion graded against ``answer_column`` with the evaluation grader;
    * the call and its ratio: a ``relay_record`` column (a :class:`RelayRecord` or its dict),
      else the completion's text and its length in ``completion_ids`` (``requested`` only).
    """

    mode: RewardMode = "group"
    call_ratio: CallRatioDefinition = "requested"
    answer_column: str = "answer"
    difficulty_column: str = "difficulty"

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        texts = [_text(c) for c in completions]
        correct = self._correct(texts, kwargs)
        called, ratios = self._calls(texts, completion_ids, kwargs.get("relay_record"))
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(_group_key(prompt), []).append(i)
        rewards = [0.0] * len(texts)
        for rows in groups.values():
            difficulty = kwargs[self.difficulty_column][rows[0]] if self.mode == "oracle" else None
            scored = relay_rewards(
                [correct[i] for i in rows],
                [called[i] for i in rows],
                [ratios[i] for i in rows],
                mode=self.mode,
                difficulty=difficulty,
            )
            for i, reward in zip(rows, scored, strict=True):
                rewards[i] = reward
        return rewards

    def _correct(self, texts: list[str], kwargs: Mapping[str, Any]) -> list[bool]:
        if "correct" in kwargs:
            return [bool(c) for c in kwargs["correct"]]
        from relay_agents.eval.data import Problem
        from relay_agents.eval.grading import grade

        answers = kwargs[self.answer_column]
        choices = kwargs.get("choices") or [()] * len(texts)
        problems = [
            Problem(id=str(i), question="", answer=str(answer), choices=tuple(options or ()))
            for i, (answer, options) in enumerate(zip(answers, choices, strict=True))
        ]
        return [grade(text, problem).correct for text, problem in zip(texts, problems, strict=True)]

    def _calls(
        self,
        texts: list[str],
        completion_ids: Sequence[Sequence[int]] | None,
        records: Sequence[RelayRecord | Mapping[str, Any]] | None,
    ) -> tuple[list[bool], list[float]]:
        if records is not None:
            parsed = [r if isinstance(r, RelayRecord) else RelayRecord.model_validate(r) for r in records]
            called = [record_called(r) for r in parsed]
            if self.call_ratio == "teacher":
                return called, [record_call_ratio(r) for r in parsed]
            lengths = [r.usage.student_tokens + r.usage.teacher_tokens for r in parsed]
            return called, [requested_call_ratio(t, n) for t, n in zip(texts, lengths, strict=True)]
        if self.call_ratio == "teacher":
            raise ValueError(
                "call_ratio='teacher' needs a relay_record column (the text has no teacher tokens)"
            )
        if completion_ids is None:
            raise ValueError("call_ratio='requested' needs completion_ids (the response length in tokens)")
        called = [bool(requested_calls(t)) for t in texts]
        lengths = [len(ids) for ids in completion_ids]
        return called, [requested_call_ratio(t, n) for t, n in zip(texts, lengths, strict=True)]
