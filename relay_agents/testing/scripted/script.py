"""The script store: what each model answers to each prompt, and the faults queued for it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .faults import ALTERING, check_fault, parse_fault


def check_item(item: Any) -> str | dict[str, Any]:
    """A scripted response: a string, ``{"text": ..., "probs": [...]}`` or ``{"fault": ...}``;
    ValueError for anything else."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "probs" in item:
        probs = item["probs"]
        if not isinstance(probs, list) or not all(p is None or 0 < float(p) <= 1 for p in probs):
            raise ValueError(f"probs must be a list of probabilities in (0, 1] or null: {probs!r}")
    if isinstance(item, dict) and "fault" in item:
        return {**item, "fault": check_fault(item["fault"])}
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item
    raise ValueError(f"a response must be a string, {{'text': ...}} or {{'fault': ...}}: {item!r}")


@dataclass
class Script:
    model: str
    match: str
    responses: list[str | dict[str, Any]]
    cursor: int = 0
    repeat: bool = False  # start over after the last response (for repeated runs of one question)


@dataclass
class Reply:
    """The next answer of a request: a fault (``None``: none) and the text, with per-token
    probabilities. For a fault the text is what a dropped stream shows before dying (the next
    scripted text). Tokens without a scripted probability have probability 1."""

    fault: str | None
    text: str
    probs: list[float | None] = field(default_factory=list)


class Replies:
    """Scripts (the latest that matches a prompt answers it) and per-model fault queues."""

    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.faults: dict[str, deque[str]] = {}

    def clear(self) -> None:
        self.scripts.clear()
        self.faults.clear()

    def add_script(self, script: Script) -> None:
        self.scripts.append(script)

    def queue_faults(self, model: str, faults: list[str]) -> None:
        self.faults.setdefault(model, deque()).extend(faults)

    def _script(self, model: str, prompt: str) -> Script | None:
        return next((s for s in reversed(self.scripts) if s.model == model and s.match in prompt), None)

    def take_batch(self, model: str, prompts: list[str], default_response: str) -> list[Reply]:
        """The next answer for each prompt of one request with a list of prompts. A queued fault
        answers the whole request, once; so does a scripted one, which then leaves the other
        prompts' scripts where they were (the request failed as a whole: nothing was answered)."""
        queued = self.faults.get(model)
        if queued and parse_fault(queued[0]).name not in ALTERING:
            fault = queued.popleft()
            return [Reply(fault, self._peek_text(self._script(model, p), default_response)) for p in prompts]
        scripts = [self._script(model, p) for p in prompts]
        before = [None if s is None else s.cursor for s in scripts]
        replies = [self.take(model, p, default_response) for p in prompts]
        failed = next((i for i, r in enumerate(replies) if r.fault is not None), None)
        if failed is not None and parse_fault(replies[failed].fault).name not in ALTERING:
            for script, cursor in zip(scripts, before, strict=True):
                if script is not None and cursor is not None:
                    script.cursor = cursor
            self._next(scripts[failed], default_response)  # the fault itself is spent
        return replies

    def take(self, model: str, prompt: str, default_response: str) -> Reply:
        """Consume the next answer for a request (a queued fault comes first: one that replaces
        the answer leaves the script where it was, one that alters it answers it)."""
        script = self._script(model, prompt)
        queued = self.faults.get(model)
        if queued:
            fault = queued.popleft()
            if parse_fault(fault).name not in ALTERING:
                return Reply(fault, self._peek_text(script, default_response))
            answer = self._next(script, default_response)
            return Reply(fault, answer.text, answer.probs)
        return self._next(script, default_response)

    def _next(self, script: Script | None, default_response: str) -> Reply:
        if script is not None and script.repeat and script.responses:
            script.cursor %= len(script.responses)
        if script is None or script.cursor >= len(script.responses):
            return Reply(None, default_response)
        item = script.responses[script.cursor]
        script.cursor += 1
        if isinstance(item, str):
            return Reply(None, item)
        if "fault" in item:
            return Reply(item["fault"], item.get("text") or self._peek_text(script, default_response))
        return Reply(None, item["text"], list(item.get("probs") or []))

    @staticmethod
    def _peek_text(script: Script | None, default_response: str) -> str:
        if script is not None and script.cursor < len(script.responses):
            item = script.responses[script.cursor]
            if isinstance(item, str):
                return item
            if isinstance(item.get("text"), str):
                return item["text"]
        return default_response
