"""Settings of the HTTP server itself (address, API keys, request limits).

They live apart from :class:`~relay_agents.core.config.RelayConfig`, which describes the relay:
the same relay configuration can be served, benchmarked or used as a library. Values come
from keyword arguments (the CLI flags), then ``RELAY_SERVER_*`` variables and
``RELAY_API_KEYS``, then the ``[server]`` table of the config file, then the defaults.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from relay_agents.settings import SERVER_TABLE, load_settings

SERVER_ENV_PREFIX = "RELAY_SERVER_"
API_KEYS_VAR = "RELAY_API_KEYS"


class ServerSettings(BaseModel):
    """How ``relay-agents serve`` listens and what it accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model: str = Field(
        default="relay", min_length=1, description="The model id clients ask for (`/v1/models` lists it)."
    )
    api_keys: tuple[SecretStr, ...] = Field(
        default=(), description="Bearer keys; empty means no authentication. Each key is its own budget pool."
    )
    max_prompt_chars: int = Field(
        default=32_000, ge=1, description="Longest prompt accepted, in characters of message text."
    )
    max_body_bytes: int = Field(default=1_000_000, ge=1, description="Largest request body accepted.")
    max_messages: int = Field(default=256, ge=1)
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time a connection has to send a request's headers (from its first byte, or "
        "from opening); then it is closed.",
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Time a request has to send its body; then it is answered 408."
    )
    keep_alive_timeout_s: int = Field(
        default=5, ge=1, description="An idle keep-alive connection is closed after this many seconds."
    )
    max_connections: int | None = Field(
        default=1000,
        ge=1,
        description="Open connections (or requests) per process beyond which uvicorn answers 503; "
        "None: unlimited.",
    )
    auth_failure_burst: int = Field(
        default=10, ge=1, description="Failed authentications a client address may make at once."
    )
    auth_failures_per_s: float = Field(
        default=1.0, gt=0, description="Rate at which a client address earns back failed authentications."
    )
    auth_limiter_clients: int = Field(
        default=4096, ge=1, description="Client addresses the failed-authentication limiter remembers."
    )
    drain_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="On SIGTERM the server stops listening at once (a load balancer's health check "
        "then takes it out) and gives the streams in flight this long to finish; then it cuts them.",
    )
    log_level: str = "info"
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Server processes on one port: one process answers on one core.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [k.strip() for k in value.split(",")]
        if isinstance(value, list | tuple):
            return tuple(k for k in value if (k.get_secret_value() if isinstance(k, SecretStr) else k))
        return value

    @classmethod
    def load(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        config_file: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> ServerSettings:
        """Defaults < the ``[server]`` table of ``config_file`` (default: ``RELAY_CONFIG``) <
        ``RELAY_SERVER_*`` / ``RELAY_API_KEYS`` < ``overrides`` (``None`` is skipped).

        Raises :class:`~relay_agents.settings.ConfigError` naming the field and where it came from.
        """
        return load_settings(
            cls,
            path=config_file,
            env=os.environ if env is None else env,
            prefix=SERVER_ENV_PREFIX,
            table=SERVER_TABLE,
            variables={API_KEYS_VAR: "api_keys"},
            ignore_unknown=False,
            overrides={k: v for k, v in overrides.items() if v is not None},
            what="server settings",
        )

    def key_pool(self, key: str) -> str | None:
        """The budget pool of a presented key (``key:<short sha256>``), or None if it is not valid.

        Every configured key is compared (in constant time) so timing does not tell which matched.
        """
        matched = False
        for known in self.api_keys:
            matched |= hmac.compare_digest(known.get_secret_value().encode(), key.encode())
        return pool_id(key) if matched else None


def pool_id(key: str) -> str:
    """The budget pool named after an API key, without revealing the key."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
