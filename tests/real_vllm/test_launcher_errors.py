"""A vLLM server that cannot start says why: the install command, the log and its last lines."""

from __future__ import annotations

import json
import os

import pytest

from relay_agents.serving import VLLMServer, VLLMServerError

pytestmark = pytest.mark.real_vllm


def test_a_directory_without_a_model_is_refused_at_once(tmp_path) -> None:
    with pytest.raises(VLLMServerError, match="not a model directory"):
        VLLMServer(tmp_path).start()


def test_a_server_that_dies_while_starting_names_its_log(tmp_path) -> None:
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"], "model_type": "nope"}))
    server = VLLMServer(model, cpu_cores="1", log_dir=tmp_path / "logs", startup_timeout=180)
    with pytest.raises(VLLMServerError) as info:
        server.start()
    message = str(info.value)
    assert "pip install 'relay-agents[cpu]'" in message
    assert str(server.log_path) in message and "--- last lines ---" in message
    assert server.log_path is not None and server.log_path.is_file()
    # Nothing is left running.
    assert server.process is None or server.process.poll() is not None
    if server.process is not None:
        with pytest.raises(ProcessLookupError):
            os.killpg(server.process.pid, 0)  # signal 0: does the group exist?
