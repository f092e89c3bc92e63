"""Pacing writes to the key's limit with zero 429s (DESIGN §5; performance.md rules 10–14).

:class:`Pacer` is a GCRA with a burst of one: permits are evenly spaced ``1/rate`` apart, starting
with the first (no initial burst). One lock, so only the head waiter sleeps; a 2 ms tolerance
lets a late timer be caught up instead of lost. It can be paused (``Retry-After``, a spent
window) and slowed on a 429, then recovers 2 % of the ceiling per clean second.

:class:`WindowWatch` reads ``X-RateLimit-*`` answers. It learns the server's clock offset from
``Date`` and ``X-RateLimit-Reset`` without trusting the local clock, and tells the pacer to
wait out a window that *another* client of the same key has spent.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable

import anyio

_TOLERANCE = 0.002
_SLOWDOWN = 0.8
_RECOVERY = 0.02
_FLOOR_FRACTION = 0.05


class Pacer:
    """Evenly spaced permits at ``rate`` per second, shared by every worker of one key."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        tolerance: float = _TOLERANCE,
    ) -> None:
        if rate <= 0:
            msg = f"rate must be positive, not {rate}"
            raise ValueError(msg)
        self.ceiling = rate
        self.rate = rate
        self._clock = clock
        self._tolerance = tolerance
        self._tat: float | None = None
        self._paused_until = 0.0
        self._last_adjust = clock()
        self._lock = anyio.Lock()

    async def acquire(self) -> None:
        """Wait for the next permit."""
        async with self._lock:
            while True:
                now = self._clock()
                self._recover(now)
                start = max(self._tat if self._tat is not None else now, self._paused_until)
                wait = start - now
                if wait <= self._tolerance:
                    break
                await anyio.sleep(wait)
            self._tat = max(start, now - self._tolerance) + 1.0 / self.rate

    def pause_until(self, when: float) -> None:
        """Issue no permit before ``when`` (on this pacer's clock)."""
        self._paused_until = max(self._paused_until, when)

    def pause_for(self, seconds: float) -> None:
        """Issue no permit for ``seconds`` from now."""
        self.pause_until(self._clock() + seconds)

    def slow_down(self) -> None:
        """A 429 was seen: cut the rate (never below 5 % of the ceiling)."""
        self.rate = max(self.rate * _SLOWDOWN, self.ceiling * _FLOOR_FRACTION)
        self._last_adjust = self._clock()

    def lower_ceiling(self, rate: float) -> None:
        """The server says the limit is lower than assumed."""
        if 0 < rate < self.ceiling:
            self.ceiling = rate
            self.rate = min(self.rate, rate)

    def _recover(self, now: float) -> None:
        if self.rate < self.ceiling and now - self._last_adjust >= 1.0:
            steps = int(now - self._last_adjust)
            self.rate = min(self.ceiling, self.rate + steps * _RECOVERY * self.ceiling)
            self._last_adjust += steps


class WindowWatch:
    """Learns the server's windows from answers and pauses the pacer when others spent one."""

    def __init__(
        self,
        pacer: Pacer,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = lambda: random.uniform(0.0, 0.05),
    ) -> None:
        self._pacer = pacer
        self._wall = wall
        self._monotonic = monotonic
        self._jitter = jitter
        # Bounds on (server clock − local wall clock), narrowed by every answer.
        self._lo = float("-inf")
        self._hi = float("inf")
        self._ours: OrderedDict[int, int] = OrderedDict()
        self.foreign_pauses = 0

    def observe(
        self,
        *,
        sent_wall: float,
        received_wall: float,
        limit: int | None,
        remaining: int | None,
        reset: int | None,
        date: float | None,
    ) -> None:
        """Take in one answer's rate-limit headers and its send/receive times."""
        self._learn_offset(sent_wall, received_wall, reset, date)
        if reset is None or remaining is None:
            return
        ours = self._ours.get(reset, 0) + 1
        self._ours[reset] = ours
        while len(self._ours) > 8:
            self._ours.popitem(last=False)
        if limit is not None:
            self._pacer.lower_ceiling(float(limit))
        # A window spent with fewer of our own requests than the limit: someone else shares
        # the key. Wait until the server's clock has surely passed the reset.
        if remaining == 0 and limit is not None and ours < limit and self._lo > float("-inf"):
            wait = reset - self._lo - self._wall() + self._jitter()
            if wait > 0:
                self.foreign_pauses += 1
                self._pacer.pause_until(self._monotonic() + wait)

    def _learn_offset(
        self, sent: float, received: float, reset: int | None, date: float | None
    ) -> None:
        lo, hi = self._lo, self._hi
        if date is not None:  # server time at answer ∈ [date, date + 1)
            lo = max(lo, date - received)
            hi = min(hi, date + 1 - sent)
        if reset is not None:  # the answer came before the window's reset
            hi = min(hi, reset - sent)
        if lo > hi:  # the server clock jumped: start again from this answer
            lo = date - received if date is not None else float("-inf")
            hi = float("inf")
        self._lo, self._hi = lo, hi


async def wait_retry_after(pacer: Pacer, seconds: float) -> None:
    """Pause every worker for a server-given delay (plus a little spread), and slow down."""
    pacer.pause_for(seconds + random.uniform(0.0, 0.1))
    pacer.slow_down()
    await anyio.lowlevel.checkpoint()
