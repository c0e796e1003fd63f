"""The one loader of the relay's configuration and the relay server's settings.

Both come from the same places, each over the one before: a TOML file (the path given, else the
one ``RELAY_CONFIG`` names; the relay reads its top level, the server its ``[server]`` table),
environment variables under a prefix (``RELAY_STUDENT_BASE_URL`` -> ``student.base_url``), then
keyword overrides. Errors name the field and the variable, file or argument it came from.

Hand-written rather than on pydantic-settings 2.16, whose sources were tried and measured on the
relay's loader (a 40-variable environment, a 14-line file): ``EnvSettingsSource`` reads
``os.environ`` only (a given mapping means overriding its private ``_load_env_vars``), its ``_``
nested delimiter also reads ``RELAY_BUDGET_STORE`` as ``budget.store``, it drops
``RELAY_POLICY_*`` once ``RELAY_POLICY`` is set, merges a policy of another kind into the file's
table and does not say where a value came from. With those fixed on top, the relay's loader alone
took 67 lines (this module, for both loaders: 106) and about 10 times as long per
``load_config``: 2.0-2.3 ms against 0.19-0.22 ms, measured together on a loaded machine.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Set
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

#: The variable naming the config file, when no path is given.
CONFIG_FILE_VAR = "RELAY_CONFIG"
#: The TOML table that holds the relay server's settings; the rest of the file is the relay's.
SERVER_TABLE = "server"

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field and its source."""


def load_settings(
    model: type[ModelT],
    *,
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str],
    prefix: str,
    table: str | None = None,
    variables: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    ignore_unknown: bool = True,
    overrides: Mapping[str, Any] | None = None,
    what: str,
) -> ModelT:
    """``model`` from the file's top level (less ``[server]``) or its ``table``, ``env``, ``overrides``.

    ``what`` names the model in error messages.

    A variable ``<prefix><field>`` sets a field and ``<prefix><section>_<field>`` a field of a
    section (a field that is a model, or a tagged one); ``variables`` maps other names to fields.
    Names under the prefix that are no field are ignored when ``ignore_unknown`` (the prefix is
    shared with other variables), else rejected. ``tags`` maps a section to its tag field, as
    ``{"policy": "kind"}``: ``<prefix>POLICY`` and ``policy = "..."`` in the file set the kind, and
    a section given another kind replaces the table below it instead of merging into it (its
    settings are the other kind's).
    """
    tags = tags or {}
    data, origin = _read_file(path if path is not None else env.get(CONFIG_FILE_VAR) or None, table)
    data = {
        key: {tags[key]: value} if key in tags and isinstance(value, str) else value
        for key, value in data.items()
    }
    sources = dict.fromkeys(data, origin)
    env_values, env_sources = _from_env(model, env, prefix, variables or {}, tags, ignore_unknown)
    data = _merge(data, env_values, _retagged(model, tags, data, env_values))
    sources.update(env_sources)
    if overrides:
        data = _merge(data, dict(overrides), _retagged(model, tags, data, overrides))
        sources.update(dict.fromkeys(overrides, "argument"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            tagged = data.get(loc[0]) if loc[0] in tags else None
            if len(loc) > 2 and isinstance(tagged, dict) and loc[1] == tagged.get(tags[loc[0]]):
                del loc[1]  # the discriminator's tag: policy.threshold, not policy.confidence.threshold
            field = ".".join(loc)
            where = sources.get(field) or sources.get(loc[0], origin)
            problems.append(f"{field} ({where}): {err['msg']}")
        raise ConfigError(f"invalid {what}: " + "; ".join(problems)) from None


def _read_file(path: str | os.PathLike[str] | None, table: str | None) -> tuple[dict[str, Any], str]:
    """The file's values and the name errors give them (``configuration`` without a file)."""
    if path is None:
        return {}, "configuration"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if table is None:
        data.pop(SERVER_TABLE, None)
        return data, str(path)
    section = data.get(table, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [{table}] must be a table")
    return section, f"{path} [{table}]"


def _from_env(
    model: type[BaseModel],
    env: Mapping[str, str],
    prefix: str,
    variables: Mapping[str, str],
    tags: Mapping[str, str],
    ignore_unknown: bool,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The nested values set by ``env`` and, for error messages, the variable behind each field."""
    fields = model.model_fields
    sections = {name for name, f in fields.items() if _is_model(f.annotation)} | set(tags)
    by_length = sorted(sections, key=len, reverse=True)  # budget_x is budget's, turn_budget_x turn_budget's
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    named = [(name[len(prefix) :].lower(), name) for name in env if name.startswith(prefix)]
    for key, name in named + [(field, name) for name, field in variables.items() if name in env]:
        section = next((s for s in by_length if key.startswith(s + "_")), None)
        if key in tags:
            section, key = key, tags[key]
        elif (key in fields and key not in sections) or name in variables:
            section = None
        elif section is not None:
            key = key[len(section) + 1 :]
        elif ignore_unknown:
            continue
        (values.setdefault(section, {}) if section else values)[key] = env[name]
        sources[f"{section}.{key}" if section else key] = name
    return values, sources


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _retagged(
    model: type[BaseModel], tags: Mapping[str, str], base: Mapping[str, Any], over: Mapping[str, Any]
) -> set[str]:
    """The tagged sections that ``over`` gives another tag than ``base`` (or the field's default) has."""
    replaced = set()
    for section, tag in tags.items():
        old, new = base.get(section), over.get(section)
        if isinstance(old, dict) and isinstance(new, dict) and tag in new:
            default = getattr(model.model_fields[section].get_default(call_default_factory=True), tag, None)
            if new[tag] != old.get(tag, default):
                replaced.add(section)
    return replaced


def _merge(base: dict[str, Any], over: dict[str, Any], replaced: Set[str] = frozenset()) -> dict[str, Any]:
    """Tables merge key by key, but for the top-level ones in ``replaced``."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in replaced:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
