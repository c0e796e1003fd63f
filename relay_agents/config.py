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

__all__ = ["CONFIG_FILE_VAR", "Budget", "ConfigError", "Endpoint", "RelayConfig", "load_config"]


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

    Raises :class:`ConfigError` naming the field (and the variable or file it came from).
    """
    return load_settings(
        RelayConfig,
        path=path,
        env=os.environ if env is None else env,
        prefix="RELAY_",
        tags={"policy": "kind"},
        overrides=overrides,
        what="relay configuration",
    )
