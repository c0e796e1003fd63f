"""Loading the relay configuration from TOML, ``RELAY_*`` variables and overrides.

The models are :mod:`relay_agents.core.config`'s; ``Budget``, ``Endpoint`` and ``RelayConfig`` are
re-exported so that ``from relay_agents.config import RelayConfig`` keeps working.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from relay_agents.core.config import Budget, Endpoint, RelayConfig
from relay_agents.settings import CONFIG_FILE_VAR, ConfigError, load_settings

__all__ = [
    "CONFIG_FILE_VAR",
    "Budget",
    "ConfigError",
    "Endpoint",
    "NotConfigured",
    "RelayConfig",
    "endpoints_configured",
    "load_config",
]

#: Variables of the two endpoints: any of them set means the user is configuring endpoints.
ENDPOINT_VARIABLES = ("RELAY_STUDENT_", "RELAY_TEACHER_")
#: The relay's sections that only the user can give (they have no defaults).
ENDPOINT_SECTIONS = ("student", "teacher")

NOT_CONFIGURED = """no student and teacher endpoints are configured. Configure them in one of three ways:
  1. environment variables: RELAY_STUDENT_BASE_URL and RELAY_STUDENT_MODEL, RELAY_TEACHER_BASE_URL and
     RELAY_TEACHER_MODEL (RELAY_STUDENT_API_KEY / RELAY_TEACHER_API_KEY where a server needs a key);
  2. a TOML file with [student] and [teacher] tables, named by RELAY_CONFIG=relay.toml;
  3. the same file given to a command: relay-agents ask --config relay.toml "...".
Every setting is described in docs/configuration.md. To try the relay without endpoints, run
`relay-agents demo`: it serves tiny student and teacher models on the CPU."""


class NotConfigured(ConfigError):
    """No endpoints are given at all: the message says how to give them."""

    def __init__(self) -> None:
        super().__init__(NOT_CONFIGURED)


def endpoints_configured(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> bool:
    """Whether a config file (``path`` or ``RELAY_CONFIG``) or a ``RELAY_STUDENT_*`` /
    ``RELAY_TEACHER_*`` variable is given: without any, the relay has no endpoints to talk to."""
    env = os.environ if env is None else env
    given = any(name.startswith(ENDPOINT_VARIABLES) for name in env)
    return path is not None or bool(env.get(CONFIG_FILE_VAR)) or given


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RelayConfig:
    """Load a :class:`RelayConfig` from a TOML file, then ``RELAY_*`` variables, then overrides.

    The file defaults to the one named by ``RELAY_CONFIG``. Its ``[server]`` table, if any,
    is the relay server's (``relay_agents.server.ServerSettings``) and is skipped here.
    ``RELAY_POLICY`` / ``RELAY_POLICY_*`` set the policy; one of another kind replaces the
    file's ``[policy]`` table.

    Raises :class:`ConfigError` naming the field (and the variable or file it came from), and
    :class:`NotConfigured` (saying how to configure) when no file or endpoint variable is given.
    """
    env = os.environ if env is None else env
    if not endpoints_configured(path, env) and not set(ENDPOINT_SECTIONS) & set(overrides or {}):
        raise NotConfigured
    return load_settings(
        RelayConfig,
        path=path,
        env=env,
        prefix="RELAY_",
        tags={"policy": "kind"},
        overrides=overrides,
        what="relay configuration",
    )
