"""The emulated model's tokenizer, vocabulary and chat template (pure functions and data)."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from relay_agents.prompts import content_text

# The " ?" prefix of the punctuation branch must not swallow the "<" of a special token, so
# that "<call>" is one token even after a space (" <call>" -> " ", "<call>").
_SPECIAL = r"</?call>|<\|[a-z_]+\|>"
_TOKEN_RE = re.compile(rf"{_SPECIAL}| ?[A-Za-z]+| ?\d| ?(?!{_SPECIAL})[^\sA-Za-z\d]|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<call>", "</call>", "<|im_start|>", "<|im_end|>")
CALL_TOKEN = "<call>"
#: The end-of-sequence token, as vLLM reports it in log-probabilities (never in the text).
EOS_TOKEN = "<|im_end|>"


def tokenize(text: str) -> list[str]:
    """Split ``text`` into tokens; lossless (``"".join(tokenize(t)) == t``)."""
    return _TOKEN_RE.findall(text)


def render_chat(
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render ``messages`` with ChatML, as the server's chat template does; text content parts
    are joined with a newline, as vLLM joins them. Tools, tool calls and tool results render as
    Qwen 2.5's template writes them (the tools in the system turn, calls in ``<tool_call>``,
    results in ``<tool_response>``)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    if tools:
        first = messages[0] if isinstance(messages[0], dict) else {}
        system = ""
        if first.get("role") == "system":
            system = content_text(first.get("content"), joiner="\n") + "\n\n"
            messages = messages[1:]
        listed = "".join(json.dumps(tool, sort_keys=True) + "\n" for tool in tools)
        out.append(f"<|im_start|>system\n{system}# Tools\n<tools>\n{listed}</tools><|im_end|>\n")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("each message must be an object with a role")
        content = content_text(message.get("content"), joiner="\n")
        role = message["role"]
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        for call in message.get("tool_calls") or []:
            content += _tool_call_text(call)
        text = f"<|im_start|>{role}\n{content}"
        is_last = i == len(messages) - 1
        out.append(text if continue_final_message and is_last else text + "<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _tool_call_text(call: dict[str, Any]) -> str:
    """A call of an assistant message, its JSON-text arguments written as an object."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    with contextlib.suppress(ValueError):  # arguments that are not JSON stay as written
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    return f"<tool_call>\n{json.dumps({'name': function.get('name'), 'arguments': arguments})}\n</tool_call>"


class Vocabulary:
    """Token ids, handed out as tokens are first seen: stable for the server's lifetime, so
    that ids from ``/tokenize`` can be sent back as a prompt or in ``logit_bias``."""

    def __init__(self) -> None:
        self._ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        self._tokens = list(SPECIAL_TOKENS)

    def token_id(self, token: str) -> int:
        if token not in self._ids:
            self._ids[token] = len(self._tokens)
            self._tokens.append(token)
        return self._ids[token]

    def detokenize(self, ids: list[Any]) -> str:
        """The text of ``ids``; ValueError naming the ids that are not in the vocabulary."""
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < len(self._tokens)]
        if bad:
            raise ValueError(f"token ids {bad} are out of vocabulary")
        return "".join(self._tokens[i] for i in ids)
