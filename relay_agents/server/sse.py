"""Server-sent events of a streamed answer, in the OpenAI chunk format.

Each chunk is assembled from pre-encoded JSON around the delta text: one answer streams
hundreds of chunks and this is the hot path of the server (``json.dumps`` of the text only).
Every choice carries ``relay.source``, the model that wrote that delta.
"""

from __future__ import annotations

import json
from typing import Any

from relay_agents.core.tools import CallPiece
from relay_agents.server.errors import APIError

DONE = "data: [DONE]\n\n"


class ChunkEncoder:
    """Encodes the chunks of one streamed response (chat or text completion)."""

    __slots__ = ("_tail", "chat", "head", "include_usage")

    def __init__(self, *, chat: bool, rid: str, created: int, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.include_usage = include_usage
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion"}
        head |= {"created": created, "model": model}
        if chat:
            head["system_fingerprint"] = None
        self.head = json.dumps(head, separators=(",", ":"))[:-1]  # without the closing brace
        self._tail = ',"usage":null}' if include_usage else "}"

    def _choice(self, choice: str) -> str:
        return f'data: {self.head},"choices":[{choice}]{self._tail}\n\n'

    def role(self) -> str:
        """The chat stream's first chunk: the assistant role, no text yet."""
        return self._choice(
            '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
            '"finish_reason":null,"relay":{"source":"student"}}'
        )

    def delta(self, text: str, source: str) -> str:
        body = json.dumps(text)
        if self.chat:
            return self._choice(
                f'{{"index":0,"delta":{{"content":{body}}},"logprobs":null,"finish_reason":null,'
                f'"relay":{{"source":"{source}"}}}}'
            )
        return self._choice(
            f'{{"index":0,"text":{body},"logprobs":null,"finish_reason":null,"relay":{{"source":"{source}"}}}}'
        )

    def tool_call(self, piece: CallPiece, source: str) -> str:
        """A piece of a tool call: the first names the call (``id``, ``name``), later ones add
        ``arguments`` text."""
        call: dict[str, Any] = {"index": piece.index}
        function: dict[str, Any] = {"arguments": piece.args}
        if piece.id is not None:
            call |= {"id": piece.id, "type": "function"}
            function = {"name": piece.name or "", **function}
        call["function"] = function
        choice = {"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
        choice["relay"] = {"source": source}
        return self._choice(json.dumps(choice, separators=(",", ":"), ensure_ascii=False))

    def finish(self, finish_reason: str, relay: dict[str, Any]) -> str:
        """The last choice chunk: no text, the finish reason, the relay's account of the end."""
        choice: dict[str, Any] = {"index": 0}
        choice |= {"delta": {}} if self.chat else {"text": ""}
        choice |= {"logprobs": None, "finish_reason": finish_reason, "relay": relay}
        return self._choice(json.dumps(choice, separators=(",", ":")))

    def usage(self, usage: dict[str, Any]) -> str:
        """The ``stream_options.include_usage`` chunk: no choices, the whole usage."""
        return f'data: {self.head},"choices":[],"usage":{json.dumps(usage, separators=(",", ":"))}}}\n\n'

    @staticmethod
    def error(error: APIError) -> str:
        """A failure after the stream started: an error event (the SDK raises it as APIError)."""
        return f"data: {json.dumps(error.body())}\n\n"
