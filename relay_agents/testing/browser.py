"""Debian's headless Chromium under Playwright, as the browser tests and the screenshot script use it.

Playwright's own browser download does not work without network, so the browser is the
system's (``RELAY_CHROMIUM``, else ``chromium`` on the PATH), started with the flags that keep
it from reaching out (updates, sync, QUIC) or needing a GPU or a sandbox in a container.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_executable() -> str:
    """The Chromium to drive: ``RELAY_CHROMIUM``, else ``chromium`` on the PATH."""
    return os.environ.get("RELAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def launch_chromium(playwright: Any, executable: str | None = None) -> Any:
    """A headless Chromium browser from a started ``sync_playwright()``."""
    return playwright.chromium.launch(
        executable_path=executable or chromium_executable(), args=list(CHROMIUM_ARGS), headless=True
    )
