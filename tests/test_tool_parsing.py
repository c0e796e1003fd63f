"""The tool-call parser of the pure core: each format, malformed calls, and stream == whole."""

from __future__ import annotations

import random

import pytest

from relay_agents.core.tools import CallPiece, ToolCallStream, ToolParser, parse_tool_calls

HERMES_TWO = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": {"a": 1}}}\n'
    '</tool_call>\n<tool_call>{"arguments": {}, "name": "clock"}</tool_call>\n'
)
CASES: list[tuple[str, ToolParser, str, list[tuple[str, dict]], list[str | None]]] = [
    (
        HERMES_TWO,
        "hermes",
        "Let me check.",
        [("get_weather", {"city": "Paris", "n": {"a": 1}}), ("clock", {})],
        [],
    ),
    ('<tool_call>{"name": "calc", "arguments": {"x": 3,,}}</tool_call>', "hermes", "", [], ["calc"]),
    ('<tool_call>{"name": "calc", "arguments": "{\\"x\\": 3}"}</tool_call>', "hermes", "", [], ["calc"]),
    ("<tool_call>not json</tool_call> after", "hermes", "after", [], [None]),
    ("plain text <tool", "hermes", "plain text <tool", [], []),
    ("a < b and <b>bold</b>", "hermes", "a < b and <b>bold</b>", [], []),
    ('<tool_call>{"name": "calc", "arguments": {"x": 3', "hermes", "", [], ["calc"]),
    ('<tool_call>{"name": "calc", "arguments": {"x": 3}}', "hermes", "", [("calc", {"x": 3})], []),
    ('<tool_call>{"name": "é", "arguments": {"s": "}"}} </tool_call>', "hermes", "", [("é", {"s": "}"})], []),
    (
        'ok [TOOL_CALLS][{"name": "a", "arguments": {"q": 1}}, {"name": "b", "arguments": {}}]',
        "mistral",
        "ok",
        [("a", {"q": 1}), ("b", {})],
        [],
    ),
    ("[TOOL_CALLS][{oops", "mistral", "", [], [None]),
    ("no calls [TOOL", "mistral", "no calls [TOOL", [], []),
    ('<|python_tag|>{"name": "a", "parameters": {"q": 1}}', "llama3_json", "", [("a", {"q": 1})], []),
    ('{"name": "a", "parameters": {"q": 1}}', "llama3_json", "", [("a", {"q": 1})], []),
    ('{"answer": 1}', "llama3_json", '{"answer": 1}', [], []),
    ("hello there", "llama3_json", "hello there", [], []),
]


@pytest.mark.parametrize(("text", "parser", "content", "calls", "invalid"), CASES)
def test_whole_answer(
    text: str, parser: ToolParser, content: str, calls: list[tuple[str, dict]], invalid: list[str | None]
) -> None:
    parsed = parse_tool_calls(text, parser)
    assert parsed.content == content
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == calls
    assert [c["name"] for c in parsed.invalid_tool_calls] == invalid
    assert all(c["error"] and isinstance(c["args"], str) for c in parsed.invalid_tool_calls)
    assert len({c["id"] for c in [*parsed.tool_calls, *parsed.invalid_tool_calls]}) == len(calls) + len(
        invalid
    )


@pytest.mark.parametrize(("text", "parser"), [(case[0], case[1]) for case in CASES])
def test_any_chunking_parses_as_the_whole_answer(text: str, parser: ToolParser) -> None:
    whole = parse_tool_calls(text, parser)
    rng = random.Random(text)
    for _ in range(40):
        stream, pos, events = ToolCallStream(parser), 0, []
        while pos < len(text):
            step = rng.randint(1, 6)
            events += stream.feed(text[pos : pos + step])
            pos += step
        events += stream.finish()
        parsed = stream.parsed()
        assert "".join(e for e in events if isinstance(e, str)) == whole.content
        assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [
            (c["name"], c["args"]) for c in whole.tool_calls
        ]
        assert [(c["name"], c["args"]) for c in parsed.invalid_tool_calls] == [
            (c["name"], c["args"]) for c in whole.invalid_tool_calls
        ]


def test_hermes_arguments_stream_as_they_are_written() -> None:
    stream = ToolCallStream("hermes")
    assert stream.feed("Sure. <tool_call>\n{") == ["Sure."]
    head = stream.feed('"name": "add", "arguments": {"a": 1')
    assert head[0] == CallPiece(0, head[0].id, "add", "") and head[0].id
    assert [p.args for p in head[1:]] == ['{"a": 1']
    assert [p.args for p in stream.feed(', "b": 2}')] == [', "b": 2']  # "}" may be the outer one
    assert [p.args for p in stream.feed("}\n</tool")] == ["}"]
    assert stream.feed("_call> Done.") == ["Done."]  # white space after a call is dropped

    assert stream.finish() == []
    assert stream.parsed().tool_calls[0]["args"] == {"a": 1, "b": 2}
    assert stream.parsed().content == "Sure.Done."
