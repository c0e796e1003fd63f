"""The data every layer exchanges: messages, continuation requests and what they produced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: An OpenAI-style chat message (``{"role": ..., "content": ...}``).
Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token as the server reported it: its text, its log-probability and the
    top-k alternatives (``(token, logprob)``), any of which may be missing."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(slots=True)
class Request:
    """A continuation request, independent of the API used to send it."""

    messages: list[Message]
    answer: str
    max_tokens: int
    stop: list[str] | None = None
    suppress_calls: bool = False
    enable_thinking: bool = False
    logprobs: int | None = None  # top-k token log-probabilities to ask for (None: none)
    #: Also count the reply's text with the endpoint's tokenizer (``Generation.text_tokens``).
    count_with_tokenizer: bool = False
    #: Tools the model may call (OpenAI ``tools`` entries), rendered by its chat template.
    tools: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class Generation:
    """What one streamed request produced."""

    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    prompt_tokens: int
    completion_tokens: int
    error: Exception | None = None  # the stream broke after its first chunk
    cut: bool = False  # a watch cut the reply before a token (``text`` ends just before it)
    discarded_tokens: int = 0  # tokens generated after the cut (paid for, not in ``text``)
    #: The request was cut to this many tokens to fit the endpoint's context (0: no room was
    #: left, nothing was sent); ``None``: it asked for all it wanted.
    context_room: int | None = None
    #: The reply's text re-encoded by the endpoint's tokenizer (no special tokens, so no EOS),
    #: when the request asked for it; ``None``: not counted.
    text_tokens: int | None = None

    @property
    def reported_tokens(self) -> int:
        """The tokens results report for this reply: the re-encoded text's when counted, else
        the server's usage (what was paid for, which budgets always charge)."""
        return self.completion_tokens if self.text_tokens is None else self.text_tokens

    @property
    def hit_stop_string(self) -> bool:
        return self.finish_reason == "stop" and isinstance(self.stop_reason, str)

    @property
    def context_full(self) -> bool:
        """The reply ended because the endpoint's context has no more room."""
        return self.context_room is not None and self.finish_reason == "length"
