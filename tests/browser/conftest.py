"""Headless Chromium (Debian's ``chromium`` package) driven by Playwright for Python.

Playwright's own browser download does not work on these machines, so the browser is
Debian's, named by ``executable_path``. Set ``RELAY_SKIP_BROWSER=1`` to skip these tests;
otherwise a missing browser fails them (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_agents.testing.browser import chromium_executable, launch_chromium

SKIP = os.environ.get("RELAY_SKIP_BROWSER") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.browser)
            if SKIP:
                item.add_marker(pytest.mark.skip(reason="RELAY_SKIP_BROWSER=1"))


def chromium_path() -> str:
    path = chromium_executable()
    if not Path(path).is_file():
        pytest.fail(
            "Debian's chromium is not installed (apt-get install -y chromium); the browser tests need "
            "it. Set RELAY_SKIP_BROWSER=1 to skip them explicitly.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Closed after each module, so Playwright's event loop never outlives the browser tests."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, executable)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: object, tmp_path: Path) -> Iterator[object]:
    """A fresh page; the browser's console errors are collected in ``page.console_errors``."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.set_default_timeout(20_000)
    try:
        yield page
    finally:
        context.close()
