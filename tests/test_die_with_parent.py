"""A vLLM server must not outlive a killed parent: the kernel stops it (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay_agents.serving import die_with_parent
from relay_agents.serving.process import dying_with_this_process

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
GUARD = Path(die_with_parent.__file__)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _child_of_a_killed_parent(tmp_path: Path, guarded: bool) -> int:
    """Start a parent that starts ``sleep 60`` (guarded or not), SIGKILL the parent; the child's pid."""
    pid_file = tmp_path / "child.pid"
    command = "['sleep', '60']"
    if guarded:
        # as dying_with_this_process runs it: the file, without importing the package
        command = f"['{sys.executable}', {str(GUARD)!r}, str(os.getpid()), 'sleep', '60']"
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen({command}, start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the parent did not start its child"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    time.sleep(0.3)  # the guard execs into the command
    assert _alive(child)
    parent.kill()
    parent.wait()
    return child


def test_a_guarded_command_dies_with_its_killed_parent(tmp_path: Path) -> None:
    child = _child_of_a_killed_parent(tmp_path, guarded=True)
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its killed parent"
        time.sleep(0.05)


def test_without_the_guard_the_command_is_orphaned(tmp_path: Path) -> None:
    child = _child_of_a_killed_parent(tmp_path, guarded=False)
    try:
        time.sleep(0.5)
        assert _alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_only_the_main_thread_arms_the_guard() -> None:
    assert dying_with_this_process(["vllm"]) == [sys.executable, str(GUARD), str(os.getpid()), "vllm"]
    seen: list[list[str]] = []
    thread = threading.Thread(target=lambda: seen.append(dying_with_this_process(["vllm"])))
    thread.start()
    thread.join()
    assert seen == [["vllm"]]  # a worker thread's exit would fire the signal early
