"""Tool calls in a relayed answer: the model family's call format parsed out of the clean text.

The relay answers in text; a model trained for tools writes its calls in that text in its own
format (the chat template told it the tools). This module turns the clean text of an answer
(spans joined, relay commands already removed, so no ``<call>N</call>`` reaches a call's JSON
even when a teacher wrote part of it) into the text meant for the user and the tool calls.

Formats (``RelayConfig.tool_parser``):

* ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number of them; a call left open at the end of the answer is parsed up to the end.
* ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name": ..., "arguments": {...}}``.
* ``llama3_json`` (Llama 3.1/3.2): the whole answer is one ``{"name": ..., "parameters": {...}}``
  object, optionally after ``<|python_tag|>``.

One parser serves the whole answer and its stream (:class:`ToolCallStream`), so the two agree
however the text is chunked. Malformed calls never raise: they become invalid calls
(LangChain's ``invalid_tool_calls``) carrying the raw text and the reason.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

ToolParser = Literal["hermes", "mistral", "llama3_json"]

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
MISTRAL_MARKER = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"

#: The start of a Hermes call whose arguments can be streamed as they are written.
_HERMES_HEAD_RE = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
#: What may follow the arguments object inside a Hermes call: the outer brace, white space.
_HERMES_TAIL_RE = re.compile(r"\}\s*$")


@dataclass(slots=True)
class CallPiece:
    """A piece of a tool call as it is written (LangChain's ``tool_call_chunk``): the first piece
    of a call has its ``name`` and ``id``, later ones only more ``args`` text."""

    index: int
    id: str | None = None
    name: str | None = None
    args: str = ""


Event = str | CallPiece  # text for the user, or a piece of a tool call


@dataclass(slots=True)
class ParsedAnswer:
    """A whole answer: the text for the user, the calls and the malformed calls (dicts shaped as
    LangChain's ``ToolCall`` and ``InvalidToolCall``)."""

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    invalid_tool_calls: list[dict[str, Any]] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Splits clean answer text, delta by delta, into user text and tool-call pieces.

    Text that could still be the start of a call marker, and white space that could precede a
    call, is held until it is known; white space around calls and at the end is dropped. Hermes
    calls stream their arguments once ``{"name": "...", "arguments":`` is written; the other
    formats (and a Hermes call written in another key order) give each call in one piece when
    the answer ends.
    """

    def __init__(self, parser: ToolParser = "hermes") -> None:
        self.parser = parser
        self._held = ""  # undecided text outside calls
        self._body: str | None = None  # the open call's text (None: outside a call)
        self._head_sent = False  # the open Hermes call's name went out; its args stream
        self._args_sent = 0  # characters of the open call's body already sent as args
        self._index = 0
        self._after_call = False  # a call just closed: the white space after it is dropped
        self._plain = False  # llama3_json: the answer began as text, so it is no call
        self._pieces: list[CallPiece] = []  # every piece, in order (for :meth:`parsed`)
        self._texts: list[str] = []

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, delta: str) -> list[Event]:
        events: list[Event] = []
        if self.parser == "hermes":
            self._feed_hermes(delta, events)
        else:
            self._feed_marker(delta, events)
        return self._record(events)

    def finish(self) -> list[Event]:
        """End the answer: a call still open is closed with what was written."""
        events: list[Event] = []
        if self.parser == "hermes":
            if self._body is not None:
                self._stream_args(events)
                self._close_hermes(self._body, events)
            else:
                events.append(self._held.rstrip())  # a marker's start that never became one
        elif self._body is not None:
            self._whole_calls(self._body, events)
        elif self.parser == "llama3_json" and self._held.strip():
            if not self._maybe_json_call(self._held.strip(), events):
                events.append(self._held.strip())
        elif self.parser == "mistral":
            events.append(self._held.rstrip())
        self._held = ""
        return self._record(events)

    def parsed(self) -> ParsedAnswer:
        """The answer so far as text and calls (call :meth:`finish` first)."""
        calls: dict[int, CallPiece] = {}
        for piece in self._pieces:
            call = calls.setdefault(piece.index, CallPiece(piece.index, piece.id, piece.name))
            call.args += piece.args
        answer = ParsedAnswer(content="".join(self._texts))
        for call in calls.values():
            _classify(call, answer)
        return answer

    def _record(self, events: list[Event]) -> list[Event]:
        for event in events:
            if isinstance(event, CallPiece):
                self._pieces.append(event)
            else:
                self._texts.append(event)
        return [e for e in events if not (isinstance(e, str) and not e)]

    # -- outside calls ---------------------------------------------------------------------

    def _text(self, text: str, events: list[Event], marker: str) -> int:
        """Emit what of ``self._held + text`` is surely text; return where ``marker`` starts in
        the held text (-1: not there)."""
        held = self._held + text
        if self._after_call:  # white space after a call is dropped too
            held = held.lstrip()
            self._after_call = not held
        at = held.find(marker)
        end = at if at >= 0 else len(held) - _prefix_len(held, marker)
        sure = held[:end]
        keep_from = len(sure.rstrip())  # white space waits: a call may follow it
        events.append(sure[:keep_from])
        self._held = held[keep_from:]
        return -1 if at < 0 else at - keep_from

    def _feed_hermes(self, delta: str, events: list[Event]) -> None:
        while delta:
            if self._body is None:
                at = self._text(delta, events, HERMES_OPEN)
                if at < 0:
                    return
                delta = self._held[at + len(HERMES_OPEN) :]
                self._held = ""
                self._body, self._head_sent, self._args_sent = "", False, 0
                continue
            body = self._body + delta
            end = body.find(HERMES_CLOSE)
            if end < 0:
                self._body = body
                self._stream_args(events)
                return
            self._body = body[:end]
            self._stream_args(events)  # as if streamed: a whole answer parses the same
            self._close_hermes(self._body, events)
            delta = body[end + len(HERMES_CLOSE) :]

    def _feed_marker(self, delta: str, events: list[Event]) -> None:
        if self._body is not None:
            self._body += delta
            return
        if self.parser == "llama3_json":
            held = self._held + delta
            stripped = held.lstrip()
            if self._plain:
                events.append(delta)
            elif stripped.startswith(("{", PYTHON_TAG)):
                self._body, self._held = held, ""  # the answer is a call (or JSON text): wait
            elif PYTHON_TAG.startswith(stripped):
                self._held = held
            else:
                self._held, self._plain = "", True
                events.append(held)
            return
        at = self._text(delta, events, MISTRAL_MARKER)
        if at >= 0:
            self._body = self._held[at + len(MISTRAL_MARKER) :]
            self._held = ""

    # -- inside calls ----------------------------------------------------------------------

    def _stream_args(self, events: list[Event]) -> None:
        body = self._body or ""
        if not self._head_sent:
            head = _HERMES_HEAD_RE.match(body)
            if head is None:
                return
            name = _json_string(head.group(1))
            self._head_sent = True
            self._args_sent = head.end()
            events.append(CallPiece(self._index, new_call_id(), name))
        # the outer object's closing brace (and the close tag's start) must not go out as args
        sure = body[: len(body) - _prefix_len(body, HERMES_CLOSE)].rstrip()
        safe = len(sure) - 1 if sure.endswith("}") else len(sure)
        if safe > self._args_sent:
            events.append(CallPiece(self._index, args=body[self._args_sent : safe]))
            self._args_sent = safe

    def _close_hermes(self, body: str, events: list[Event]) -> None:
        if self._head_sent:
            rest = body[self._args_sent :]
            tail = _HERMES_TAIL_RE.search(rest)
            args = rest[: tail.start()] if tail else rest
            if args:
                events.append(CallPiece(self._index, args=args))
        else:
            events.append(_whole_piece(self._index, body.strip(), "arguments"))
        self._index += 1
        self._body = None
        self._held = ""
        self._after_call = True

    def _whole_calls(self, body: str, events: list[Event]) -> None:
        if self.parser == "llama3_json":
            text = body.strip()
            if not self._maybe_json_call(text, events):
                events.append(text)
            return
        try:
            items = json.loads(body)
        except ValueError:
            items = None
        if not isinstance(items, list):
            events.append(CallPiece(self._index, new_call_id(), None, body.strip()))
            self._index += 1
            return
        for item in items:
            events.append(_whole_piece(self._index, json.dumps(item, ensure_ascii=False), "arguments"))
            self._index += 1

    def _maybe_json_call(self, text: str, events: list[Event]) -> bool:
        """A Llama-3 answer that is one JSON call; False when it is not a call (plain text)."""
        body = text.removeprefix(PYTHON_TAG).strip()
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        tagged = text.startswith(PYTHON_TAG)
        if not tagged and not (isinstance(obj, dict) and "name" in obj):
            return False
        events.append(_whole_piece(self._index, body, "parameters"))
        self._index += 1
        return True


def _whole_piece(index: int, body: str, args_key: str) -> CallPiece:
    """One whole call from its JSON text (``args`` the raw text when it is not a call)."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return CallPiece(index, new_call_id(), None, body)
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        return CallPiece(index, new_call_id(), obj["name"], args)
    return CallPiece(index, new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _classify(call: CallPiece, answer: ParsedAnswer) -> None:
    try:
        args = json.loads(call.args) if call.args.strip() else {}
    except ValueError as exc:
        error = f"the arguments are not valid JSON: {exc}"
    else:
        if call.name and isinstance(args, dict):
            answer.tool_calls.append({"name": call.name, "args": args, "id": call.id, "type": "tool_call"})
            return
        error = "the call names no tool" if not call.name else "the arguments are not a JSON object"
    answer.invalid_tool_calls.append(
        {"name": call.name, "args": call.args, "id": call.id, "error": error, "type": "invalid_tool_call"}
    )


def _json_string(escaped: str) -> str:
    try:
        return str(json.loads(f'"{escaped}"'))
    except ValueError:
        return escaped


def _prefix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that starts ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def parse_tool_calls(text: str, parser: ToolParser = "hermes") -> ParsedAnswer:
    """Split a whole answer's clean text into user text and tool calls."""
    stream = ToolCallStream(parser)
    stream.feed(text)
    stream.finish()
    return stream.parsed()


# --------------------------------------------------------------------------- tool_choice

#: ``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}``.
ToolChoice = str | dict[str, Any]


class ToolChoiceUnmet(ValueError):
    """The answer did not make the call ``tool_choice`` required (the relay does not ask again:
    a model that answered in text to the prompt tends to do so again, and each try costs its
    budget)."""


def normalise_tool_choice(choice: Any, tool_names: list[str]) -> ToolChoice:
    """LangChain's and OpenAI's spellings as OpenAI's: ``None``/``"auto"``; ``"none"``;
    ``"any"``/``"required"``/``True``; a tool's name or ``{"type": "function", ...}``."""
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none" or choice is False:
        return "none"
    if choice in ("any", "required") or choice is True:
        return "required"
    if isinstance(choice, str):
        name = choice
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        name = choice["function"]["name"]
    else:
        raise ValueError(f"unsupported tool_choice {choice!r}: use none, auto, any/required or a tool's name")
    if name not in tool_names:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools {tool_names}")
    return {"type": "function", "function": {"name": name}}


def unmet_tool_choice(answer: ParsedAnswer, choice: ToolChoice) -> str | None:
    """Why ``answer`` does not satisfy ``choice`` (``None``: it does). A malformed call counts as
    the attempt it is: it is reported in ``invalid_tool_calls``, not raised."""
    if choice in ("none", "auto") or answer.invalid_tool_calls:
        return None
    called = [call["name"] for call in answer.tool_calls]
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name in called:
            return None
        return f"tool_choice required a call of {name!r}; the answer called {called or 'no tool'}"
    return None if called else "tool_choice required a tool call; the answer made none"


class ToolAnswer:
    """One answer's tool calls as they are parsed, and the ``tool_choice`` they must satisfy:
    what ``ChatRelay`` and the server each hold for an answer given tools."""

    def __init__(self, choice: ToolChoice = "auto", parser: ToolParser = "hermes") -> None:
        self.choice = choice
        self.stream = ToolCallStream(parser)

    def checked(self) -> ParsedAnswer:
        """The parsed answer (after ``stream.finish()``); :class:`ToolChoiceUnmet` when it
        misses a call that ``tool_choice`` requires."""
        parsed = self.stream.parsed()
        if (reason := unmet_tool_choice(parsed, self.choice)) is not None:
            raise ToolChoiceUnmet(f"{reason} (answer: {parsed.content[:200]!r})")
        return parsed
