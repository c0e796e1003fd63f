"""The loopback server process that the vLLM launcher and the scripted server share: a start
that fails says why with the log's end, and a stop leaves nothing of the process group."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from relay_agents.serving.process import LoopbackProcess, ServerStartError, free_port, http_get

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc and process groups")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("log_file", [False, True], ids=["temporary-log", "log-file"])
def test_a_process_that_exits_while_starting_names_its_code_and_output(
    tmp_path: Path, log_file: bool
) -> None:
    command = [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"]
    process = LoopbackProcess(command, log_path=tmp_path / "server.log" if log_file else None)
    with pytest.raises(ServerStartError, match="exited with code 3 during start") as info:
        process.start(lambda: False, timeout=30, interval=0.05)
    assert "no model here" in info.value.log_tail
    assert info.value.log_tail.startswith(f"$ {sys.executable} -c")  # the command heads the log
    assert process.popen is None and not process.running


def test_a_server_not_ready_by_the_deadline_is_stopped_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    process = LoopbackProcess(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"])
    with pytest.raises(ServerStartError, match="was not ready after 1s"):
        process.start(lambda: False, timeout=1, interval=0.05)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "the server's child outlived its stop"
        time.sleep(0.05)


def test_a_ready_server_answers_on_its_free_port(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(tmp_path)]
    process = LoopbackProcess(command, log_path=tmp_path / "server.log")
    waits: list[float] = []
    seconds = process.start(
        lambda: http_get(f"http://127.0.0.1:{port}/")[0] == 200,
        timeout=30,
        interval=0.05,
        on_wait=waits.append,
    )
    try:
        assert seconds > 0 and process.running
        # the progress display hears of every poll, with the seconds waited so far
        assert waits and waits == sorted(waits) and waits[-1] <= seconds
        assert http_get(f"http://127.0.0.1:{port}/")[0] == 200
    finally:
        process.stop(timeout=5)
    assert not process.running and http_get(f"http://127.0.0.1:{port}/", timeout=1)[0] == 0
    assert (tmp_path / "server.log").read_text().startswith("$ ")  # the kept log
