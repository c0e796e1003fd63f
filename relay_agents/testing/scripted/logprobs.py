"""Token log-probabilities in vLLM's format, deterministic: from the script's per-token
probabilities (tokens without one have probability 1)."""

from __future__ import annotations

import math
from typing import Any

#: The log-probability given to alternatives with no probability left (JSON has no -inf).
_FLOOR_LOGPROB = -30.0


def _logprob(p: float) -> float:
    return math.log(p) if p > 0 else _FLOOR_LOGPROB


def token_logprobs(piece: str, prob: float | None, k: int) -> tuple[float, list[tuple[str, float]]]:
    """The sampled token's log-probability and its top-``k`` list: the token itself first, then
    ``k - 1`` alternatives ``<alt1>``, ... sharing what probability is left equally."""
    p = 1.0 if prob is None else float(prob)
    top = [(piece, _logprob(p))]
    if k > 1:
        rest = (1.0 - p) / (k - 1)
        top += [(f"<alt{i}>", _logprob(rest)) for i in range(1, k)]
    return _logprob(p), top[: max(k, 1)]


def logprobs_payload(
    pieces: list[str], probs: list[float | None], k: int, *, chat: bool, offset: int = 0
) -> dict[str, Any]:
    """The ``logprobs`` object of a choice (or of one streamed chunk) in vLLM's format."""
    rows = [token_logprobs(piece, probs[i] if i < len(probs) else None, k) for i, piece in enumerate(pieces)]
    if chat:
        return {
            "content": [
                {
                    "token": piece,
                    "logprob": lp,
                    "bytes": list(piece.encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top],
                }
                for piece, (lp, top) in zip(pieces, rows, strict=True)
            ]
        }
    offsets, at = [], offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": list(pieces),
        "token_logprobs": [lp for lp, _ in rows],
        "top_logprobs": [dict(top) for _, top in rows],
        "text_offset": offsets,
    }
