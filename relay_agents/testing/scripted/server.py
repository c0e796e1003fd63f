"""The scripted server's handle in the test process: starts it in a subprocess on loopback and
drives its admin endpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from relay_agents.serving.process import LOOPBACK, LoopbackProcess, ServerStartError, free_port, http_get

_PROJECT_ROOT = Path(__file__).resolve().parents[3]
#: A free port can be taken between the probe and the server's bind: try this many.
_PORT_ATTEMPTS = 3


class ScriptedServer:
    """Starts the scripted server in a subprocess and drives its admin endpoints.

    Usable as a context manager or through :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self, host: str = LOOPBACK, port: int | None = None, *, startup_timeout: float = 30.0
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self._process: LoopbackProcess | None = None

    @property
    def url(self) -> str:
        """Root URL (``/health``, ``/tokenize``, ``/_scripted/...`` live here)."""
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The server's process, ``None`` when stopped."""
        return None if self._process is None else self._process.popen

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> ScriptedServer:
        if self.running:
            return self
        fixed_port = self.port
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        failure = ""
        for _attempt in range(1 if fixed_port is not None else _PORT_ATTEMPTS):
            self.port = fixed_port or free_port(self.host)
            command = [sys.executable, "-m", "relay_agents.testing.scripted", "--host", self.host]
            process = LoopbackProcess([*command, "--port", str(self.port)], env=env)
            try:
                process.start(self._healthy, timeout=self.startup_timeout, interval=0.05)
            except ServerStartError as exc:
                failure = f"{exc.why}:\n{exc.log_tail}"
                continue
            self._process = process
            return self
        raise RuntimeError(f"scripted server did not start on {self.url}: {failure}")

    def _healthy(self) -> bool:
        return http_get(f"{self.url}/health", timeout=1)[0] == 200

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop(timeout=5)

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- admin API ------------------------------------------------------------------------

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{method} {path} failed: {exc.read().decode()}") from None

    def script(
        self, model: str, match: str, responses: list[str | dict[str, Any]], *, repeat: bool = False
    ) -> None:
        """Requests for ``model`` whose prompt contains ``match`` get ``responses`` in order
        (over and over with ``repeat``). The latest script that matches a prompt answers it.

        A response is a string, ``{"text": ...}`` (with ``"probs"``: the probability of each of
        its tokens, reported as log-probabilities when a request asks for them; missing or
        ``None``: 1) or ``{"fault": ...}``."""
        body = {"model": model, "match": match, "responses": responses, "repeat": repeat}
        self._call("POST", "/_scripted/script", body)

    def faults(self, model: str, faults: list[str]) -> None:
        """Queue faults for ``model``'s next requests, one each: an HTTP status ("429",
        "503:retry-after=2", "429:retry-after-ms=200"), "hang", "drop", "drip:S", "comments:S",
        "overrun", "malformed", "bad-usage", "negative-usage", "null-choices", "html", "surrogate"
        (:mod:`relay_agents.testing.scripted.faults` says what each does)."""
        self._call("POST", "/_scripted/faults", {"model": model, "faults": list(faults)})

    def configure(self, **config: Any) -> dict[str, Any]:
        """Set ``latency_s``, ``ttft_s``, ``token_interval_s``, ``default_response``,
        ``max_model_len``, ``strict_models``, ``usage_counts_eos`` (usage counts a reply's EOS
        token, as vLLM's does); returns the full config."""
        return self._call("POST", "/_scripted/configure", config)["config"]

    def context_window(self, model: str, max_model_len: int) -> None:
        """Give ``model`` a context of ``max_model_len`` tokens (listed in /v1/models, enforced as
        vLLM 0.32 does: a max_tokens above it or a prompt that leaves no room is a 400, a
        max_tokens above the room is cut to it)."""
        self._call("POST", "/_scripted/context_window", {"model": model, "max_model_len": max_model_len})

    def requests(self) -> list[dict[str, Any]]:
        """Generation requests so far, in order: ``{"path", "model", "body", "prompt", "disconnected"}``
        (``disconnected``: the client was seen leaving a hanging request or an unfinished stream)."""
        return self._call("GET", "/_scripted/requests")["requests"]

    def reset(self) -> None:
        """Clear scripts, faults, recorded requests and config (token ids are kept)."""
        self._call("POST", "/_scripted/reset", {})
