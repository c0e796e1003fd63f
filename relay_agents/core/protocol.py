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

#: A well-formed command: the only markup the teacher's view removes (as the published loop
#: does; any other ``<call>`` text stays in the teacher's view as written).
COMMAND_RE = re.compile(r"<call>\s*\d+\s*</call>")
#: Any closed command, well formed or not: the last ``<call>`` before a ``</call>``.
_CLOSED_RE = re.compile(r"<call>(?:(?!<call>).)*?</call>", re.DOTALL)
_NUMBER_RE = re.compile(r"\s*(\d+)\s*")
#: What is left of a command that was cut off: the tag and the start of its number.
_CUT_COMMAND_RE = re.compile(r"<call>[\s\d]*")
_STRAY_OPEN_RE = re.compile(r"\s*<call>\s*")
#: The largest N a command may request; a longer number is clamped to it when parsed (any
#: answer cap is far below, and a checkpointer stores integers in 64 bits).
MAX_CALL_TOKENS = 2**31 - 1


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
    The command starts at the last ``<call>`` before it (an earlier stray ``<call>`` is
    student text); a ``</call>`` with no opening tag, or an argument that is not a plain
    non-negative integer, is malformed. N is clamped to :data:`MAX_CALL_TOKENS`.
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
        tokens=_clamped(match.group(1)) if match else None,
    )


def _clamped(digits: str) -> int:
    """N, at most :data:`MAX_CALL_TOKENS` (the length is checked first: Python refuses to
    parse an integer of more than 4,300 digits)."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(MAX_CALL_TOKENS)):
        return MAX_CALL_TOKENS
    return min(int(digits), MAX_CALL_TOKENS)


def teacher_view(student_view: str) -> str:
    """The answer as the teacher sees it: well-formed commands replaced by a space, then stripped."""
    return COMMAND_RE.sub(" ", student_view).strip()


# --------------------------------------------------------------------------- clean text


class CleanTextFilter:
    """Turns raw model text, delta by delta, into clean text (no markup).

    It holds back whatever might still become markup (an open command, or a suffix that
    could start ``<call>`` or ``</call>``) and the white space before it, which is
    dropped if a teacher continues from the stripped view. Leading white space of the
    whole answer is dropped, as the teacher view does. When the turn ends, a cut-off command
    (``<call>`` and digits) is dropped and the text after a stray ``<call>`` is released
    without the tag. Streaming and the final text use the same filter, so the two are equal
    however the text is chunked. The teacher's text goes through one too (a teacher may
    write markup).
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
        """Add raw text; return the clean text that is now certain."""
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
        cut = pending.rfind(CALL_OPEN)
        if cut >= 0 and _CUT_COMMAND_RE.fullmatch(pending, cut):
            pending = pending[:cut]
        # A stray tag becomes one space: removing it could join its neighbours into a tag.
        pending = _STRAY_OPEN_RE.sub(" ", pending)
        if answered_call:
            pending = pending.rstrip()
        return self._emit(pending)

    def _emit(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text


def _remove_markup(text: str) -> str:
    """Remove closed commands (innermost first, as the student's turn pairs them) and stray
    closing tags."""
    while (shorter := _CLOSED_RE.sub("", text)) != text:
        text = shorter
    return text.replace(CALL_CLOSE, "")


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


def clean_teacher_text(raw: str) -> str:
    """The clean text of one whole teacher reply (kept verbatim but for markup)."""
    flt = CleanTextFilter(answer_started=True)
    return flt.feed(raw) + flt.finish(answered_call=False)


def call_ratio(student_tokens: int, teacher_tokens: int) -> float:
    """Teacher tokens over all answer tokens (the call ratio the RelayLLM paper reports)."""
    total = student_tokens + teacher_tokens
    return teacher_tokens / total if total else 0.0
