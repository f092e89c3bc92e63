"""Per-key rate-limit windows (allo-api.md §4): fixed whole Unix seconds, or a sliding second.

The docs say "per second" but not which kind of window, so the sandbox has both (the persona
switch ``window``). Reads and writes have separate budgets. A refused request does not use the
budget. Both report ``X-RateLimit-Reset`` as integer Unix seconds, rounded up, so a client that
waits until Reset never arrives early.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

_WINDOW = 1.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one admission check and the values for the X-RateLimit-* headers."""

    allowed: bool
    limit: int
    remaining: int
    reset: int
    retry_after: int


class Limiter(Protocol):
    """What the app needs from a rate limiter."""

    def admit(self, key: str, bucket: str, limit: int) -> Verdict:
        """Count one request for ``key`` in ``bucket`` if the window has room."""
        ...


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


class SlidingWindowLimiter:
    """Admits a request if fewer than ``limit`` were admitted in the last 1.0 s.

    Unlike fixed windows, this never lets 2 × limit through across a window edge, so a client
    that bursts at the start of each second sees 429s here that the fixed window hides.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._admitted: dict[tuple[str, str], deque[float]] = {}

    def admit(self, key: str, bucket: str, limit: int) -> Verdict:
        """Count one request for ``key`` in ``bucket`` if the last second has room."""
        now = self._clock()
        times = self._admitted.setdefault((key, bucket), deque())
        while times and times[0] <= now - _WINDOW:
            times.popleft()
        allowed = len(times) < limit
        if allowed:
            times.append(now)
        # The oldest counted request frees the next slot when it leaves the window.
        frees_at = times[0] + _WINDOW if times else now
        return Verdict(
            allowed=allowed,
            limit=limit,
            remaining=max(limit - len(times), 0),
            reset=math.ceil(frees_at),
            retry_after=max(math.ceil(frees_at - now), 1),
        )


def make_limiter(
    window: Literal["fixed", "sliding"], clock: Callable[[], float] = time.time
) -> Limiter:
    """The limiter for a persona's ``window`` switch."""
    return SlidingWindowLimiter(clock) if window == "sliding" else FixedWindowLimiter(clock)
