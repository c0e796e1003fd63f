"""The README's "Use in LangChain and LangGraph" snippets run, in order, against the scripted server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay_agents.testing import ScriptedServer
from tests.conftest import CHATML

README = Path(__file__).resolve().parents[1] / "README.md"


def section_snippets(title: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_langchain_and_langgraph_snippets_run(
    scripted: ScriptedServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for role in ("student", "teacher"):
        monkeypatch.setenv(f"RELAY_{role.upper()}_BASE_URL", scripted.base_url)
        monkeypatch.setenv(f"RELAY_{role.upper()}_MODEL", role)
        monkeypatch.setenv(f"RELAY_{role.upper()}_CHAT_TEMPLATE", CHATML)
    monkeypatch.setenv("RELAY_BUDGET_STORE", f"sqlite:///{tmp_path / 'budgets.sqlite'}")
    # Every question about 47*6 gets a student that calls the teacher once.
    scripted.script("student", "47*6", ["47*6 = <call>3</call>", " so \\boxed{290}."] * 4)
    scripted.script("teacher", "47*6", [" 282 and more"] * 4)

    snippets = section_snippets("Use in LangChain and LangGraph")
    assert len(snippets) == 5
    namespace: dict[str, object] = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)

    out = capsys.readouterr().out.splitlines()
    assert out[0] == "47*6 = 282 so \\boxed{290}."  # the chain
    assert "[teacher] ' 2'" in out and "[student] ' so'" in out  # each chunk names its source
    assert "3 497" in out  # the conversation's budget: 3 spent of 500
    assert "thread-9" in out  # the LangGraph thread keys the budget
    assert out[-1] == out[-2] == "I am a scripted model."  # subgraph and agent answers
