"""The CLI, the langgraph.json graph and the examples, run as users run them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

import relay_agents
from relay_agents.cli import app
from relay_agents.config import NotConfigured
from relay_agents.testing import ScriptedServer
from tests.conftest import CHATML

ROOT = Path(__file__).resolve().parents[1]
#: The console script installed next to this interpreter (the venv need not be activated).
CLI = str(Path(sys.executable).parent / "relay-agents")


def relay_env(server: ScriptedServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    config = tmp_path / "relay.toml"
    template = json.dumps(CHATML)
    config.write_text(
        f'[student]\nbase_url = "{server.base_url}"\nmodel = "student"\nchat_template = {template}\n'
        f'[teacher]\nbase_url = "{server.base_url}"\nmodel = "teacher"\nchat_template = {template}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return {**env, "RELAY_CONFIG": str(config), **extra}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)


COMMANDS = {"ask", "demo", "serve", "tutor", "calibrate", "eval", "train"}
#: The subcommands of command groups, whose help must load nothing heavy either.
SUBCOMMANDS = [["train", "filter"], ["train", "cold-start"]]
#: What the relay itself imports; the command line loads them only when a command runs.
HEAVY_MODULES = (
    "langgraph",
    "langchain_core",
    "openai",
    "fastapi",
    "uvicorn",
    "relay_agents.api",
    "torch",
    "transformers",
    "trl",
)


def test_help_lists_every_command_with_a_one_sentence_summary() -> None:
    assert set(typer.main.get_command(app).commands) == COMMANDS  # type: ignore[attr-defined]
    out = run([CLI, "--help"], {**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    summaries = dict(re.findall(r"^│ (\w+) +(\S.*?) *│$", out.stdout, re.MULTILINE))
    assert set(summaries) == COMMANDS, out.stdout
    for command, summary in summaries.items():
        assert summary.endswith(".") and summary.count(". ") == 0, (command, summary)


def test_calibrate_help_shows_the_policy_table() -> None:
    out = run([CLI, "calibrate", "--help"], {**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "config file's [policy] table" in out.stdout


def test_the_command_line_loads_the_relay_only_when_a_command_runs() -> None:
    script = (
        "import sys\n"
        "from relay_agents.cli import app\n"
        "loaded = [m for m in HEAVY if m in sys.modules]\n"
        "for args in [['--help']] + [[*command, '--help'] for command in COMMANDS]:\n"
        "    try:\n"
        "        app(args, prog_name='relay-agents')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    loaded += [m for m in HEAVY if m in sys.modules]\n"
        "print('loaded:', sorted(set(loaded)), file=sys.stderr)\n"
    )
    commands = [[c] for c in sorted(COMMANDS)] + SUBCOMMANDS
    setup = f"HEAVY = {HEAVY_MODULES!r}\nCOMMANDS = {commands!r}\n"
    out = run([sys.executable, "-c", setup + script], dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stderr


def test_every_public_name_loads() -> None:
    for name in relay_agents.__all__:
        assert getattr(relay_agents, name).__module__.startswith("relay_agents."), name
    assert set(relay_agents.__all__) <= set(dir(relay_agents))


def test_ask_prints_the_answer_and_usage(scripted: ScriptedServer, tmp_path: Path) -> None:
    scripted.script("student", "Q-cli", ["So 12*34 = <call>3</call>", ". \\boxed{408}"])
    scripted.script("teacher", "Q-cli", [" 408 and so on"])
    env = relay_env(scripted, tmp_path)
    out = run([CLI, "ask", "Q-cli", "--config", env["RELAY_CONFIG"]], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "So 12*34 = 408. \\boxed{408}"
    assert "teacher 3 tokens in 1 call (" in out.stderr


def test_ask_json(scripted: ScriptedServer, tmp_path: Path) -> None:
    scripted.script("student", "Q-json", ["So 12*34 = <call>3</call>", ". \\boxed{408}"])
    scripted.script("teacher", "Q-json", [" 408 and so on"])
    env = relay_env(scripted, tmp_path)
    out = run([CLI, "ask", "Q-json", "--json", "-c", env["RELAY_CONFIG"]], env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["text"] == "So 12*34 = 408. \\boxed{408}"
    assert [s["source"] for s in data["spans"]] == ["student", "teacher", "student"]
    assert data["usage"]["teacher_calls"] == 1


def test_ask_with_a_bad_config_names_the_field(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({"RELAY_STUDENT_BASE_URL": "nope", "RELAY_STUDENT_MODEL": "s"})
    out = run([CLI, "ask", "hi"], env)
    assert out.returncode == 2
    assert "student.base_url" in out.stderr and "teacher" in out.stderr


def test_ask_when_the_student_is_down(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        {
            "RELAY_STUDENT_BASE_URL": "http://127.0.0.1:9/v1",
            "RELAY_STUDENT_MODEL": "s",
            "RELAY_STUDENT_CHAT_TEMPLATE": CHATML,
            "RELAY_STUDENT_RETRY_DEADLINE": "1",
            "RELAY_TEACHER_BASE_URL": "http://127.0.0.1:9/v1",
            "RELAY_TEACHER_MODEL": "t",
        }
    )
    out = run([CLI, "ask", "hi"], env)
    assert out.returncode == 1
    assert "APIConnectionError: student endpoint http://127.0.0.1:9/v1" in out.stderr
    assert "refused the connection" in out.stderr and "RELAY_STUDENT_BASE_URL" in out.stderr


def test_langgraph_json_graph_loads_and_runs(scripted: ScriptedServer, tmp_path: Path, monkeypatch) -> None:
    spec = json.loads((ROOT / "langgraph.json").read_text())
    path, _, attr = spec["graphs"]["relay"].partition(":")
    env = relay_env(scripted, tmp_path)
    monkeypatch.setenv("RELAY_CONFIG", env["RELAY_CONFIG"])
    module_spec = importlib.util.spec_from_file_location("relay_graph_entry", ROOT / path)
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    graph = getattr(module, attr)
    scripted.script("student", "Q-studio", ["a <call>1</call>", " c"])
    scripted.script("teacher", "Q-studio", [" b"])
    state = graph.invoke({"messages": [{"role": "user", "content": "Q-studio"}]})
    assert state["messages"][-1].text == "a b c"
    assert set(state) == {"messages"}


def test_examples_run(scripted: ScriptedServer, tmp_path: Path) -> None:
    env = relay_env(scripted, tmp_path)
    scripted.script("student", "17*23", ["17*23 = <call>3</call>", ". \\boxed{391}"])
    scripted.script("teacher", "17*23", [" 391 ok"])
    out = run([sys.executable, "examples/relay_question.py", "What is 17*23?"], env)
    assert out.returncode == 0, out.stderr
    assert "17*23 =[ 391]. \\boxed{391}" in out.stdout

    scripted.script("student", "12*34?", ["12*34 = <call>3</call>", "."])
    scripted.script("teacher", "12*34?", [" 408"])
    scripted.script("student", "408 + 19", ["427."])
    db = tmp_path / "conv.sqlite"
    out = run([sys.executable, "examples/conversation_budget.py", str(db)], env)
    assert out.returncode == 0, out.stderr
    assert "12*34 = 408." in out.stdout and "teacher tokens spent so far: 3" in out.stdout
    assert db.exists()


def test_ask_without_configuration_says_how_to_configure() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    out = run([CLI, "ask", "hi"], env)
    assert out.returncode == 2
    for way in (
        "RELAY_STUDENT_BASE_URL",
        "RELAY_TEACHER_MODEL",
        "RELAY_CONFIG",
        "--config",
        "relay-agents demo",
    ):
        assert way in out.stderr, out.stderr
    assert "Field required" not in out.stderr


def test_langgraph_json_graph_without_configuration_says_how_to_configure(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith(("RELAY_CONFIG", "RELAY_STUDENT_", "RELAY_TEACHER_"))]:
        monkeypatch.delenv(name)
    spec = json.loads((ROOT / "langgraph.json").read_text())
    path = spec["graphs"]["relay"].partition(":")[0]
    module_spec = importlib.util.spec_from_file_location("relay_graph_unconfigured", ROOT / path)
    assert module_spec is not None and module_spec.loader is not None
    with pytest.raises(NotConfigured) as info:
        module_spec.loader.exec_module(importlib.util.module_from_spec(module_spec))
    assert "RELAY_STUDENT_BASE_URL" in str(info.value) and "relay-agents demo" in str(info.value)
