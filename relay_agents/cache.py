"""The relay-agents cache: where built models live, and the file helpers every builder shares."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """``$RELAY_AGENTS_CACHE`` or ``~/.cache/relay-agents``."""
    env = os.environ.get("RELAY_AGENTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "relay-agents"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (two test runs building the same model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
