"""The built wheel works on its own: ``pip install "relay-agents[server]"`` into a fresh virtual
environment (no checkout on its path), then ``relay-agents serve`` answers an OpenAI client.

Marked ``wheel``: it installs the server extra's dependencies from the package index (a minute
or two with pip's cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import openai
import pytest

from relay_agents.testing import ScriptedServer
from tests.test_entry_points import relay_env
from tests.test_server import ANSWER, script
from tests.test_server_cli import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.wheel


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its server extra installed; returns its bin directory."""
    where = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(where / "dist")])
    (wheel,) = (where / "dist").glob("relay_agents-*.whl")
    venv.create(where / "venv", with_pip=True)
    bin_dir = where / "venv" / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", f"{wheel}[server]"], cwd=where)
    return bin_dir


def test_the_wheel_carries_its_package_data(wheel_env: Path) -> None:
    code = (
        "import importlib.resources as r, relay_agents\n"
        "assert relay_agents.__file__.find('site-packages') > 0, relay_agents.__file__\n"
        "assert r.files('relay_agents.tutor').joinpath('static', 'tutor.js').is_file()\n"
        "import relay_agents.testing, relay_agents.server\n"
    )
    _run([str(wheel_env / "python"), "-c", code], cwd=wheel_env)
    assert "serve" in _run([str(wheel_env / "relay-agents"), "--help"], cwd=wheel_env).stdout


def test_the_installed_server_answers_an_openai_client(
    wheel_env: Path, scripted: ScriptedServer, tmp_path: Path
) -> None:
    script(scripted, "Q-wheel")
    port = free_port()
    env = relay_env(scripted, tmp_path, RELAY_BUDGET_STORE=f"sqlite:///{tmp_path / 'b.sqlite'}")
    env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.Popen(
        [str(wheel_env / "relay-agents"), "serve", "--port", str(port), "--log-level", "warning"],
        env={**env, "PATH": f"{wheel_env}{os.pathsep}{env.get('PATH', '')}"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(
            model="relay", messages=[{"role": "user", "content": "Q-wheel"}], user="wheel-test"
        )
        assert reply.choices[0].message.content == ANSWER
        assert reply.usage is not None and reply.usage.model_extra["relay"]["teacher_calls"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
