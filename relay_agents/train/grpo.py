"""GRPO with real relay rollouts on TRL's ``GRPOTrainer`` (``relay-agents train grpo``).

TRL samples completions itself; here its ``rollout_func`` hook hands generation to
:class:`~relay_agents.train.rollouts.RelayRollouts`, so every rollout is a relay: the policy
writes, the teacher endpoint fills each granted call, and the teacher's tokens are in the
sequence but out of the loss (``env_mask``). The reward is the difficulty-aware one of the
RelayLLM paper (:class:`~relay_agents.train.rewards.RelayReward`) or, for the ablation, plain
correctness. Checkpoints are TRL's: plain Transformers model directories that vLLM serves.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from relay_agents.core.config import DEFAULT_USER_TEMPLATE, Endpoint
from relay_agents.settings import load_settings
from relay_agents.train.rewards import RelayReward, _text
from relay_agents.train.rollouts import RelayRollouts, RolloutSettings

RewardKind = Literal["group", "oracle", "correctness"]


class StudentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The cold-started student: a Transformers model directory or hub id.")


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description='JSONL, one problem a line: {"question", "answer", "difficulty"?}.')
    user_template: str = DEFAULT_USER_TEMPLATE


class FilterSettings(BaseModel):
    """The teacher-pass filter the training set goes through first (``relay-agents train filter``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    k: int = Field(default=16, ge=1)
    rule: str = Field(default="any", description="'any' or 'max-failures:F/S'.")
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    out: Path | None = Field(default=None, description="Kept problems; default DATA.kept.jsonl.")


class RewardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: ``group``/``oracle``: the difficulty-aware rewards; ``correctness``: 1 if correct, else 0
    mode: RewardKind = "group"


class GRPOSettings(BaseModel):
    """``train.toml``: ``[student]``, ``[teacher]`` (an endpoint), ``[data]``, ``[filter]``, ``[reward]``,
    ``[rollout]`` (with ``[rollout.budget]``) and ``[grpo]``, which is TRL's ``GRPOConfig`` as is."""

    model_config = ConfigDict(extra="forbid")

    student: StudentSettings
    teacher: Endpoint
    data: DataSettings
    filter: FilterSettings = Field(default_factory=FilterSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    grpo: dict[str, Any] = Field(default_factory=dict)

    @field_validator("grpo")
    @classmethod
    def _trl_options(cls, grpo: dict[str, Any]) -> dict[str, Any]:
        """Name a key that is not a ``GRPOConfig`` option here, not deep inside TRL."""
        try:
            from trl import GRPOConfig
        except ImportError:  # without the train extra nothing trains; build_trainer says so
            return grpo
        options = {f.name for f in dataclasses.fields(GRPOConfig)}
        unknown = sorted(set(grpo) - options)
        if unknown:
            close = difflib.get_close_matches(unknown[0], options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not an option "
                f"of TRL's GRPOConfig{hint}; the table takes GRPOConfig's options as they are"
            )
        return grpo


def load_grpo_settings(path: str | os.PathLike[str], **overrides: Any) -> GRPOSettings:
    """The config file, under ``RELAY_TRAIN_*`` variables, under ``overrides``."""
    return load_settings(
        GRPOSettings,
        path=path,
        env=os.environ,
        prefix="RELAY_TRAIN_",
        overrides=overrides,
        what="GRPO training config",
    )


def correctness_reward(
    prompts: Sequence[Any], completions: Sequence[Any], *_: Any, correct: Sequence[bool], **__: Any
) -> list[float]:
    """The ablation's reward: 1 for a correct answer, 0 otherwise, calls free."""
    return [1.0 if ok else 0.0 for ok in correct]


class RelayMetrics:
    """Grades each rollout once (``correct``, passed on to the reward) and logs accuracy, calls
    and the teacher share through TRL's ``log_metric`` (so ``report_to`` gets them)."""

    __name__ = "relay"

    def __init__(self, reward: Any) -> None:
        self.reward = reward

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        *,
        answer: Sequence[str],
        teacher_tokens: Sequence[int],
        called: Sequence[bool],
        log_metric: Any = None,
        **kwargs: Any,
    ) -> list[float]:
        from relay_agents.eval.data import Problem
        from relay_agents.eval.grading import grade

        texts = [_text(c) for c in completions]
        correct = [
            grade(t, Problem(id="", question="", answer=str(a))).correct
            for t, a in zip(texts, answer, strict=True)
        ]
        lengths = [len(ids) for ids in completion_ids or []]
        if log_metric is not None:
            n = len(texts)
            log_metric("relay/accuracy", sum(correct) / n)
            log_metric("relay/calls", sum(called) / n)
            log_metric("relay/teacher_share", sum(teacher_tokens) / max(1, sum(lengths)))
        return self.reward(
            prompts, completions, completion_ids, answer=answer, correct=correct, called=called, **kwargs
        )


def filtered_data(settings: GRPOSettings) -> Path:
    """The training set after the teacher-pass filter (resumed if run before), every column of
    a kept line as it was; the data file itself when the filter is off."""
    import asyncio
    import json

    from relay_agents.core.config import RelayConfig
    from relay_agents.eval.data import load_jsonl
    from relay_agents.train.filter import FilterOptions, parse_rule, run_filter

    path = settings.data.path
    if not settings.filter.enabled:
        return path
    options = settings.filter
    out = options.out or path.with_name(f"{path.stem}.kept.jsonl")
    # the filter samples the teacher only; the relay config is its carrier
    config = RelayConfig(
        student=settings.teacher, teacher=settings.teacher, user_template=settings.data.user_template
    )
    summary = asyncio.run(
        run_filter(
            config,
            load_jsonl(path),
            out,
            FilterOptions(
                k=options.k,
                rule=parse_rule(options.rule),
                temperature=options.temperature,
                top_p=options.top_p,
            ),
        )
    )
    if summary.failed:
        raise RuntimeError(f"the filter failed on {len(summary.failed)} problems; run again to retry them")
    kept = {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()}
    training = out.with_name(f"{out.stem}.train.jsonl")
    with training.open("w") as f:
        for number, line in enumerate(path.read_text().splitlines(), 1):  # load_jsonl's numbering
            if line.strip() and str(json.loads(line).get("id", number)) in kept:
                f.write(line + "\n")
    return training


def load_prompts(path: Path, user_template: str) -> Any:
    """The problems as a ``datasets.Dataset`` with a conversational ``prompt`` column."""
    import json

    from datasets import Dataset

    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        content = user_template.replace("{question}", str(row["question"]))
        rows.append({**row, "answer": str(row["answer"]), "prompt": [{"role": "user", "content": content}]})
    return Dataset.from_list(rows)


def build_trainer(settings: GRPOSettings, *, grpo_overrides: Mapping[str, Any] | None = None) -> Any:
    """TRL's ``GRPOTrainer`` on ``settings``, its generation replaced by relay rollouts."""
    from trl import GRPOConfig, GRPOTrainer

    grpo = {**settings.grpo, **(grpo_overrides or {})}
    args = GRPOConfig(**grpo)
    if settings.reward.mode == "correctness":
        reward: Any = correctness_reward
    else:
        # the published code's call ratio (requested N over the response length): the text has it
        reward = RelayReward(mode=settings.reward.mode, call_ratio="requested")
    rollouts = RelayRollouts(settings.teacher, settings.rollout)
    return GRPOTrainer(
        model=settings.student.model,
        reward_funcs=[RelayMetrics(reward)],
        args=args,
        train_dataset=load_prompts(filtered_data(settings), settings.data.user_template),
        rollout_func=rollouts,
    )


def train_grpo(settings: GRPOSettings, **grpo_overrides: Any) -> Path:
    """Train, save the final model (with its tokenizer) in ``output_dir`` and return it."""
    trainer = build_trainer(settings, grpo_overrides=grpo_overrides)
    trainer.train()
    out = Path(trainer.args.output_dir)
    trainer.save_model(str(out))
    return out
