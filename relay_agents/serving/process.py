"""A server subprocess on loopback: a free port, a start that dies with this process, a wait
for readiness with a deadline, a stop of its whole process group, and its log.

Both the vLLM launcher and the scripted test server start their servers through
:class:`LoopbackProcess`. The process runs in its own process group (so that a server's
children, e.g. vLLM's engine core, stop with it) and is stopped on ``stop()``, at interpreter
exit and on SIGTERM/SIGINT; if this process is killed outright, the kernel stops it
(:mod:`relay_agents.serving.die_with_parent`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

LOOPBACK = "127.0.0.1"

#: Run as a file: see :func:`dying_with_this_process`.
_DIE_WITH_PARENT = Path(__file__).with_name("die_with_parent.py")
_LIVE: weakref.WeakSet[LoopbackProcess] = weakref.WeakSet()
_HANDLERS_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False
_PREVIOUS: dict[int, Any] = {}


def free_port(host: str = LOOPBACK) -> int:
    """A port the kernel reports free on ``host`` (another process may still take it before
    the server binds it: callers that pick no port themselves may retry on a new one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """``(status, body)`` of a GET; status 0 when nothing answers (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def dying_with_this_process(command: Sequence[str]) -> list[str]:
    """``command`` run so that the kernel stops it if this process is killed.

    Only from the main thread: the kernel signals when the *thread* that started the child
    exits, and only the main thread lives as long as the process. The guard is run as a file,
    not with ``-m``, so that it does not import the relay_agents package (1.6 s) before it execs.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return list(command)
    return [sys.executable, str(_DIE_WITH_PARENT), str(os.getpid()), *command]


def _stop_all_live() -> None:
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.stop()


def _on_signal(signum: int, frame: Any) -> None:
    _stop_all_live()
    previous = _PREVIOUS.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install_stop_handlers() -> None:
    """Stop every live server at interpreter exit and on SIGTERM/SIGINT (then do what the
    previous handler did). Signal handlers can only be set from the main thread: code that
    starts servers from a worker thread calls this first, on the main thread."""
    global _HANDLERS_INSTALLED
    with _HANDLERS_LOCK:
        if _HANDLERS_INSTALLED:
            return
        _HANDLERS_INSTALLED = True
        atexit.register(_stop_all_live)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                _PREVIOUS[sig] = signal.getsignal(sig)
                signal.signal(sig, _on_signal)


class ServerStartError(RuntimeError):
    """The server exited or was not ready by the deadline; ``log_tail`` is its log's end."""

    def __init__(self, why: str, log_tail: str) -> None:
        super().__init__(why)
        self.why = why
        self.log_tail = log_tail


class LoopbackProcess:
    """One server subprocess, its output (stdout and stderr) in a log.

    ``log_path``: a log file that is kept (appended to); ``None``: a temporary file, deleted
    on ``stop()``. The log starts with the command line.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.command = list(command)
        self.env = dict(os.environ if env is None else env)
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(
        self,
        ready: Callable[[], bool],
        *,
        timeout: float,
        interval: float,
        on_wait: Callable[[float], None] | None = None,
    ) -> float:
        """Start the process and poll ``ready()`` every ``interval`` seconds until it is true;
        the seconds that took. ``on_wait`` gets the seconds waited so far before each poll (a
        progress display). Raises :class:`ServerStartError` (after stopping the process) if it
        exits first or ``timeout`` passes."""
        if self.popen is not None:
            raise RuntimeError("this process was already started")
        if self.log_path is not None:
            self._log = self.log_path.open("a+b")  # readable too: log_tail reads it back
        else:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self._log.write(f"$ {' '.join(self.command)}\n".encode())
        self._log.flush()
        install_stop_handlers()
        t0 = time.monotonic()
        popen = self.popen = subprocess.Popen(
            dying_with_this_process(self.command),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE.add(self)
        try:
            while True:
                code = popen.poll()
                if code is not None:
                    raise ServerStartError(f"exited with code {code} during start", self.log_tail())
                waited = time.monotonic() - t0
                if waited > timeout:
                    raise ServerStartError(f"was not ready after {timeout:g}s", self.log_tail())
                if on_wait is not None:
                    on_wait(waited)
                if ready():
                    break
                time.sleep(interval)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - t0

    def log_tail(self, lines: int = 30) -> str:
        """The log's last ``lines`` lines (read without moving the writer's file offset)."""
        if self._log is None:
            return "(no log)"
        fd = self._log.fileno()
        size = os.fstat(fd).st_size
        chunk = os.pread(fd, min(size, 64 * 1024), max(0, size - 64 * 1024))
        return "\n".join(chunk.decode(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the process group: SIGTERM, ``timeout`` seconds, then SIGKILL for whatever is
        left (children may outlive the leader)."""
        popen, self.popen = self.popen, None
        _LIVE.discard(self)
        try:
            if popen is not None:
                pgid = popen.pid  # start_new_session: the group id is the leader's pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=timeout)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=5)
        finally:
            if self._log is not None:
                with contextlib.suppress(OSError):
                    self._log.close()
                self._log = None
