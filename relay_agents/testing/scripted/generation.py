"""What the emulated model emits for a scripted text, under vLLM's stop / max_tokens rules."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .tokens import EOS_TOKEN, tokenize

_CALL_RE = re.compile(r"<call>.*?(?:</call>|$)", re.S)


@dataclass
class Generation:
    """What the emulated model emitted: ``pieces`` are the non-empty text deltas (one per
    token, the last possibly cut by a stop string)."""

    pieces: list[str]
    completion_tokens: int
    finish_reason: str
    stop_reason: str | None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def ended_on_eos(self) -> bool:
        return self.finish_reason == "stop" and self.stop_reason is None

    def logprob_tokens(self) -> list[str]:
        """The tokens that log-probabilities list: vLLM lists the EOS token of a reply that
        ended on it (its text is not in the reply's text), so they need not spell the text."""
        return [*self.pieces, EOS_TOKEN] if self.ended_on_eos else list(self.pieces)


def without_calls(text: str) -> str:
    """``text`` as a model that may not emit ``<call>`` writes it (``bad_words`` / ``logit_bias``)."""
    return _CALL_RE.sub("", text)


def generate(
    text: str,
    *,
    stop: list[str] | None = None,
    include_stop_str_in_output: bool = False,
    max_tokens: int | None = None,
    count_eos: bool = False,
) -> Generation:
    """Emit ``text`` token by token (then EOS) under vLLM's stop / max_tokens rules;
    ``count_eos``: the EOS counts in ``completion_tokens``, as vLLM's usage counts it.

    Stop strings are searched incrementally: each step only looks at the new token plus the
    previous ``len(longest stop) - 1`` characters, so the work is linear in the output.
    """
    stops = [s for s in stop or [] if s]
    longest = max(map(len, stops), default=0)
    pieces: list[str] = []
    total = 0  # characters in pieces
    tail = ""  # last (longest - 1) characters of the output
    n = 0
    for tok in tokenize(text):
        if max_tokens is not None and n >= max_tokens:
            return Generation(pieces, n, "length", None)
        n += 1
        pieces.append(tok)
        if stops:
            window = tail + tok
            hits = [(i, s) for s in stops if (i := window.find(s)) >= 0]
            if hits:
                i, s = min(hits)
                keep = total - len(tail) + i + (len(s) if include_stop_str_in_output else 0)
                _truncate(pieces, total + len(tok), keep)
                return Generation(pieces, n, "stop", s)
            tail = window[-(longest - 1) :] if longest > 1 else ""
        total += len(tok)
    if max_tokens is not None and n >= max_tokens:
        return Generation(pieces, n, "length", None)  # no room left for EOS
    return Generation(pieces, n + int(count_eos), "stop", None)


def _truncate(pieces: list[str], total: int, keep: int) -> None:
    while pieces and total - len(pieces[-1]) >= keep:
        total -= len(pieces.pop())
    if total > keep:
        pieces[-1] = pieces[-1][: len(pieces[-1]) - (total - keep)]
