"""The Python snippets of README.md and docs/*.md run, in order per file, against the scripted server.

A snippet that cannot run here (it needs a hosted teacher or a real vLLM server) is marked with
``<!-- skip-test: the reason -->`` on the line before its fence. Each file's count of runnable
snippets is pinned in ``RUNNABLE``, so a snippet that is dropped, or skipped without need, fails.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay_agents.testing import ScriptedServer
from tests.conftest import CHATML, TOOLS_CHATML
from tests.test_entry_points import CLI

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: runnable ```python snippets per page; pages not named here have none
RUNNABLE = {
    "README.md": 3,
    "docs/langchain.md": 5,
    "docs/policies.md": 1,
    "docs/python.md": 3,
    "docs/server.md": 1,
    "docs/tools.md": 2,
}
#: the address the server snippets use; the tests serve on a free port instead
SNIPPET_SERVER = "http://127.0.0.1:8000"

_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.M | re.S)
_SKIP = re.compile(r"<!-- skip-test: (\S[^\n]*?) -->\Z")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    code: str
    skip_reason: str | None


def python_snippets(page: Path) -> list[Snippet]:
    text = page.read_text()
    snippets = []
    for fence in _FENCE.finditer(text):
        info = fence.group(1).strip()
        if not info.startswith("py"):
            continue
        assert info == "python", f"{page.name}: fence ```{info}: write ```python (and skip-test above it)"
        before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        line = text.count("\n", 0, fence.start()) + 2
        snippets.append(Snippet(page, line, fence.group(2), skip.group(1) if skip else None))
    return snippets


def runnable(name: str) -> list[Snippet]:
    snippets = [s for s in python_snippets(ROOT / name) if s.skip_reason is None]
    assert len(snippets) == RUNNABLE[name], f"{name}: {len(snippets)} runnable snippets"
    return snippets


def run_snippets(snippets: list[Snippet], replace: dict[str, str] | None = None) -> None:
    """Exec the snippets in order in one namespace, as a reader pastes them into one session."""
    namespace: dict[str, object] = {}
    for snippet in snippets:
        code = snippet.code
        for old, new in (replace or {}).items():
            code = code.replace(old, new)
        exec(compile(code, f"{snippet.page}:{snippet.line}", "exec"), namespace)


@pytest.fixture
def relay_env(scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ScriptedServer:
    """The environment the snippets' ``load_config()`` reads: the scripted server as both models."""
    for role in ("student", "teacher"):
        monkeypatch.setenv(f"RELAY_{role.upper()}_BASE_URL", scripted.base_url)
        monkeypatch.setenv(f"RELAY_{role.upper()}_MODEL", role)
        monkeypatch.setenv(f"RELAY_{role.upper()}_CHAT_TEMPLATE", CHATML)
    monkeypatch.setenv("RELAY_BUDGET_STORE", f"sqlite:///{tmp_path / 'budgets.sqlite'}")
    monkeypatch.chdir(tmp_path)  # files the snippets write (a SQLite checkpointer) land here
    # Every question about 47*6 gets a student that calls the teacher once.
    scripted.script("student", "47*6", ["47*6 = <call>3</call>", " so \\boxed{290}."], repeat=True)
    scripted.script("teacher", "47*6", [" 282 and more"], repeat=True)
    return scripted


@pytest.fixture
def relay_server(relay_env: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``relay-agents serve`` as the snippets start it (key ``sk-team-a``), on a free port."""
    monkeypatch.setenv("RELAY_API_KEYS", "sk-team-a")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [CLI, "serve", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"serve exited: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "serve did not become healthy"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)


def test_the_readme_snippets_run(relay_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    snippets = runnable("README.md")
    assert SNIPPET_SERVER in snippets[2].code
    run_snippets(snippets, {SNIPPET_SERVER: relay_server})

    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        "47*6 = 282 so \\boxed{290}.",  # relay(): the clean answer
        "student '47*6 ='",  # and its spans
        "teacher ' 282'",
        "student ' so \\\\boxed{290}.'",
    ]
    assert out[4].startswith("3 0.")  # teacher tokens, call ratio
    assert out[5:7] == ["47*6 = 282 so \\boxed{290}.", "3"]  # ChatRelay: the answer, the conversation's spend
    assert out[7:] == ["47*6 = 282 so \\boxed{290}.", "3"]  # through relay-agents serve


def test_the_python_page_snippets_run(relay_env: ScriptedServer, capsys: pytest.CaptureFixture[str]) -> None:
    run_snippets(runnable("docs/python.md"))

    out = capsys.readouterr().out.splitlines()
    assert out[0] == "47*6 = 282 so \\boxed{290}."
    assert "source='teacher', text=' 282'" in out[1]  # the spans
    assert "teacher_tokens=3" in out[2] and out[3] == "stop"
    streamed = [line for line in out if line.startswith("[")]
    assert "[teacher] ' 2'" in streamed and any(line.startswith("[student]") for line in streamed)
    assert out[out.index(streamed[-1]) + 1] == "1"  # stream.result: one teacher call
    assert out[-3:-1] == ["I am a scripted model.", "stop"]  # the checkpointed graph
    assert int(out[-1]) > 0
    assert (Path.cwd() / "conversations.sqlite").exists()


def test_the_langchain_and_langgraph_snippets_run(
    relay_env: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    run_snippets(runnable("docs/langchain.md"))

    out = capsys.readouterr().out.splitlines()
    assert out[0] == "47*6 = 282 so \\boxed{290}."  # the chain
    assert "[teacher] ' 2'" in out and "[student] ' so'" in out  # each chunk names its source
    assert "3 497" in out  # the conversation's budget: 3 spent of 500
    assert "thread-9" in out  # the LangGraph thread keys the budget
    assert out[-1] == out[-2] == "I am a scripted model."  # subgraph and agent answers


def test_the_server_page_snippet_runs(relay_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    snippets = runnable("docs/server.md")
    assert SNIPPET_SERVER in snippets[0].code
    run_snippets(snippets, {SNIPPET_SERVER: relay_server})

    out = capsys.readouterr().out.splitlines()
    assert out[0] == "47*6 = 282 so \\boxed{290}."
    assert out[1:3] == ["3 1", "stop"]  # the teacher wrote 3 tokens in one call
    assert "teacher ' 2'" in out[3:] and "student ' ='" in out[3:]  # each streamed delta names its model


def test_the_policies_page_snippet_runs(
    relay_env: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # A student that never calls, sure of every token but the second digit of 65*7 = 455.
    unsure = {"text": "65*7 = 455.\n\\boxed{455}", "probs": [None] * 6 + [0.18]}
    relay_env.script("student", "65*7", [unsure, "\\boxed{455}"])
    relay_env.script("teacher", "65*7", ["55.\nmore"])
    run_snippets(runnable("docs/policies.md"))

    out = capsys.readouterr().out.splitlines()
    assert out == ["student '65*7 = 4'", "teacher '55.\\n'", "student '\\\\boxed{455}'"]


@pytest.fixture
def tools_env(relay_env: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> ScriptedServer:
    """Models whose template renders tools; the student names the tool and calls the teacher
    for the first argument, and answers in text once the tool's result is in the prompt."""
    for role in ("student", "teacher"):
        monkeypatch.setenv(f"RELAY_{role.upper()}_CHAT_TEMPLATE", TOOLS_CHATML)
    call = '<tool_call>\n{"name": "multiply", "arguments": {"a": <call>5</call>'
    relay_env.script("student", "1234 * 12", [call, ' "b": 12}}\n</tool_call>'], repeat=True)
    relay_env.script("teacher", "1234 * 12", [" 1234, 99999"], repeat=True)
    relay_env.script("student", "<tool_response>\n14808", ["1234 * 12 = <call>5</call>", "."], repeat=True)
    relay_env.script("teacher", "<tool_response>\n14808", [" 14808 indeed"], repeat=True)
    return relay_env


def test_the_tools_page_snippets_run(
    tools_env: ScriptedServer, relay_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    snippets = runnable("docs/tools.md")
    assert SNIPPET_SERVER in snippets[1].code
    run_snippets(snippets, {SNIPPET_SERVER: relay_server})

    out = capsys.readouterr().out.splitlines()
    assert out == [
        "multiply {'a': 1234, 'b': 12}",
        """student '<tool_call>\\n{"name": "multiply", "arguments": {"a":'""",
        "teacher ' 1234,'",  # the teacher wrote the hard argument
        """student ' "b": 12}}\\n</tool_call>'""",
        "1234 * 12 = 14808.",  # the agent's answer after the tool ran
        'tool_calls multiply {"a": 1234, "b": 12}',  # through the server
        "1234 * 12 = 14808.",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_snippet_runs_or_says_why_not(page: Path) -> None:
    name = str(page.relative_to(ROOT))
    snippets = python_snippets(page)
    assert sum(s.skip_reason is None for s in snippets) == RUNNABLE.get(name, 0)
    assert all(s.skip_reason is None or s.skip_reason.strip() for s in snippets)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.+)$", _FENCE.sub("", page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading(page: Path) -> None:
    text = _FENCE.sub("", page.read_text())
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.name} has broken links: {broken}"
