"""The output folder's results and pins: what makes a run resumable and refuses to mix runs.

``results.jsonl`` gets one whole line per finished answer, written and flushed at once, so an
interrupted run (Ctrl+C) leaves a valid file; a line cut short by a crash is dropped on reading.
``run.json`` holds the pinned settings; a rerun whose pins differ is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

RESULTS = "results.jsonl"
RUN = "run.json"
CALIBRATION = "calibration.json"


class RunMismatch(ValueError):
    """The output folder holds a run with other settings or data."""


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class ResultStore:
    """The results and pins of one output folder."""

    def __init__(self, out: Path, pinned: dict[str, Any]) -> None:
        self.out = out
        self.pinned = pinned
        out.mkdir(parents=True, exist_ok=True)
        run = out / RUN
        if run.exists():
            before = json.loads(run.read_text())["pinned"]
            changed = _differences(before, pinned)
            if changed:
                raise RunMismatch(
                    f"{out} holds a run with other settings or data; refusing to mix them "
                    f"(use another --out, or remove {out}): " + "; ".join(changed)
                )
        else:
            run.write_text(json.dumps({"pinned": pinned}, indent=2) + "\n")
        self.lines = self._read()
        self._file: IO[str] | None = None

    def _read(self) -> list[dict[str, Any]]:
        path = self.out / RESULTS
        if not path.exists():
            return []
        text = path.read_text()
        whole, _, _cut = text.rpartition("\n")
        if _cut:  # a line cut short (the process died mid-write): drop it
            path.write_text(whole + "\n" if whole else "")
        return [json.loads(line) for line in whole.splitlines() if line.strip()]

    def done(self) -> set[tuple[str, str, str, int]]:
        """(data set, setting, item id, sample) of every finished answer."""
        return {(x["dataset"], x["setting"], x["id"], x["sample"]) for x in self.lines}

    def add(self, line: dict[str, Any]) -> None:
        if self._file is None:
            self._file = (self.out / RESULTS).open("a")
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._file.flush()
        self.lines.append(line)

    def calibration(self) -> dict[str, Any]:
        path = self.out / CALIBRATION
        return json.loads(path.read_text()) if path.exists() else {}

    def save_calibration(self, found: dict[str, Any]) -> None:
        (self.out / CALIBRATION).write_text(json.dumps(found, indent=2) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
