"""Configuration: endpoints, budgets and the relay settings, from code, TOML or environment."""

from __future__ import annotations

import json
import os
import tomllib
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from relay_agents.core.policies import POLICY_KINDS, CommandPolicy, PolicySpec, normalise_policy_input
from relay_agents.core.presets import PUBLISHED_PROMPT_SUFFIX, PresetName, preset_values

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
    input_price_per_million: float = Field(default=0.0, ge=0, alias="input_price")
    output_price_per_million: float = Field(default=0.0, ge=0, alias="output_price")
    call_suppression: Literal["bad_words", "logit_bias", "none"] = Field(
        default="bad_words",
        description="How calls are blocked once declined: vLLM `bad_words`, a -100 "
        "`logit_bias` on the `<call>` token (ids from the server's /tokenize), or not at all.",
    )
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
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
    preset: PresetName | None = Field(
        default=None,
        description="The preset the values were taken from (relay_agents.core.presets); "
        "``published``: the published evaluation's settings. Reported with results.",
    )

    @model_validator(mode="before")
    @classmethod
    def _policy_shorthand(cls, data: Any) -> Any:
        return normalise_policy_input(data)

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

    @classmethod
    def published(
        cls, student: Endpoint | Mapping[str, Any], teacher: Endpoint | Mapping[str, Any], **overrides: Any
    ) -> RelayConfig:
        """The published evaluation's settings (preset ``published``) for these endpoints;
        ``overrides`` (and settings already made on the endpoints) win over the preset's."""
        given = {"student": _explicit(student), "teacher": _explicit(teacher), **overrides}
        return cls.model_validate(_merge(preset_values("published"), {**given, "preset": "published"}))

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> RelayConfig:
        return load_config(path, env={})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RelayConfig:
        return load_config(None, env=os.environ if env is None else env)


def _explicit(endpoint: Endpoint | Mapping[str, Any]) -> dict[str, Any]:
    """The settings made on an endpoint, not its defaults (a preset fills those)."""
    if isinstance(endpoint, Endpoint):
        return endpoint.model_dump(exclude_unset=True)
    return dict(endpoint)


_IDENTITIES: dict[int, str] = {}


def identity(model: BaseModel) -> str:
    """A stable key for a config, secrets included (clients and graphs are shared by it).

    Computed once per (frozen) config object: dumping a whole config costs about 0.15 ms,
    which a server answering each request from the same config would pay every time.
    """
    key = id(model)
    found = _IDENTITIES.get(key)
    if found is None:
        found = _IDENTITIES[key] = json.dumps(model.model_dump(), default=_reveal, sort_keys=True)
        weakref.finalize(model, _IDENTITIES.pop, key, None)
    return found


def _reveal(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


ENV_PREFIX = "RELAY_"
CONFIG_FILE_VAR = "RELAY_CONFIG"
#: The TOML table that holds the relay server's settings, not the relay's.
SERVER_TABLE = "server"
_SECTIONS = ("student", "teacher", "turn_budget", "user_budget", "budget")


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``RELAY_STUDENT_BASE_URL`` -> ``{"student": {"base_url": ...}}``.

    Returns the nested values and, for error messages, the variable behind each field.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    top_fields = set(RelayConfig.model_fields) - set(_SECTIONS)
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key == "policy" or key.startswith("policy_"):
            field = key[len("policy_") :] or "kind"
            values.setdefault("policy", {})[field] = raw
            sources[f"policy.{field}"] = name
            continue
        section = next((s for s in _SECTIONS if key.startswith(s + "_")), None)
        if key in top_fields:
            values[key] = raw
            sources[key] = name
        elif section is not None:
            field = key[len(section) + 1 :]
            values.setdefault(section, {})[field] = raw
            sources[f"{section}.{field}"] = name
    return values, sources


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not _replaces(key, out[key], value):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _replaces(key: str, base: dict[str, Any], over: dict[str, Any]) -> bool:
    """A policy of another kind replaces the policy table: the old settings are the old kind's."""
    return key == "policy" and "kind" in over and over["kind"] != base.get("kind", "command")


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RelayConfig:
    """Load a :class:`RelayConfig` from a TOML file, then ``RELAY_*`` variables, then overrides.

    A ``preset`` (file key, ``RELAY_PRESET``) supplies the values nothing else sets.

    The file defaults to the one named by ``RELAY_CONFIG``. Its ``[server]`` table, if any,
    is the relay server's (``relay_agents.server.ServerSettings``) and is skipped here.

    Raises :class:`ConfigError` naming the field (and the variable or file it came from).
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_FILE_VAR) or None
    data: dict[str, Any] = {}
    origin = "configuration"
    if path is not None:
        origin = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    data.pop(SERVER_TABLE, None)  # `relay-agents serve`'s own settings (ServerSettings)
    data = normalise_policy_input(data)  # `policy = "confidence"` merges with RELAY_POLICY_*
    env_values, sources = _env_overrides(env)
    data = _merge(data, env_values)
    if overrides:
        data = _merge(data, dict(overrides))
    if data.get("preset"):
        try:
            data = _merge(preset_values(str(data["preset"])), data)
        except ValueError as exc:
            raise ConfigError(f"preset ({sources.get('preset', origin)}): {exc}") from None
    try:
        return RelayConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if loc[:1] == ["policy"] and len(loc) > 2 and loc[1] in POLICY_KINDS:
                del loc[1]  # the discriminator's tag: policy.threshold, not policy.confidence.threshold
            field = ".".join(loc)
            where = sources.get(field, origin)
            problems.append(f"{field} ({where}): {err['msg']}")
        raise ConfigError("invalid relay configuration: " + "; ".join(problems)) from None
