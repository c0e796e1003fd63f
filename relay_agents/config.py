"""Loading the relay configuration from TOML, ``RELAY_*`` variables and overrides.

The models are :mod:`relay_agents.core.config`'s; ``Budget``, ``Endpoint`` and ``RelayConfig`` are
re-exported so that ``from relay_agents.config import RelayConfig`` keeps working.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from relay_agents.core.config import Budget, Endpoint, RelayConfig
from relay_agents.policies import POLICY_KINDS, normalise_policy_input

__all__ = ["CONFIG_FILE_VAR", "Budget", "ConfigError", "Endpoint", "RelayConfig", "load_config"]


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
