"""Named presets: the settings of a known setup, applied in one switch.

A preset is a set of :class:`~relay_agents.core.config.RelayConfig` values applied under the
configuration (anything set explicitly wins). ``published`` is the RelayLLM paper's evaluation
loop; where the default differs from it, and why, is listed in ``docs/protocol-deviations.md``.
The thinking mode is not part of any preset: it is always set explicitly (``enable_thinking``)
and reported with every result, because the published evaluation script and the published
training render prompts differently (thinking on and off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel

#: The published evaluation's user-prompt suffix (the default user template ends with it).
PUBLISHED_PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
#: Both models are sampled at this temperature in the published evaluation (top_p: the server's).
PUBLISHED_TEMPERATURE = 0.7

PresetName = Literal["published"]

PRESETS: dict[str, dict[str, Any]] = {
    "published": {
        "student": {"temperature": PUBLISHED_TEMPERATURE},
        "teacher": {"temperature": PUBLISHED_TEMPERATURE},
        "user_template": "{question}\n" + PUBLISHED_PROMPT_SUFFIX,
        "system_prompt": None,
        "policy": {"kind": "command"},
        "max_answer_tokens": 8192,
        "max_student_turns": 5,
        "max_call_tokens": None,
        "on_malformed_call": "fail",
        "on_teacher_failure": "raise",
        "token_count": "tokenizer",
    },
}


def preset_values(name: str) -> dict[str, Any]:
    """The values of preset ``name`` (a fresh copy, nested tables included)."""
    try:
        values = PRESETS[name.strip()]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None
    return {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}


def apply_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` over the values of the preset it names (``preset``), if any: what ``data`` sets
    wins, an endpoint's settings key by key (only those set on an ``Endpoint`` object)."""
    name = data.get("preset")
    if not isinstance(name, str) or name.strip() not in PRESETS:
        return dict(data)  # no preset, or an unknown one the field's own validation names
    out = preset_values(name)
    for key, value in data.items():
        if isinstance(value, BaseModel) and key in ("student", "teacher"):
            value = value.model_dump(exclude_unset=True)
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "policy":
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    out["preset"] = name.strip()
    return out
