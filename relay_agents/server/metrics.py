"""Prometheus metrics of one server: requests, errors, tokens, calls and latencies.

Each app gets its own registry, so several apps (tests, one process serving two configs)
never share or collide on counters. Label sets are small and fixed: no per-user labels.
Under ``serve --workers N`` prometheus-client runs in multiprocess mode (its directory
variable is set before the workers start): every worker writes its values to files there,
and ``/metrics`` sums them over all workers. A worker killed without closing (``kill -9``, the
OOM killer) leaves its in-flight gauge behind; ``/metrics`` drops the gauges of processes that
no longer exist before it sums (uvicorn's supervisor reaps a dead worker as it replaces it).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from relay_agents.api import RelayResult

ENDPOINTS = ("chat.completions", "completions")
#: prometheus-client's switch to multiprocess mode, read when a process first imports it.
METRICS_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"
#: Relayed answers take from milliseconds (a cached student reply) to minutes (long answers).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The server's counters; ``render()`` is the ``/metrics`` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(METRICS_DIR_VAR))
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "relay_requests", "Generation requests received.", ["endpoint", "stream"], registry=r
        )
        self.errors = Counter(
            "relay_errors", "Requests answered with an error status.", ["endpoint", "status"], registry=r
        )
        self.cancelled = Counter(
            "relay_cancelled_requests",
            "Requests whose client went away before the answer ended.",
            ["endpoint"],
            registry=r,
        )
        self.student_tokens = Counter(
            "relay_student_tokens", "Answer tokens written by the student.", registry=r
        )
        self.teacher_tokens = Counter(
            "relay_teacher_tokens", "Answer tokens written by the teacher.", registry=r
        )
        self.prompt_tokens = Counter("relay_prompt_tokens", "Prompt tokens sent upstream.", registry=r)
        self.teacher_calls = Counter("relay_teacher_calls", "Teacher calls made.", registry=r)
        self.declined_calls = Counter(
            "relay_declined_calls", "Teacher calls declined because the budget was spent.", registry=r
        )
        self.cost = Counter("relay_cost_usd", "Upstream cost in USD (student and teacher).", registry=r)
        self.latency = Histogram(
            "relay_request_duration_seconds",
            "Time from request to the last byte of the answer.",
            ["endpoint", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "relay_time_to_first_token_seconds",
            "Streams: time from request to the first answer text.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "relay_requests_in_flight",
            "Generation requests being answered.",
            registry=r,
            multiprocess_mode="livesum",  # summed over the workers alive
        )
        for endpoint in ENDPOINTS:  # every series exists from the start (rate() needs a zero)
            for stream in ("true", "false"):
                self.requests.labels(endpoint, stream)
                self.latency.labels(endpoint, stream)
            self.first_token.labels(endpoint)
            self.cancelled.labels(endpoint)

    def answered(self, result: RelayResult) -> None:
        u = result.usage
        self.student_tokens.inc(u.student_tokens)
        self.teacher_tokens.inc(u.teacher_tokens)
        self.prompt_tokens.inc(u.student_prompt_tokens + u.teacher_prompt_tokens)
        self.teacher_calls.inc(u.teacher_calls)
        self.cost.inc(u.cost_usd)
        declined = sum(1 for e in result.events if e.kind == "declined_call")
        if declined:
            self.declined_calls.inc(declined)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        forget_dead_workers(os.environ[METRICS_DIR_VAR])
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """A worker that stops takes its requests in flight out of the sum."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


def forget_dead_workers(directory: str) -> None:
    """Take the live gauges (``livesum``, ...) of processes that are gone out of ``directory``."""
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
