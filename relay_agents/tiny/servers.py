"""The tiny world's vLLM servers: the student and teacher side by side, and the solo student."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import Progress

from relay_agents.progress import wait_bars
from relay_agents.serving import VLLMServer, default_log_dir
from relay_agents.serving.process import install_stop_handlers

if TYPE_CHECKING:
    from relay_agents.core.config import RelayConfig
    from relay_agents.tiny.build import TinyPair

#: Tiny-world answers are ~40 tokens; the servers' context is 512 tokens.
TINY_MAX_ANSWER_TOKENS = 256


class TinyPairServers:
    """The tiny student and teacher served side by side (student on core 0, teacher on 1)."""

    def __init__(self, student: VLLMServer, teacher: VLLMServer, pair: TinyPair) -> None:
        self.student = student
        self.teacher = teacher
        self.pair = pair

    def start(self) -> TinyPairServers:
        # start both at once: each takes ~20 s, mostly idle waiting on imports
        errors: list[BaseException] = []

        def run(server: VLLMServer, bars: Progress) -> None:
            try:
                server.start(bars)
            except BaseException as e:
                errors.append(e)

        with wait_bars() as bars:  # one display for both start-ups
            threads = [threading.Thread(target=run, args=(s, bars)) for s in (self.student, self.teacher)]
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
        install_stop_handlers()  # here, on the event loop's (usually the main) thread
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
    pair: TinyPair | None = None,
    names: tuple[str, str] = ("tiny-student", "tiny-teacher"),
) -> TinyPairServers:
    """Build/load the tiny pair (or take ``pair``, a variant's) and return (unstarted) servers
    named ``names``: default ``tiny-student``, ``tiny-teacher``."""
    from relay_agents.tiny.build import build_tiny_pair

    if pair is None:
        pair = build_tiny_pair(cache_dir)
    logs = Path(log_dir) if log_dir is not None else default_log_dir()
    common = {"max_model_len": max_model_len, "extra_args": extra_args, "log_dir": logs}
    student = VLLMServer(pair.student_dir, served_model_name=names[0], cpu_cores=student_cores, **common)
    teacher = VLLMServer(pair.teacher_dir, served_model_name=names[1], cpu_cores=teacher_cores, **common)
    return TinyPairServers(student, teacher, pair)


def start_tiny_pair(**kwargs: Any) -> TinyPairServers:
    """Build/load the tiny pair and start both servers; stop them with ``.stop()`` or ``with``."""
    return tiny_pair_servers(**kwargs).start()


def solo_server(servers: TinyPairServers, **kwargs: Any) -> VLLMServer:
    """An (unstarted) vLLM server ``tiny-solo`` for the solo student of ``servers.pair``,
    on core 0 (next to the student) with the pair's log directory."""
    pair = servers.pair
    if pair.solo_dir is None:
        raise ValueError("this build has no solo student")
    settings: dict[str, Any] = {
        "served_model_name": "tiny-solo",
        "cpu_cores": "0",
        "max_model_len": servers.student.max_model_len,
        "log_dir": servers.student.log_dir,
    }
    settings.update(kwargs)
    return VLLMServer(pair.solo_dir, **settings)
