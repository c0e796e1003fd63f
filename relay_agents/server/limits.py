"""A limit on failed authentications per client address, so API keys cannot be guessed fast.

Without it one client made about 4,500 failed attempts in 3 s. Rate-limiting libraries
(slowapi, limits, pyrate-limiter) count requests; here only failures count, and a client that
spent its failures is refused before its key is compared, even a right one (else a guess that
hits would still go through). The state is one token bucket per address, at most
``max_clients`` of them (the least recently seen goes first): about 200 bytes each, under 1 MB
at the default 4096.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict


class FailureLimiter:
    """Per-address token buckets: ``burst`` failures at once, earned back at ``per_s``."""

    def __init__(self, *, burst: int, per_s: float, max_clients: int) -> None:
        self.burst = burst
        self.per_s = per_s
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.per_s)

    def retry_after(self, address: str) -> int:
        """Whole seconds until ``address`` may try again; 0 when it may now."""
        if address not in self._buckets:
            return 0
        missing = 1.0 - self._tokens(address, time.monotonic())
        return max(0, math.ceil(missing / self.per_s))

    def failed(self, address: str) -> None:
        """Spend one of ``address``'s failures."""
        now = time.monotonic()
        tokens = self._tokens(address, now) - 1.0
        self._buckets[address] = (tokens, now)
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
