"""Training a relay student (extra ``train``): the teacher-pass filter, cold-start SFT data and
the difficulty-aware GRPO rewards of the RelayLLM paper.

The student learns *when* to call: cold-start SFT teaches the ``<call>N</call>`` syntax, then
GRPO with rewards that depend on the problem's difficulty teaches it to call only where it
cannot go alone. Problems the teacher cannot solve are filtered out first.
"""

from __future__ import annotations

from relay_agents.train.rewards import (
    CALL_TOKEN_CAP,
    Difficulty,
    RelayReward,
    RewardMode,
    record_call_ratio,
    record_called,
    relay_rewards,
    requested_call_ratio,
    requested_calls,
)

__all__ = [
    "CALL_TOKEN_CAP",
    "Difficulty",
    "RelayReward",
    "RewardMode",
    "record_call_ratio",
    "record_called",
    "relay_rewards",
    "requested_call_ratio",
    "requested_calls",
]
