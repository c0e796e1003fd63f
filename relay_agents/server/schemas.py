"""The OpenAI wire format the server reads and writes, with relay's additions.

Requests are validated strictly (JSON types as sent, no coercion) and name the bad field;
fields this server cannot honour (``n`` > 1, the deprecated ``functions``, logprobs, stop
strings) are refused rather than silently ignored. ``tools`` and ``tool_choice`` are honoured:
the tools reach the models through their chat templates and the calls are parsed out of the
relayed answer (:mod:`relay_agents.core.tools`). Sampling fields (``temperature``, ``top_p``, ``seed``, ...)
are accepted and ignored: the relay's endpoints carry their own sampling settings.
Responses are the standard objects; ``usage.relay`` and ``choices[].relay`` are extra
fields, which the ``openai`` SDK keeps in ``model_extra``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from langchain_core.messages import AIMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from relay_agents.core.result import RelayEvent, RelayUsage, Source, Span
from relay_agents.core.tools import ToolAnswer, ToolChoice, ToolParser, normalise_tool_choice
from relay_agents.prompts import content_text

# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class _Request(BaseModel):
    # extra="allow": SDKs add fields over time (metadata, store, ...); unknown ones are ignored.
    model_config = ConfigDict(extra="allow", strict=True)


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    """A call an assistant message made (OpenAI's shape; ``arguments`` is JSON text)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _no_functions(cls, value: Any) -> Any:
        if value == "function":
            raise ValueError("function messages (the deprecated functions API) are not supported: use tools")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        return content_text(value)

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def wire(self) -> dict[str, Any] | AIMessage:
        """The message as the relay takes it (``developer`` is the newer name of ``system``).

        An assistant message with calls is built as LangChain's ``AIMessage`` here: arguments
        that are not a JSON object (a malformed call this server sent, sent back) are kept as an
        invalid call, where LangChain's conversion of the dict would raise."""
        if self.tool_calls:
            calls, invalid = [], []
            for call in self.tool_calls:
                args = _json_object(call.function.arguments)
                if args is None:
                    raw = call.function.arguments
                    invalid.append(invalid_tool_call(name=call.function.name, args=raw, id=call.id))
                else:
                    calls.append(tool_call(name=call.function.name, args=args, id=call.id))
            return AIMessage(content=self.content or "", tool_calls=calls, invalid_tool_calls=invalid)
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.content or "",
        }
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class FunctionSpec(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Request):
    """A tool the answer may call (OpenAI's ``tools`` entry)."""

    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(_Request):
    include_usage: bool = False


class _Generation(_Request):
    model: str
    # Optional fields accept an explicit null, as the official clients may send one.
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=1, ge=1)
    user: str | None = Field(default=None, max_length=256)
    stop: str | list[str] | None = None
    logprobs: Any = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported: a relayed answer has one choice")
        return value

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value:
            raise ValueError("stop sequences are not supported by the relay")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by the relay")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Generation:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolSpec] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("the deprecated functions API is not supported: use tools")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: str | dict[str, Any] | None, info: ValidationInfo) -> ToolChoice:
        tools = info.data.get("tools") or []
        if value not in (None, "none", "auto") and not tools:
            raise ValueError("tool_choice needs tools")
        return normalise_tool_choice(value, [tool.function.name for tool in tools])

    def wire_tools(self) -> list[dict[str, Any]] | None:
        """The tools shown to the models (none when ``tool_choice`` is ``"none"``)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def tool_answer(self, parser: ToolParser) -> ToolAnswer | None:
        """The parse of an answer given tools (``None``: the answer is plain text)."""
        if self.wire_tools() is None:
            return None
        choice: ToolChoice = self.tool_choice or "auto"
        return ToolAnswer(choice, parser)

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type") != "text":
            raise ValueError("only response_format type 'text' is supported")
        return value

    @model_validator(mode="after")
    def _has_question(self) -> ChatCompletionRequest:
        last_user = next((m for m in reversed(self.messages) if m.role == "user"), None)
        if last_user is None:
            raise ValueError("messages must contain a user message")
        if not (last_user.content or "").strip():
            raise ValueError("the last user message is empty")
        return self

    @property
    def answer_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wire_messages(self) -> list[dict[str, Any] | AIMessage]:
        return [m.wire() for m in self.messages]

    def prompt_chars(self) -> int:
        return sum(len(m.content or "") for m in self.messages)


class CompletionRequest(_Generation):
    """``/v1/completions``: the prompt is the question, answered like one user message."""

    prompt: str | list[str]
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt is supported")
            value = value[0]
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value

    @model_validator(mode="after")
    def _plain(self) -> CompletionRequest:
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            raise ValueError("echo, suffix and best_of are not supported by the relay")
        return self

    @property
    def answer_cap(self) -> int | None:
        return self.max_tokens

    @property
    def question(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def wire_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    def prompt_chars(self) -> int:
        return len(self.question)


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


def openai_finish_reason(relay_reason: str | None) -> FinishReason:
    """The relay's finish reasons in OpenAI's vocabulary (the relay's own stays in ``relay``)."""
    return "length" if relay_reason in ("length", "turn_limit") else "stop"


class BudgetRemaining(BaseModel):
    """What the conversation may still spend on the teacher (``None``: unlimited), less what
    its calls in flight hold; ``held_*`` is that hold (released or charged when they end)."""

    teacher_tokens: int | None = None
    teacher_calls: int | None = None
    cost_usd: float | None = None
    held_teacher_tokens: int = 0
    held_teacher_calls: int = 0
    held_cost_usd: float = 0.0


class RelayUsageInfo(RelayUsage):
    """The answer's relay usage, and what its conversation may still spend."""

    budget_remaining: BudgetRemaining
    user_budget_remaining: BudgetRemaining | None = None


class Usage(BaseModel):
    """Standard counts: ``prompt_tokens`` sums every upstream request's prompt (the student's
    turns and the teacher's calls each read the conversation), ``completion_tokens`` is the
    answer (student plus teacher tokens)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    relay: RelayUsageInfo


class ChoiceRelay(BaseModel):
    """The relay's own account of one answer, on the choice."""

    finish_reason: str | None
    finished_by: Source | None
    spans: list[Span]
    events: list[RelayEvent]
    #: Calls whose text did not parse (also in ``message.tool_calls``, with their raw arguments).
    invalid_tool_calls: list[dict[str, Any]] | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None
    relay: ChoiceRelay


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None
    relay: ChoiceRelay


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "relay-agents"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
