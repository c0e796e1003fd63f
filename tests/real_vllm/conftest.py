"""Real vLLM servers with the tiny student/teacher pair (session-scoped).

Set ``RELAY_SKIP_VLLM=1`` to skip these tests. Otherwise they never skip: if vLLM is not
installed or a server does not start, the fixture errors (naming the install command and
the server log).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

SKIP = os.environ.get("RELAY_SKIP_VLLM") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.real_vllm)
            if SKIP:
                item.add_marker(pytest.mark.skip(reason="RELAY_SKIP_VLLM=1"))


@pytest.fixture(scope="session")
def tiny_servers() -> Iterator[object]:
    from relay_agents.serving import INSTALL_HINT, VLLMServerError, vllm_available
    from relay_agents.tiny.servers import start_tiny_pair

    if not vllm_available():
        raise VLLMServerError(
            f"vLLM is not installed; install it with {INSTALL_HINT} "
            "or set RELAY_SKIP_VLLM=1 to skip the real_vllm tests"
        )
    servers = start_tiny_pair()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def student(tiny_servers):
    return tiny_servers.student


@pytest.fixture(scope="session")
def teacher(tiny_servers):
    return tiny_servers.teacher
