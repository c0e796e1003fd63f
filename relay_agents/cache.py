"""The relay-agents cache: where built models live, and the file helpers every builder shares."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


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


MANIFEST = "manifest.json"
#: The files of a Hugging Face model directory that vLLM serves.
HF_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def write_manifest(root: Path, keys: dict[str, Any], files: Iterable[str], **extra: Any) -> None:
    """Seal a built directory: checksums of ``files`` (relative to ``root``), the ``keys`` that
    identify what was built, and ``extra`` details, written last and atomically."""
    files = list(files)
    for rel in files:
        _fsync(root / rel)
    manifest = {**keys, "files": {rel: sha256_file(root / rel) for rel in files}, **extra}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(tmp)
    tmp.rename(root / MANIFEST)


def verify_manifest(root: Path, keys: dict[str, Any], files: Iterable[str]) -> bool:
    """Whether ``root`` is a complete build of ``keys``: every file present and unchanged."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        if any(manifest.get(name) != value for name, value in keys.items()):
            return False
        checksums = manifest["files"]
        if set(checksums) != set(files):
            return False
        return all(sha256_file(root / rel) == sha for rel, sha in checksums.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
