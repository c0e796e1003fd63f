"""Call policies: who decides where the teacher writes, decided from data only (no I/O).

A student trained by RelayLLM writes ``<call>N</call>`` itself (:class:`CommandPolicy`); any
other student never does, so the library decides for it. Before each student turn the answer
state machine asks the policy for a :class:`TurnPlan` (how far the student may write, whether to
ask for token log-probabilities, from which token a call may start); while the student's tokens
arrive, the plan's :meth:`TurnPlan.unsure` says at which token the teacher takes over (the
confidence policy). The nodes do the I/O; everything here is plain data in, plain data out.

Run-time controls that hold for every policy (``RelayConfig``): ``max_call_tokens`` (largest N
per call), ``min_tokens_between_calls``, ``target_teacher_share`` (no call starts while the
answer's teacher share is at or above it) and ``turn_budget.max_teacher_calls`` (calls per
answer).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from relay_agents.core.types import TokenLogprob

Until = Literal["tokens", "step"]


# --------------------------------------------------------------------------- policies


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str

    def __eq__(self, other: object) -> bool:
        # ``config.policy == "teacher_free"`` keeps working: a shorthand string equals the
        # policy of that kind with its default settings.
        if isinstance(other, str):
            try:
                return super().__eq__(parse_policy(other))
            except ValueError:
                return False
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.model_dump().items())))

    @property
    def watches_tokens(self) -> bool:
        """Whether the student's turns need token log-probabilities."""
        return False


class CommandPolicy(_Policy):
    """The trained student's own ``<call>N</call>`` (the published protocol)."""

    kind: Literal["command"] = "command"


class TeacherFreePolicy(_Policy):
    """Calls blocked from the start: the published teacher-free evaluation."""

    kind: Literal["teacher_free"] = "teacher_free"


class TeacherOnlyPolicy(_Policy):
    """The teacher writes the whole answer (one call for every token left); if a budget
    declines it, the student answers instead."""

    kind: Literal["teacher_only"] = "teacher_only"


class _Calling(_Policy):
    """A policy that calls on its own: how much the teacher writes per call."""

    call_tokens: int = Field(default=8, ge=1, description="Tokens the teacher writes per call (N).")
    until: Until = Field(
        default="tokens",
        description="`tokens`: the teacher writes `call_tokens` tokens; `step`: it stops earlier "
        "at `step_boundary` (kept), `call_tokens` being the cap. `step` needs a teacher that "
        "reports vLLM's `stop_reason` (completions or chat API).",
    )
    step_boundary: str = Field(default="\n", min_length=1)

    def teacher_stop(self) -> list[str] | None:
        return [self.step_boundary] if self.until == "step" else None


class ConfidencePolicy(_Calling):
    """The teacher takes over at the first token the student is unsure of.

    Unsure: the sampled token's probability is below ``threshold``, or (with ``max_entropy``)
    the entropy of the renormalised top-k distribution, in nats, is above it. The student's text
    is cut just before that token, which never reaches the answer.
    """

    kind: Literal["confidence"] = "confidence"
    threshold: float = Field(default=0.5, ge=0, le=1)
    max_entropy: float | None = Field(default=None, gt=0)
    top_logprobs: int = Field(
        default=5, ge=0, le=20, description="Alternatives asked per token (for the entropy)."
    )

    @property
    def watches_tokens(self) -> bool:
        return True

    def is_unsure(self, token: TokenLogprob) -> bool:
        if token.logprob is not None and math.exp(token.logprob) < self.threshold:
            return True
        return self.max_entropy is not None and top_entropy(token.top) > self.max_entropy


class IntervalPolicy(_Calling):
    """A call after every ``every`` student tokens (the evaluation's fixed-rate baseline)."""

    kind: Literal["interval"] = "interval"
    every: int = Field(default=32, ge=1)


class RandomPolicy(_Calling):
    """Each student token starts a call with probability ``rate`` (the random baseline).

    Draws are seeded by ``seed``, the conversation and the position in the answer, so a run
    is reproducible and a resumed answer draws the same.
    """

    kind: Literal["random"] = "random"
    rate: float = Field(default=0.05, gt=0, le=1)
    seed: int = 0


Policy = (
    CommandPolicy | TeacherFreePolicy | TeacherOnlyPolicy | ConfidencePolicy | IntervalPolicy | RandomPolicy
)
PolicySpec = Annotated[Policy, Field(discriminator="kind")]
POLICY_KINDS = ("command", "teacher_free", "teacher_only", "confidence", "interval", "random")
_ADAPTER: TypeAdapter[Policy] = TypeAdapter(PolicySpec)


def parse_policy(value: Any) -> Policy:
    """A policy from a policy object, a shorthand string (``"confidence"``) or a mapping with
    ``kind`` (a TOML ``[policy]`` table)."""
    if isinstance(value, _Policy):
        return value  # type: ignore[return-value]
    if isinstance(value, str):
        value = {"kind": value.strip()}
    try:
        return _ADAPTER.validate_python(value)
    except Exception as exc:
        raise ValueError(f"invalid policy {value!r}: {exc}") from None


def normalise_policy_input(data: Any) -> Any:
    """Turn a ``policy`` given as a string into its ``{"kind": ...}`` table (before validation)."""
    if isinstance(data, dict) and isinstance(data.get("policy"), str):
        return {**data, "policy": {"kind": data["policy"].strip()}}
    return data


# --------------------------------------------------------------------------- decisions


def top_entropy(top: tuple[tuple[str, float], ...]) -> float:
    """Entropy (nats) of the top-k alternatives, renormalised to sum to one."""
    probs = [math.exp(lp) for _, lp in top if lp is not None and lp > -math.inf]
    total = sum(probs)
    if total <= 0:
        return 0.0
    return -sum(p / total * math.log(p / total) for p in probs if p > 0)


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """What one student turn may do under the policy.

    ``max_tokens``: the most the student may write this turn (``None``: up to the answer cap).
    ``call_at_limit``: reaching ``max_tokens`` is the policy's call (interval, random).
    ``suppress_calls``: the student's own commands are blocked this turn.
    ``logprobs``: top-k log-probabilities to ask for (``None``: none).
    ``watch_from``: the first token of the turn at which :meth:`unsure` may cut (``None``: no
    watch). ``call_at_start``: the teacher writes before the student (teacher-only).
    """

    max_tokens: int | None = None
    call_at_limit: bool = False
    suppress_calls: bool = False
    logprobs: int | None = None
    watch_from: int | None = None
    call_at_start: bool = False
    confidence: ConfidencePolicy | None = None

    def unsure(self, index: int, token: TokenLogprob) -> bool:
        """Whether the teacher takes over before this token (``index`` counts from the turn's start)."""
        if self.confidence is None or self.watch_from is None or index < self.watch_from:
            return False
        return self.confidence.is_unsure(token)


@dataclass(frozen=True, slots=True)
class AnswerSoFar:
    """What a policy may look at: the answer's counts, not its text."""

    student_tokens: int
    teacher_tokens: int
    teacher_calls: int
    since_call: int | None  # student tokens since the last call; None before the first
    tokens_left: int
    calls_open: bool  # no block, no spent per-answer budget
    key: str  # identifies the conversation, for seeded draws


def share_gate(answer: AnswerSoFar, target: float | None) -> int:
    """Student tokens still to write before the teacher's share falls below ``target``."""
    t = answer.teacher_tokens
    if target is None or t == 0:
        return 0
    if target <= 0:
        return answer.tokens_left + 1  # never
    needed = math.floor(t / target - answer.student_tokens - t) + 1
    return max(needed, 0)


def plan_turn(policy: Policy, answer: AnswerSoFar, *, min_gap: int, target_share: float | None) -> TurnPlan:
    """The plan of the next student turn (see :class:`TurnPlan`)."""
    gap = 0 if answer.since_call is None else max(min_gap - answer.since_call, 0)
    if isinstance(policy, CommandPolicy):
        if gap > 0 and answer.calls_open:
            # right after a call: the student may not call again until it wrote min_gap tokens
            return TurnPlan(max_tokens=min(gap, answer.tokens_left), suppress_calls=True)
        return TurnPlan()
    if not answer.calls_open or isinstance(policy, TeacherFreePolicy):
        return TurnPlan()
    start = max(gap, share_gate(answer, target_share))
    if isinstance(policy, TeacherOnlyPolicy):
        if start == 0:
            return TurnPlan(call_at_start=True)
        return TurnPlan(max_tokens=min(start, answer.tokens_left), call_at_limit=start < answer.tokens_left)
    if isinstance(policy, ConfidencePolicy):
        return TurnPlan(logprobs=policy.top_logprobs, watch_from=start, confidence=policy)
    if isinstance(policy, IntervalPolicy):
        since = answer.student_tokens if answer.since_call is None else answer.since_call
        quota = policy.every - since
    else:
        assert isinstance(policy, RandomPolicy)
        quota = _geometric(
            policy.rate, f"{policy.seed}|{answer.key}|{answer.student_tokens}|{answer.teacher_calls}"
        )
    quota = max(quota, start, 1)
    if quota >= answer.tokens_left:
        return TurnPlan()
    return TurnPlan(max_tokens=quota, call_at_limit=True)


def _geometric(rate: float, key: str) -> int:
    """Tokens until the first success of a per-token coin with probability ``rate`` (>= 1),
    drawn from a hash of ``key`` (reproducible, no state to checkpoint)."""
    if rate >= 1:
        return 1
    digest = hashlib.sha256(key.encode()).digest()
    u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
    return math.floor(math.log(u) / math.log1p(-rate)) + 1


def call_tokens(policy: Policy, tokens_left: int) -> int:
    """N for a call the policy starts."""
    if isinstance(policy, _Calling):
        return policy.call_tokens
    return tokens_left  # teacher-only: the rest of the answer


def teacher_stop(policy: Policy) -> list[str] | None:
    return policy.teacher_stop() if isinstance(policy, _Calling) else None
