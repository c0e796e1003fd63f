"""Prompts: the protocol's user template and chat-template rendering. Pure apart from file reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from langchain_core.messages import AIMessage, BaseMessage, InvalidToolCall, convert_to_openai_messages

from relay_agents.core.types import Message


def to_openai_messages(messages: str | Sequence[BaseMessage | Message]) -> list[Message]:
    """Normalise a question, LangChain messages or OpenAI dicts to OpenAI message dicts.

    An assistant message's malformed calls (``invalid_tool_calls``, which LangChain's conversion
    drops) are kept as calls with their raw arguments: the models see what was written, and a
    tool message answering one still follows its call. Its ``tool_call`` content blocks
    (LangChain's v1 content) are dropped: they repeat its ``tool_calls``.
    """
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    converted: list[Message] = []
    for original in messages:
        [message, *more] = [dict(m) for m in convert_to_openai_messages([original])]
        if isinstance(original, AIMessage) and original.invalid_tool_calls:
            message["tool_calls"] = [
                *message.get("tool_calls", []),
                *map(_raw_call, original.invalid_tool_calls),
            ]
        content = message.get("content")
        if message.get("tool_calls") and isinstance(content, list):
            message["content"] = [
                p for p in content if not (isinstance(p, dict) and p.get("type") == "tool_call")
            ]
        converted += [message, *more]
    return converted


def _raw_call(call: InvalidToolCall) -> Message:
    function = {"name": call.get("name") or "", "arguments": call.get("args") or ""}
    return {"type": "function", "id": call.get("id") or "", "function": function}


def content_text(content: Any, *, joiner: str = "") -> str:
    """A message's content as text: the one rule of the relay, its server and the scripted server.

    ``None`` is empty text and a string is itself. A list holds content parts, each a string
    (LangChain's content lists mix them with blocks) or ``{"type": "text", "text": "..."}``; their
    texts are joined with ``joiner`` (``""``, as LangChain's ``BaseMessage.text`` does; vLLM's
    chat rendering joins with a newline). Any other part (image, audio, file, ...) is refused
    with a ValueError, not silently dropped: relay prompts are text only. So is any other content.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("message content must be a string or a list of text content parts")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"content parts of type {kind!r} are not supported: relay prompts are text only "
                "(send only text content parts)"
            )
    return joiner.join(texts)


def protocol_messages(
    messages: Sequence[Message], *, user_template: str, system_prompt: str | None
) -> list[Message]:
    """Apply the protocol's prompt: the last user message goes through ``user_template``."""
    out = [dict(m, content=content_text(m.get("content"))) for m in messages]
    last_user = next((i for i in range(len(out) - 1, -1, -1) if out[i]["role"] == "user"), None)
    if last_user is None:
        raise ValueError("the conversation has no user message to answer")
    out[last_user]["content"] = user_template.replace("{question}", out[last_user]["content"])
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _raise(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class ChatTemplate:
    """A Hugging Face chat template rendered with Jinja, as ``apply_chat_template`` does."""

    def __init__(self, template: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = _compile(template)

    @classmethod
    def from_tokenizer_dir(cls, path: str | Path) -> ChatTemplate:
        """Read the template from a model or tokenizer directory."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        if not template:
            raise ValueError(f"no chat template in {path} (tokenizer_config.json or chat_template.jinja)")
        return cls(
            template,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
        )

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        return self._compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **template_kwargs,
        )


def _token_text(token: Any) -> str:
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token or ""


def template_messages(messages: Sequence[Message]) -> list[Message]:
    """Messages as chat templates take them: a tool call's ``arguments`` as an object.

    The OpenAI wire carries arguments as a JSON string; vLLM and Transformers hand templates
    the parsed object (Qwen's and Llama's templates write it with ``tojson``), so a string
    would be rendered JSON-in-a-string. Arguments that are not JSON stay as written.
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_parsed_arguments(call) for call in calls]}
        out.append(message)
    return out


def _parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": parsed}}


def plain_tool_messages(messages: Sequence[Message]) -> list[Message]:
    """The conversation with tool calls and results written as text, for a teacher asked
    through a hosted chat API (chat-instruct): such APIs accept tool messages only with tool
    definitions of their own, and the teacher is asked to continue text, never to call."""
    out: list[Message] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            lines = [content_text(message.get("content"))] if message.get("content") else []
            for call in message["tool_calls"]:
                function = call.get("function") or {}
                lines.append(
                    f"[called tool {function.get('name')} (call id {call.get('id')}) "
                    f"with arguments {function.get('arguments')}]"
                )
            out.append({"role": "assistant", "content": "\n".join(lines)})
        elif role == "tool":
            result = content_text(message.get("content"))
            out.append(
                {"role": "user", "content": f"[result of tool call {message.get('tool_call_id')}]\n{result}"}
            )
        else:
            out.append(message)
    return out


def instruct_messages(
    messages: Sequence[Message], partial: str, template: str, tools: Sequence[dict[str, Any]] | None = None
) -> list[Message]:
    """The chat-instruct request: the conversation (tool calls and results as text), then the
    partial answer in an instruction that lists the tools the answer may call."""
    instruction = template.replace("{partial}", partial)
    if tools:
        listed = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
        instruction += (
            f"\n\nThe answer may call these tools, in the format the partial answer uses:\n{listed}"
        )
    return [*plain_tool_messages(messages), {"role": "user", "content": instruction}]
