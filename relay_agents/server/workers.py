"""Serving from several worker processes: ``relay-agents serve --workers N``.

One Python process answers on one core. uvicorn's supervisor starts each worker as a fresh
interpreter that calls :func:`worker_app`, which loads the same config file and environment
the parent has already validated. What the workers share lives outside them: budgets in the
budget store (SQLite across the processes of one machine, PostgreSQL across machines), and
metrics in prometheus-client's multiprocess files, so ``/metrics`` of any worker counts them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from relay_agents.config import load_config
from relay_agents.server.app import create_app
from relay_agents.server.metrics import METRICS_DIR_VAR
from relay_agents.server.settings import ServerSettings

#: Where the parent leaves the worker's arguments (the config file and the CLI flags).
WORKER_SPEC_VAR = "RELAY_AGENTS_WORKER_SPEC"
#: ``uvicorn.run`` target of every worker (``factory=True``).
WORKER_APP = "relay_agents.server.workers:worker_app"


@contextlib.contextmanager
def worker_environment(config_file: Path | None, **flags: Any) -> Iterator[None]:
    """Set up what the workers inherit: their arguments and an empty metrics directory
    (removed afterwards). ``flags`` are ``ServerSettings.load`` overrides (the CLI's)."""
    spec = {"config_file": None if config_file is None else str(Path(config_file).resolve()), "flags": flags}
    metrics_dir = tempfile.mkdtemp(prefix="relay-agents-metrics-")
    saved = {name: os.environ.get(name) for name in (WORKER_SPEC_VAR, METRICS_DIR_VAR)}
    os.environ[WORKER_SPEC_VAR] = json.dumps(spec)
    os.environ[METRICS_DIR_VAR] = metrics_dir
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_app() -> FastAPI:
    """The app of one worker process."""
    spec = json.loads(os.environ[WORKER_SPEC_VAR])
    config = load_config(spec["config_file"])
    settings = ServerSettings.load(config_file=spec["config_file"], **spec["flags"])
    return create_app(config, settings)
