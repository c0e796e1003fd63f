"""The relay's configuration models: endpoints, budgets and the relay settings (pure pydantic).

Loading them from TOML and ``RELAY_*`` variables is :mod:`relay_agents.config`'s.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from relay_agents.core.policies import CommandPolicy, PolicySpec, normalise_policy_input
from relay_agents.core.presets import PUBLISHED_PROMPT_SUFFIX, PresetName, apply_preset
from relay_agents.core.tools import ToolParser

ModelT = TypeVar("ModelT", bound=BaseModel)

DEFAULT_USER_TEMPLATE = "{question}\n" + PUBLISHED_PROMPT_SUFFIX
DEFAULT_INSTRUCT_TEMPLATE = (
    "Below is a partial answer to the conversation above. Continue it seamlessly from "
    "exactly where it stops. Output only the continuation: do not repeat the partial "
    "answer, do not comment.\n\n<partial_answer>\n{partial}\n</partial_answer>"
)

Api = Literal["completions", "chat", "chat-instruct"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Endpoint(_Strict):
    """One OpenAI-compatible model server (vLLM, SGLang, llama.cpp, a hosted API).

    ``api`` picks how an answer is continued:

    * ``"completions"``: raw text continuation over the chat-templated prompt (exact;
      the template comes from ``chat_template``, ``tokenizer_path`` or the server);
    * ``"chat"``: vLLM-style partial assistant message with ``continue_final_message``;
    * ``"chat-instruct"``: chat-only hosted APIs; the partial answer goes into a user
      instruction and the reply is trimmed to N tokens.
    """

    base_url: str
    model: str
    api_key: SecretStr = Field(default=SecretStr("EMPTY"))
    api: Api = "completions"
    chat_template: str | None = Field(
        default=None, description="Jinja chat template; overrides tokenizer_path and server."
    )
    tokenizer_path: Path | None = Field(
        default=None,
        description="Local model/tokenizer dir whose tokenizer_config.json holds the template.",
    )
    timeout: float = Field(
        default=20.0, gt=0, description="Seconds to wait for each streamed chunk (read timeout)."
    )
    connect_timeout: float = Field(default=5.0, gt=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)
    max_retries: int = Field(default=2, ge=0, le=10, description="Retries after the first try.")
    retry_initial_delay: float = Field(default=0.25, ge=0)
    retry_max_delay: float = Field(default=2.0, ge=0)
    retry_deadline: float = Field(
        default=10.0, gt=0, description="No new try starts this many seconds after the first."
    )
    call_deadline_s: float = Field(
        default=300.0,
        gt=0,
        description="The most one call may take, retries, a slow stream and keep-alive comments "
        "included: then a teacher's text so far is kept and the student goes on; a student's call "
        "fails. Size it to max tokens / the slowest decode rate you accept.",
    )
    input_price_per_million: float = Field(default=0.0, ge=0, alias="input_price")
    output_price_per_million: float = Field(default=0.0, ge=0, alias="output_price")
    call_suppression: Literal["bad_words", "logit_bias", "none"] = Field(
        default="bad_words",
        description="How calls are blocked once declined: vLLM `bad_words`, a -100 "
        "`logit_bias` on the `<call>` token (ids from the server's /tokenize), or not at all.",
    )
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    context_tokens: int | None = Field(
        default=None,
        ge=1,
        alias="max_model_len",
        description="The model's context window in tokens; default: the `max_model_len` the server "
        "lists in /v1/models (vLLM), else none. Requests are cut to fit it.",
    )
    instruct_template: str = DEFAULT_INSTRUCT_TEMPLATE

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("instruct_template")
    @classmethod
    def _has_partial(cls, value: str) -> str:
        if "{partial}" not in value:
            raise ValueError("must contain the placeholder {partial}")
        return value

    def price(self, input_tokens: int, output_tokens: int) -> float:
        """Cost in USD of one request."""
        return (
            input_tokens * self.input_price_per_million + output_tokens * self.output_price_per_million
        ) / 1_000_000


class Budget(_Strict):
    """Teacher spend allowed in one scope (a conversation, a turn, a user's pool); ``None``: unlimited."""

    max_teacher_tokens: int | None = Field(default=None, ge=0)
    max_teacher_calls: int | None = Field(default=None, ge=0)
    max_cost_usd: float | None = Field(default=None, ge=0)


class RelayConfig(_Strict):
    """Everything a relay needs. Defaults are the published protocol's."""

    student: Endpoint
    teacher: Endpoint
    budget: Budget = Field(default_factory=Budget, description="Teacher spend allowed per conversation.")
    turn_budget: Budget = Field(default_factory=Budget, description="Teacher spend allowed per answer.")
    user_budget: Budget = Field(
        default_factory=Budget,
        description="A pool shared by every conversation of one user or API key (``user=``).",
    )
    budget_store: str | None = Field(
        default=None,
        description="Where conversation and user budgets persist: ``sqlite:///PATH``, a file path, "
        "or ``postgresql://...``; default a SQLite file under ~/.local/state/relay-agents.",
    )
    budget_hold_ttl_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a teacher call's hold on the budgets lives when its process dies before "
        "settling it (a killed worker); default: sized from the teacher's deadline (hold_ttl_s).",
    )
    on_budget_exhausted: Literal["continue", "raise"] = Field(
        default="continue",
        description="`continue`: the student finishes alone and the result says so; "
        "`raise`: raise BudgetExceeded.",
    )
    policy: PolicySpec = Field(
        default_factory=CommandPolicy,
        description="Who decides where the teacher writes (relay_agents.core.policies): `command` (the "
        "student's <call>N</call>), `confidence`, `interval`, `random`, `teacher_free`, "
        "`teacher_only`; a string is the policy of that kind with its defaults.",
    )
    min_tokens_between_calls: int = Field(
        default=0, ge=0, description="Student tokens the answer needs between two calls (any policy)."
    )
    target_teacher_share: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="No call starts while the answer's teacher-token share is at or above this "
        "(any policy; a student's own command is then declined and calls stop).",
    )
    system_prompt: str | None = None
    user_template: str = DEFAULT_USER_TEMPLATE
    enable_thinking: bool = False
    max_answer_tokens: int = Field(default=8192, ge=1)
    max_student_turns: int = Field(default=5, ge=1)
    max_call_tokens: int | None = Field(default=None, ge=1)
    on_malformed_call: Literal["skip", "fail"] = Field(
        default="skip",
        description="`skip`: drop the command and let the student go on; `fail`: end the "
        "answer (the published evaluation scored it as a failure).",
    )
    on_teacher_failure: Literal["continue", "raise"] = "continue"
    token_count: Literal["usage", "tokenizer"] = Field(
        default="usage",
        description="How the tokens results report (and the call ratio) are counted: `usage`: the "
        "servers' usage (vLLM counts a reply's EOS token); `tokenizer`: each reply's text "
        "re-encoded with its endpoint's /tokenize, no EOS (the published evaluation's count; one "
        "more request per model reply). Budgets and the answer cap always use usage.",
    )
    tool_parser: ToolParser = Field(
        default="hermes",
        description="The student family's tool-call format, parsed out of answers given tools: "
        "`hermes` (Hermes, Qwen: <tool_call>{json}</tool_call>), `mistral` ([TOOL_CALLS][...]) or "
        '`llama3_json` (the answer is one {"name": ..., "parameters": ...} object).',
    )
    preset: PresetName | None = Field(
        default=None,
        description="The preset whose values fill what is not set (relay_agents.core.presets); "
        "``published``: the published evaluation's settings. Reported with results.",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_and_policy_shorthand(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = apply_preset(data)
        return normalise_policy_input(data)

    @classmethod
    def published(
        cls, student: Endpoint | Mapping[str, Any], teacher: Endpoint | Mapping[str, Any], **overrides: Any
    ) -> RelayConfig:
        """The published evaluation's settings (preset ``published``) for these endpoints;
        ``overrides`` and the settings made on the endpoints win over the preset's."""
        return cls.model_validate(
            {"student": student, "teacher": teacher, **overrides, "preset": "published"}
        )

    @field_validator("student")
    @classmethod
    def _student_continues(cls, value: Endpoint) -> Endpoint:
        if value.api == "chat-instruct":
            raise ValueError(
                "student.api must be 'completions' or 'chat': the student continues its own text"
            )
        return value

    @field_validator("user_template")
    @classmethod
    def _has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("must contain the placeholder {question}")
        return value


def teacher_deadline_s(teacher: Endpoint) -> float:
    """The longest a teacher call waits for its first token: no try starts after
    ``retry_deadline``, and the last one may take ``connect_timeout`` to connect and ``timeout``
    for its first chunk (35 s by default)."""
    return teacher.retry_deadline + teacher.connect_timeout + teacher.timeout


def hold_ttl_s(config: RelayConfig) -> float:
    """How long a teacher call's hold outlives a process that died holding it.

    ``budget_hold_ttl_s`` when set; else twice the teacher's deadline (70 s by default): a call
    whose first token came by its deadline has as long again to stream. A live call settles its
    hold itself; this bounds only how long a killed worker keeps its conversation's budget held.
    """
    if config.budget_hold_ttl_s is not None:
        return config.budget_hold_ttl_s
    return 2 * teacher_deadline_s(config.teacher)


def identity(model: BaseModel) -> str:
    """The config as sorted JSON, secrets included: equal configs give equal strings."""
    return json.dumps(model.model_dump(), default=_reveal, sort_keys=True)


_DIGESTS: dict[int, str] = {}


def digest(model: BaseModel) -> str:
    """A key for a config that does not hold its secrets: the sha256 of its :func:`identity`.

    Computed once per (frozen) config object: dumping a whole config costs about 0.15 ms,
    which a server answering each request from the same config would pay every time.
    """
    key = id(model)
    found = _DIGESTS.get(key)
    if found is None:
        found = _DIGESTS[key] = hashlib.sha256(identity(model).encode()).hexdigest()
        weakref.finalize(model, _DIGESTS.pop, key, None)
    return found


class ByDigest(Generic[ModelT]):
    """A config as a cache key: hashed and compared by its :func:`digest`, so that the key
    stands for the config's secrets without spelling them out."""

    __slots__ = ("config", "digest")

    def __init__(self, config: ModelT) -> None:
        self.config = config
        self.digest = digest(config)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByDigest) and other.digest == self.digest


def _reveal(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)
