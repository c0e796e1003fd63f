"""The relay protocol as pure code: parse, strip, clean, splice and limit. No I/O.

Two views of one answer exist at all times (as in the RelayLLM paper's evaluation loop):

* the **student view** keeps the student's own ``<call>N</call>`` commands and the
  teacher's text, byte for byte, so every resume re-sends the same prefix (vLLM's
  prefix cache hits);
* the **teacher view** has every command replaced by a space and the whole answer
  stripped of surrounding white space.

The **clean text** shown to users is the concatenation of spans: student text with
commands removed (and the white space before an answered call dropped, because the
teacher continued from the stripped view), plus the teacher's text verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CALL_OPEN = "<call>"
CALL_CLOSE = "</call>"

#: Any complete command, well formed or not (non-greedy, may span lines).
COMMAND_RE = re.compile(r"<call>(.*?)</call>", re.DOTALL)
_NUMBER_RE = re.compile(r"\s*(\d+)\s*")


@dataclass(frozen=True, slots=True)
class CallCommand:
    """A command that ended a student turn.

    ``tokens`` is the requested N, or ``None`` when the command is malformed.
    ``prefix`` is the student's text before the command (untouched).
    """

    prefix: str
    raw: str
    tokens: int | None

    @property
    def malformed(self) -> bool:
        return self.tokens is None


def parse_call(text: str) -> CallCommand | None:
    """Return the command that ends ``text``, or ``None`` if the text does not end in one.

    A turn ends in a call when its output ends with ``</call>`` (the stop string kept).
    The command starts at the last ``<call>`` before it; a ``</call>`` with no opening
    tag, or an argument that is not a plain non-negative integer, is malformed.
    """
    if not text.endswith(CALL_CLOSE):
        return None
    body_end = len(text) - len(CALL_CLOSE)
    start = text.rfind(CALL_OPEN, 0, body_end)
    if start < 0:
        return CallCommand(prefix=text[:body_end], raw=CALL_CLOSE, tokens=None)
    argument = text[start + len(CALL_OPEN) : body_end]
    match = _NUMBER_RE.fullmatch(argument)
    return CallCommand(
        prefix=text[:start],
        raw=text[start:],
        tokens=int(match.group(1)) if match else None,
    )


def teacher_view(student_view: str) -> str:
    """The answer as the teacher sees it: commands replaced by a space, then stripped."""
    return COMMAND_RE.sub(" ", student_view).strip()


def strip_commands(text: str) -> str:
    """Remove complete commands without adding white space (for clean text)."""
    return COMMAND_RE.sub("", text)


# --------------------------------------------------------------------------- clean text


class CleanTextFilter:
    """Turns the student's raw text, delta by delta, into clean text.

    It holds back whatever might still become markup (an open command, or a suffix that
    could start ``<call>`` or ``</call>``) and the white space before it, which is
    dropped if a teacher continues from the stripped view. Leading white space of the
    whole answer is dropped, as the teacher view does. Streaming and the final text use
    the same filter, so the two are equal however the text is chunked.
    """

    __slots__ = ("_pending", "_started")

    def __init__(self, *, pending: str = "", answer_started: bool = False) -> None:
        self._pending = pending
        self._started = answer_started

    @property
    def answer_started(self) -> bool:
        return self._started

    @property
    def pending(self) -> str:
        """Held raw text (markup or white space) whose fate is not decided yet."""
        return self._pending

    def feed(self, delta: str) -> str:
        """Add raw student text; return the clean text that is now certain."""
        text = _remove_markup(self._pending + delta)
        hold_from = text.find(CALL_OPEN)
        if hold_from < 0:
            hold_from = len(text) - _markup_prefix_len(text)
        while hold_from > 0 and text[hold_from - 1].isspace():
            hold_from -= 1
        self._pending = text[hold_from:]
        return self._emit(text[:hold_from])

    def finish(self, *, answered_call: bool) -> str:
        """End the turn and return the held text that belongs to the answer.

        ``answered_call``: a teacher continued after this turn's command, so the white
        space before the command is dropped (the teacher saw the stripped view).
        """
        pending, self._pending = self._pending, ""
        open_at = pending.find(CALL_OPEN)  # a command cut off by the length limit
        if open_at >= 0:
            pending = pending[:open_at]
        if answered_call:
            pending = pending.rstrip()
        return self._emit(pending)

    def _emit(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text


def _remove_markup(text: str) -> str:
    return COMMAND_RE.sub("", text).replace(CALL_CLOSE, "")


def _markup_prefix_len(text: str) -> int:
    """Length of the longest suffix of ``text`` that could start a tag."""
    for size in range(min(len(CALL_CLOSE) - 1, len(text)), 0, -1):
        tail = text[-size:]
        if CALL_OPEN.startswith(tail) or CALL_CLOSE.startswith(tail):
            return size
    return 0


def clean_student_text(raw: str, *, answered_call: bool, answer_started: bool) -> str:
    """The clean text of one whole student turn (the non-streaming path)."""
    flt = CleanTextFilter(answer_started=answer_started)
    return flt.feed(raw) + flt.finish(answered_call=answered_call)


def call_ratio(student_tokens: int, teacher_tokens: int) -> float:
    """Teacher tokens over all answer tokens (the call ratio the RelayLLM paper reports)."""
    total = student_tokens + teacher_tokens
    return teacher_tokens / total if total else 0.0
