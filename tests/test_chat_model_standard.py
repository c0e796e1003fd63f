"""The langchain-tests standard suites for ChatRelay (unit, and integration on the scripted server).

Not supported, so switched off through the suites' feature flags (the suites then skip those
tests): tool calling (the relay continues one plain-text answer between two models; neither
endpoint is asked for tool calls, and ``bind_tools`` raises ``NotImplementedError``),
structured output and JSON mode (they are built on tool calling / response formats), image,
audio, video and PDF inputs (the relay prompt is text only), Anthropic-style inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from relay_agents import ChatRelay, Endpoint
from relay_agents.testing import ScriptedServer
from tests.conftest import CHATML

_SERVER: dict[str, str] = {"base_url": "http://127.0.0.1:9/v1"}


@pytest.fixture(autouse=True)
def _scripted_answers(request: pytest.FixtureRequest, scripted_server: ScriptedServer) -> Iterator[None]:
    """Any prompt gets an answer (with a word the stop test can cut at)."""
    if request.node.get_closest_marker("vcr") is not None:
        yield  # VCR-recorded tests are off (enable_vcr_tests is False): they skip, no server calls
        return
    scripted_server.reset()
    scripted_server.configure(default_response="Hello! Here is a short answer for you, in plain words.")
    _SERVER["base_url"] = scripted_server.base_url
    yield


def _params() -> dict[str, Any]:
    base_url = _SERVER["base_url"]
    return {
        "model": "student",
        "base_url": base_url,
        "teacher": Endpoint(base_url=base_url, model="teacher", chat_template=CHATML, timeout=5.0),
        "student_options": {"chat_template": CHATML},
    }


class _Features:
    @property
    def chat_model_class(self) -> type[ChatRelay]:
        return ChatRelay

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return _params()

    @property
    def has_tool_calling(self) -> bool:
        return False  # plain-text relay; bind_tools raises NotImplementedError

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False  # needs tool calling or response formats

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def model_override_value(self) -> str:
        return "student-override"


class TestChatRelayUnit(_Features, ChatModelUnitTests):
    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"RELAY_STUDENT_API_KEY": "key-from-env"}, _params(), {"api_key": "key-from-env"}


class TestChatRelayIntegration(_Features, ChatModelIntegrationTests):
    pass
