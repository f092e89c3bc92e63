"""Fixed one-second rate-limit windows per API key, aligned to Unix seconds (allo-api.md §4).

Reads and writes have separate budgets. A refused request does not use the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one admission check and the values for the X-RateLimit-* headers."""

    allowed: bool
    limit: int
    remaining: int
    reset: int
    retry_after: int


class FixedWindowLimiter:
    """Counts requests per (key, bucket) in the current whole Unix second."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[tuple[str, str], tuple[int, int]] = {}

    def admit(self, key: str, bucket: str, limit: int) -> Verdict:
        """Count one request for ``key`` in ``bucket`` if the window has room."""
        now = self._clock()
        window = math.floor(now)
        start, used = self._windows.get((key, bucket), (window, 0))
        if start != window:
            used = 0
        allowed = used < limit
        if allowed:
            used += 1
        self._windows[(key, bucket)] = (window, used)
        reset = window + 1
        return Verdict(
            allowed=allowed,
            limit=limit,
            remaining=max(limit - used, 0),
            reset=reset,
            retry_after=max(math.ceil(reset - now), 1),
        )
