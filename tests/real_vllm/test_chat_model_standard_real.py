"""The langchain-tests integration suite for ChatRelay on the real vLLM tiny pair.

The same feature claims and strict xfails as the scripted-server run
(``tests/test_chat_model_standard.py``); the tiny models answer anything with arithmetic, which
is all these tests need from them: real text, real usage, real streaming and stop handling.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from relay_agents import ChatRelay
from tests.test_chat_model_standard import _Features, expect_unsupported

_PARAMS: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _tiny_pair(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tiny_servers: Any) -> None:
    expect_unsupported(request, monkeypatch)
    _PARAMS["config"] = tiny_servers.relay_config()
    _PARAMS["override"] = tiny_servers.student.model


class TestChatRelayIntegrationTinyPair(_Features, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"config": _PARAMS["config"]}

    @property
    def model_override_value(self) -> str:
        return _PARAMS["override"]  # the student's served name: vLLM serves one model per server

    @property
    def chat_model_class(self) -> type[ChatRelay]:
        return ChatRelay
