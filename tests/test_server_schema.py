"""The server against its own OpenAPI schema: schemathesis generates requests for every route
(valid and invalid bodies, streamed and whole), sends them to a real server on loopback with
the scripted upstreams behind it, and checks that no answer is a 5xx and every answer is one
the schema describes (status, content type, body)."""

from __future__ import annotations

import asyncio
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from relay_agents.server import ServerSettings
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config
from tests.server_support import serving

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: Examples per generation mode: about 15 s on a 2-core machine.
EXAMPLES = 120
#: Fields the relay refuses (tested one by one in test_server_errors.py), and ``tool_choice``: a
#: required call the scripted student never writes is answered 502 by design (test_server_tools.py).
REFUSED = (
    "n",
    "stop",
    "functions",
    "response_format",
    "logprobs",
    "echo",
    "suffix",
    "best_of",
    "tool_choice",
)
ANSWER_CAP = 64


def answerable(body: dict[str, Any]) -> None:
    """Most schema-valid bodies still ask nothing answerable (no user message, an unknown
    model, ``n=3``); half of the generated bodies are made answerable, keeping every other
    field as generated, so the fuzz reaches the relay, its streams and its errors."""
    body["model"] = "relay"
    if "messages" in body:
        messages = body["messages"] if isinstance(body["messages"], list) else []
        body["messages"] = [*messages, {"role": "user", "content": "Q-fuzz"}]
    else:
        body["prompt"] = "Q-fuzz"
    for name in REFUSED:
        body.pop(name, None)
    for name in ("max_tokens", "max_completion_tokens"):
        cap = body.get(name)
        if cap is not None and not (type(cap) is int and 1 <= cap <= ANSWER_CAP):
            body.pop(name)


def fuzz(url: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers={"Authorization": "Bearer sk-fuzz"})

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy(mode), repair=st.booleans())
    def check(case: schemathesis.Case, repair: bool) -> None:
        if repair and isinstance(case.body, dict):
            answerable(case.body)
        headers = {"Authorization": "Bearer sk-fuzz"}
        response = case.call(base_url=url, headers=headers, timeout=10)
        case.validate_response(response, checks=CHECKS, headers=headers)

    check()


async def test_the_server_keeps_to_its_schema(scripted: ScriptedServer) -> None:
    scripted.configure(default_response="Six times seven is <call>4</call> so \\boxed{42}.")
    config = relay_config(scripted, max_answer_tokens=ANSWER_CAP)
    server_settings = ServerSettings.load(env={"RELAY_API_KEYS": "sk-fuzz"})
    async with serving(config, server_settings) as url:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            await asyncio.to_thread(fuzz, url, mode)
    assert scripted.requests(), "no generated request reached the relay"
