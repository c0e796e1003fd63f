"""The langchain-tests integration suite for ChatRelay on the real vLLM tiny pair.

The same feature claims and strict xfails as the scripted-server run
(``tests/test_chat_model_standard.py``); the tiny models answer anything with arithmetic, which
is all these tests need from them: real text, real usage, real streaming and stop handling. The
tests that need a model to write a tool call are strict xfails here (``NO_CALLS``): this pair was
never trained to call tools.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from relay_agents import ChatRelay
from tests.test_chat_model_standard import _Features, expect_unsupported

_PARAMS: dict[str, Any] = {}
_NO_CALLS = "the tiny arithmetic pair was not trained to write tool calls"
NO_CALLS = {
    "test_tool_calling",
    "test_tool_calling_async",
    "test_bind_runnables_as_tools",
    "test_tool_choice",
    "test_tool_calling_with_no_arguments",
    "test_agent_loop",
    "test_unicode_tool_call_integration",
    "test_structured_few_shot_examples",
    "test_structured_output",
    "test_structured_output_async",
    "test_structured_output_pydantic_2_v1",
    "test_structured_output_optional_param",
    "test_json_mode",
}


@pytest.fixture(autouse=True)
def _tiny_pair(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tiny_servers: Any) -> None:
    expect_unsupported(request, monkeypatch)
    if request.node.originalname in NO_CALLS:
        request.applymarker(pytest.mark.xfail(reason=_NO_CALLS, strict=True))
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
