"""The langchain-tests standard suites for ChatRelay (unit, and integration on the scripted server;
``tests/real_vllm/test_chat_model_standard_real.py`` runs the integration suite on the tiny pair).

Every feature flag is on, so every test runs; the ones for features ChatRelay does not support
are marked ``xfail(strict=True)`` with the reason (``UNSUPPORTED``), so they must really fail.
Tool calling and structured output run for real: the scripted student writes Hermes tool calls
for the suite's tools (``_TOOL_ANSWERS``), which reach its prompt through the chat template.
The one skip left is the suite's ``test_stream_time``, a benchmark replayed from recorded VCR
cassettes: this project tests against live loopback servers and records none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.integration_tests import chat_models as chat_model_suite
from langchain_tests.unit_tests import ChatModelUnitTests

from relay_agents import ChatRelay, Endpoint
from relay_agents.testing import ScriptedServer
from tests.conftest import CHATML, TOOLS_CHATML

_SERVER: dict[str, str] = {"base_url": "http://127.0.0.1:9/v1"}


_MEDIA = "the relay prompt is text only: image, audio and PDF content blocks are not supported"
UNSUPPORTED: dict[str, str] = {
    "test_pdf_inputs": _MEDIA,
    "test_audio_inputs": _MEDIA,
    "test_image_inputs": _MEDIA,
    "test_image_tool_message": _MEDIA,
    "test_pdf_tool_message": _MEDIA,
    "test_anthropic_inputs": "Anthropic-style content blocks (tool_use, images) are not supported",
    "test_serdes": "ChatRelay is not LangChain-serializable: langchain_core.load cannot rebuild its "
    "Endpoint and RelayConfig fields",
}
#: What the expected failure must be, where it is one of ChatRelay's own refusals.
_REFUSALS: dict[str, type[Exception]] = {_MEDIA: ValueError}


def _call(name: str, args: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n</tool_call>"


_JOKE = {"setup": "Why did the cat sit on the computer?", "punchline": "To keep an eye on the mouse."}
#: What the student answers to prompts that contain a key, the latest first: the suite's tools
#: are rendered into the prompt by the tool-aware chat template, and the student writes a call
#: in the Hermes format (a tool result in the prompt gets a text answer).
_TOOL_ANSWERS: list[tuple[str, str]] = [
    ("What is 3 + 4", _call("my_adder_tool", {"a": 3, "b": 4})),
    (
        "こんにちは株式会社",
        _call("unicode_customer", {"customer_name": "こんにちは株式会社", "description": "company"}),
    ),
    (
        "你好啊集团",
        _call("unicode_customer", {"customer_name": "你好啊集团", "description": "technology company"}),
    ),
    ("<tool_response>", "The tool answered; here is the result in plain words."),
    ('"name": "magic_function"', _call("magic_function", {"input": 3})),
    ('"name": "magic_function_no_args"', _call("magic_function_no_args", {})),
    ('"name": "get_weather"', _call("get_weather", {"location": "San Francisco, CA"})),
    ('"name": "greeting_generator"', _call("greeting_generator", {"answer_style": "pirate"})),
    ('"name": "JokeDict"', _call("JokeDict", _JOKE)),
    ('"name": "Joke"', _call("Joke", _JOKE)),
]


#: Media files as the suite would download them: enough bytes to be sent, never fetched.
_MEDIA_FILES = {
    ".wav": b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00@\x1f\x00\x00\x80>\x00\x00\x02\x00"
    b"\x10\x00data\x00\x00\x00\x00",
    ".png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89",
    ".pdf": b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
}


class _OfflineMedia:
    """Stands in for the suite's ``httpx`` module: its media tests fetch files from the web,
    and without network they would fail on the download instead of on ChatRelay."""

    @staticmethod
    def get(url: str, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(content=_MEDIA_FILES[url[url.rindex(".") :]])


def expect_unsupported(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Strict xfail, with the reason, for each test of a feature ChatRelay does not support; where
    the failure is ChatRelay's own refusal it must be that one (``_REFUSALS``). Media tests get
    their files offline, so that they fail on the refusal and not on the download."""
    name = request.node.originalname
    if name not in UNSUPPORTED:
        return
    reason = UNSUPPORTED[name]
    request.applymarker(pytest.mark.xfail(reason=reason, strict=True, raises=_REFUSALS.get(reason)))
    if reason == _MEDIA:
        monkeypatch.setattr(chat_model_suite, "httpx", _OfflineMedia)


@pytest.fixture(autouse=True)
def _unsupported(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    expect_unsupported(request, monkeypatch)
    if request.node.originalname == "test_serdes":  # the suite skips unless the class is serializable
        monkeypatch.setattr(ChatRelay, "is_lc_serializable", classmethod(lambda cls: True))


@pytest.fixture(autouse=True)
def _scripted_answers(request: pytest.FixtureRequest, scripted_server: ScriptedServer) -> Iterator[None]:
    """Any prompt gets an answer (with a word the stop test can cut at)."""
    if request.node.get_closest_marker("vcr") is not None:
        yield  # VCR-recorded tests are off (enable_vcr_tests is False): they skip, no server calls
        return
    scripted_server.reset()
    scripted_server.configure(default_response="Hello! Here is a short answer for you, in plain words.")
    for key, answer in reversed(_TOOL_ANSWERS):
        scripted_server.script("student", key, [answer], repeat=True)
    _SERVER["base_url"] = scripted_server.base_url
    yield


def _params() -> dict[str, Any]:
    base_url = _SERVER["base_url"]
    return {
        "model": "student",
        "base_url": base_url,
        "teacher": Endpoint(base_url=base_url, model="teacher", chat_template=CHATML, timeout=5.0),
        "student_options": {"chat_template": TOOLS_CHATML},
    }


class _Features:
    @property
    def chat_model_class(self) -> type[ChatRelay]:
        return ChatRelay

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return _params()

    # Every feature is claimed so that every test runs; UNSUPPORTED marks the expected failures.
    has_tool_calling = True
    has_tool_choice = True

    @property
    def model_override_value(self) -> str:
        return "student-override"

    has_structured_output = True
    supports_json_mode = True
    supports_image_inputs = True
    supports_image_urls = True
    supports_pdf_inputs = True
    supports_audio_inputs = True
    supports_video_inputs = True
    supports_anthropic_inputs = True
    supports_image_tool_message = True
    supports_pdf_tool_message = True


class TestChatRelayUnit(_Features, ChatModelUnitTests):
    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"RELAY_STUDENT_API_KEY": "key-from-env"}, _params(), {"api_key": "key-from-env"}


class TestChatRelayIntegration(_Features, ChatModelIntegrationTests):
    pass
