"""Pacing writes to the key's limit: every slot used, no 429 (DESIGN §5; performance.md 10–14).

The API tells a per-key limit (``X-RateLimit-Limit``), what is left of the current window
(``Remaining``) and when it resets (``Reset``, Unix seconds). It does not tell whether its windows
are fixed whole seconds or a sliding second (allo-api.md §4), and the two need different pacing:

- a **sliding** second admits ``L`` arrivals in any 1 s interval. Sends spaced at exactly ``1/L``
  break it whenever one arrival comes a little early, so the only safe pace is ``L / (1 + J)``
  for an arrival jitter ``J`` (rule 11): :func:`_even_slot`, a GCRA with a burst of one.
- a **fixed** window admits ``L`` arrivals between two whole seconds of the server's clock, however
  they are spaced. Sending the window's ``L`` inside it, away from both edges by the uncertainty
  about where the edges are, uses every slot whatever the jitter: :func:`_window_slot`.

So the pacer starts evenly spaced, which is safe for both, and allots per window only once the
answers have *proved* the windows fixed: an answer left more of the budget than a sliding second
could have, given the requests of ours that surely arrived in the second before it
(:meth:`WindowWatch._proves_fixed`). Two 429s on allotted slots within 10 s, or an allotted
request counted in another window than planned, withdraw the proof. Windows of another size than
the documented second (every step between two Resets is a multiple of the size) are only ever
paced evenly.

Evenly spaced permits also never make more than the limit in any ``1 + J`` seconds, counting
every permit of the key's last 1024 (:func:`_sliding_bound`): when the windows stop being known
fixed just after a window's allotted burst, the even pace waits for the burst to pass instead of
adding to it, and permits still asleep in an allotted slot are given up.

**Where the edges are.** ``Reset`` bounds the server clock from above (a request arrives before
its window resets); ``Date`` and, once windows are known fixed, ``Reset − 1`` bound it from below.
``Date`` gives no upper bound: servers cache it (uvicorn refreshes it once a second). A request
granted at local time ``t`` arrives at server time within ``[t + lo, t + hi + D]``, where ``D``
bounds the time from grant to arrival by the longest recent grant-to-answer time. Window ``r``
(the ``Reset`` of its answers) surely receives a request granted in ``[r − 1 − lo, r − hi − D)``,
its *zone*; the allotment spaces the window's allowance evenly over the zone, and a late timer
catches up inside the zone but never crosses its end.

**How much of a window is ours.** The limit (or the configured rate, if lower), less what other
clients of the key used lately, read from ``Remaining``; within a window, the answers' Remaining
caps what is left, and when another client is active each claims only its share of that, so two
clients that both see the last slot do not both take it. Evenly spaced permits likewise leave
others the rate they were seen to use, and an answer with ``Remaining 0`` that our own requests
cannot explain pauses the key until the window resets. This is how processes that cannot share
state (on other machines) meet: a 429 or two while they do.

Everything a key's budget knows is one :class:`BudgetState`, changed only inside a store's
transaction: in memory here, or in a file that every process on the machine using the key shares
(:mod:`allo_batch.budget`). What a process learns only from its own requests (which of them surely
arrived when, its grant-to-answer times) stays in its :class:`WindowWatch`.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

import anyio

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]

_TOLERANCE = 0.002  # a late timer is caught up, not lost (rule 10)
_SLOWDOWN = 0.8
_RECOVERY = 0.02
_FLOOR_FRACTION = 0.05
_BUCKET = 0.01  # grant histogram: 10 ms buckets ...
HISTOGRAM_BUCKETS = 300  # ... over the last 3 s
KEPT_WINDOWS = 4
_WIDEST_RANGE = 8  # a request that may land in more windows than this is not counted in any
_MIN_ZONE = 0.25  # a zone narrower than this (of a 1 s window) is not worth allotting
_DEFAULT_DELAY = 0.1  # D before any answer came back
_MAX_DELAY = 0.5
_MAX_SPREAD = 0.2
_DELAY_SAMPLES = 256
_MODEL_TTL = 60.0  # what was learned about the windows is forgotten after this long unused
# Every transaction reads the wall clock once it holds the state, so times only go back when
# the clock is set (or slewed); a step back of up to this much is not worth forgetting what was
# learned, and a larger one means it no longer holds.
_CLOCK_SLACK = 1.0
RECENT_GRANTS = 1024  # permit times kept for the sliding guard on even spacing (exact to 1024/s)
_VIOLATION_SPAN = 10.0
_FADE = 0.8
_MAX_TRIES = 1000
_REPLAN = 0.05  # an allotted permit further off than this is planned again after this long


class Histogram:
    """How many permits were granted in each 10 ms of the last 3 s (local wall clock).

    It tells how many of our requests can have arrived in a given interval, without keeping one
    timestamp per request, and it is small enough to share in a file (an ``array`` of 32-bit
    counts: whole-array copies and slice sums stay in C, a few microseconds a request).
    """

    __slots__ = ("counts", "head")

    def __init__(self, head: int = 0, counts: array[int] | None = None) -> None:
        self.head = head  # index of the newest bucket
        self.counts = counts if counts is not None else _zeros()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (self.head, self.counts) == (other.head, other.counts)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def add(self, when: float) -> None:
        """Count one permit at ``when``."""
        index = math.floor(when / _BUCKET)
        if index - self.head >= HISTOGRAM_BUCKETS or index < self.head - 10 * HISTOGRAM_BUCKETS:
            self.counts = _zeros()  # idle for a while, or the wall clock was set
            self.head = index
        while self.head < index:
            self.head += 1
            self.counts[self.head % HISTOGRAM_BUCKETS] = 0
        if index > self.head - HISTOGRAM_BUCKETS:
            self.counts[index % HISTOGRAM_BUCKETS] += 1

    def remove(self, when: float) -> None:
        """Take back a permit counted at ``when`` that was never used."""
        index = math.floor(when / _BUCKET)
        slot = index % HISTOGRAM_BUCKETS
        if self.head - HISTOGRAM_BUCKETS < index <= self.head and self.counts[slot] > 0:
            self.counts[slot] -= 1

    def total(self, start: float, end: float) -> int:
        """Permits granted in ``[start, end]``, rounded outwards to whole buckets."""
        first = max(math.floor(start / _BUCKET), self.head - HISTOGRAM_BUCKETS + 1)
        last = min(math.floor(end / _BUCKET), self.head)
        if last < first:
            return 0
        low, high = first % HISTOGRAM_BUCKETS, last % HISTOGRAM_BUCKETS
        if low <= high:
            return sum(self.counts[low : high + 1])
        return sum(self.counts[low:]) + sum(self.counts[: high + 1])


def _zeros() -> array[int]:
    return array("I", bytes(array("I").itemsize * HISTOGRAM_BUCKETS))


class RecentGrants:
    """The times of the last :data:`RECENT_GRANTS` permits, in order: exact where the histogram
    is bucketed, for the guard that keeps even spacing from adding to a burst (see
    :func:`_sliding_bound`). A sorted ``array`` of doubles: inserts and removals are one
    ``memmove``, lookups a bisection, and it goes into the shared file as it is."""

    __slots__ = ("times",)

    def __init__(self, times: array[float] | None = None) -> None:
        self.times = times if times is not None else array("d")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecentGrants):
            return NotImplemented
        return self.times == other.times

    __hash__ = None  # type: ignore[assignment]  # mutable

    def add(self, when: float) -> None:
        """Keep one permit at ``when`` (forgetting the oldest beyond the last 1024)."""
        bisect.insort(self.times, when)
        if len(self.times) > RECENT_GRANTS:
            del self.times[0]

    def remove(self, when: float) -> None:
        """Take back a permit kept at ``when`` that was never used (or never counted)."""
        index = bisect.bisect_left(self.times, when)
        if index < len(self.times) and self.times[index] == when:
            del self.times[index]

    def latest(self, n: int) -> float | None:
        """The time of the ``n``-th latest permit kept, or None if fewer are kept."""
        return self.times[-n] if 0 < n <= len(self.times) else None


@dataclass(slots=True)
class WindowCount:
    """One fixed window (named by its ``Reset``) as far as our requests go.

    ``used`` counts our permits that may land in it; an answer that shows one landed in another
    window takes it off. ``answered`` counts ours that were admitted in it and ``low`` is the
    least Remaining an answer from it showed, so ``answered + low`` is how many of ours the window
    can take in all: exact once every answer is in, and too low (never too high) while some are
    on their way, whatever order they arrive in.

    When another client uses the window too, each claims only its share of what is left, as
    both saw it used so far: two clients that saw the same last slot do not both take it.
    """

    used: int = 0
    answered: int = 0
    low: int | None = None
    foreign: int = 0  # requests of other clients seen in it (a lower bound, if complete)
    complete: bool = False  # every permit that may land in it was counted

    @property
    def room(self) -> int | None:
        """How many of our permits the window takes in all, once an answer told."""
        if self.low is None:
            return None
        if not self.foreign:
            return self.answered + self.low
        share = self.answered / (self.answered + self.foreign)
        return self.answered + math.floor(self.low * share + 1e-9)


@dataclass(slots=True)
class BudgetState:
    """Everything known about one key's budget; shared by every process using the key."""

    factor: float = 1.0  # share of the ceiling in use: cut on 429s, recovered per clean second
    adjusted: float = 0.0
    paused_until: float = 0.0
    tat: float = 0.0  # theoretical arrival time of the next evenly spaced permit
    # What the answers taught about the windows (forgotten after _MODEL_TTL unused).
    fixed: bool = False
    violated_at: float = 0.0
    limit: int = 0
    size: int = 1
    lo_date: float = -math.inf  # bounds on (server clock − local wall clock)
    lo_reset: float = -math.inf  # valid only for fixed windows
    hi: float = math.inf
    delay: float = _DEFAULT_DELAY
    counted_since: float = 0.0  # every permit granted since is counted in its windows
    others_rate: float = 0.0  # others' requests in a second, seen while evenly spaced ...
    others_at: float = 0.0  # ... at this time (the figure fades by a fifth a second)
    spread: float = 0.0  # range of grant-to-answer times: the arrival jitter J at most
    seen: float = 0.0
    windows: dict[int, WindowCount] = field(default_factory=dict)
    histogram: Histogram = field(default_factory=Histogram)
    recent: RecentGrants = field(default_factory=RecentGrants)

    @property
    def lo(self) -> float:
        """The best lower bound on the server clock offset the windows' kind allows."""
        return max(self.lo_date, self.lo_reset) if self.fixed else self.lo_date

    def placed(self) -> bool:
        """Whether the server clock is bounded on both sides."""
        return math.isfinite(self.lo) and math.isfinite(self.hi)


class Store(Protocol):
    """Where a budget's state lives; ``update`` is one atomic transaction on it."""

    def update(self, change: Callable[[BudgetState], T]) -> T:
        """Apply ``change`` to the state, atomically, and return its result."""
        ...

    def close(self) -> None:
        """Let go of whatever the store holds open."""
        ...


class MemoryStore:
    """The state of a budget used by this process alone."""

    def __init__(self, state: BudgetState | None = None) -> None:
        self.state = state or BudgetState()

    def update(self, change: Callable[[BudgetState], T]) -> T:
        """Apply ``change`` to the state."""
        return change(self.state)

    def close(self) -> None:
        """Nothing to close."""


@dataclass(frozen=True, slots=True)
class Terms:
    """What one process brings to a shared budget: its own ceiling and margins."""

    ceiling: float
    jitter: float
    tolerance: float
    allot: bool  # whether this pacer may allot per window once windows are proved fixed


class Grant(NamedTuple):
    """A reserved permit: when it may go, and its place in the windows it may land in."""

    at: float
    windows: tuple[int, ...] = ()  # the windows it was counted in (those it may land in)
    fixed: bool = False  # allotted inside a fixed window's zone
    zone_end: float = math.inf


class Slot(NamedTuple):
    """The permit the current task last took (read back when its answer is observed)."""

    granted_at: float
    windows: tuple[int, ...]
    fixed: bool
    planned: float  # the time it was reserved for (and counted at in the histogram)


_SLOT: ContextVar[Slot | None] = ContextVar("allo_batch_slot", default=None)


# -- the transactions ---------------------------------------------------------------------------


def reserve(s: BudgetState, now: float, terms: Terms) -> Grant:
    """Reserve the next permit: in a fixed window's zone when allowed, else evenly spaced."""
    _recover(s, now)
    _sanitise(s, now, terms)
    grant = None
    if terms.allot and s.fixed and s.size == 1 and s.limit > 0 and s.placed():
        grant = _window_slot(s, max(now, s.paused_until), terms)
    if grant is None:
        grant = _even_slot(s, now, terms)
    s.histogram.add(grant.at)
    s.recent.add(grant.at)
    return grant


def still_good(s: BudgetState, grant: Grant, now: float, tolerance: float) -> bool:
    """After sleeping until a reserved permit: whether it may still be used (one that may not is
    released: it will never be sent)."""
    if _usable(s, grant, now, tolerance):
        return True
    release(s, grant)
    return False


def replan(s: BudgetState, grant: Grant, now: float, terms: Terms) -> Grant:
    """Release an allotted permit still far off and reserve again: answers that came in since
    may have freed an earlier slot (a request counted in two windows landed in the other)."""
    release(s, grant)
    return reserve(s, now, terms)


def release(s: BudgetState, grant: Grant) -> None:
    """Take a reserved permit that will not be sent off every count."""
    for window in grant.windows:
        count = s.windows.get(window)
        if count is not None:
            count.used = max(count.used - 1, 0)
    s.histogram.remove(grant.at)
    s.recent.remove(grant.at)


def _usable(s: BudgetState, grant: Grant, now: float, tolerance: float) -> bool:
    if s.paused_until > grant.at + tolerance:
        return False  # a pause (a 429's Retry-After) came while we slept
    if not grant.fixed:
        return True
    if not s.fixed:
        return False  # the windows are no longer known fixed: an allotted slot means nothing
    if now >= grant.zone_end:
        return False  # the timer overslept past the zone: the request could land in the next
    window = grant.windows[0]
    count = s.windows.get(window)
    room = None if count is None else _room(s, window, count)
    return room is None or count is None or count.used <= room


def _room(s: BudgetState, window: int, count: WindowCount) -> int | None:
    """How many of our permits ``window`` takes in all, when another client may share it.

    The answers' room (:attr:`WindowCount.room`) is too low by our requests that arrived but
    whose answers are still on their way: most of those in flight, when the latency comes after
    the server counts a request. When no other client was seen in this window or the last ones,
    that is all it shows, and heeding it would leave slots empty at each window's end: then
    the allowance alone bounds the window (None). Only in a window where every permit of ours
    that may land in it was counted, though: in the first ones, permits granted before the
    server clock was placed are in no count, and only the answers' room covers them."""
    if count.complete and not count.foreign and not _others(s, window):
        return None
    return count.room


def _even_slot(s: BudgetState, now: float, terms: Terms) -> Grant:
    """GCRA, burst 1: the next permit ``(1 + J) / rate`` after the previous one, and never
    sooner than the sliding guard allows."""
    interval = _interval(s, terms, now)
    due = max(s.tat, s.paused_until, _sliding_bound(s, terms))
    # A permit granted up to 2 ms late keeps the grid (a late timer is caught up); after an
    # idle spell the grid starts again from now, with no credit.
    s.tat = (due if due >= now - terms.tolerance else now) + interval
    at = max(due, now)
    return Grant(at, _count(s, at))


def _sliding_bound(s: BudgetState, terms: Terms) -> float:
    """The earliest time a permit leaves at most the key's limit of permits in any ``1 + J``
    seconds: what a sliding second admits, whatever the arrival jitter (rule 11).

    Even spacing alone keeps this only if every earlier permit was evenly spaced too. Permits
    allotted per fixed window come in bursts, and when the windows stop being known fixed (a
    429, an answer from the wrong window, a stale model), the evenly spaced permits that follow
    must not add to the burst a window has already had. Steady even spacing sits exactly on
    this bound and is never slowed by it."""
    if not terms.allot:
        return -math.inf  # the older way never allots, so it never follows a burst
    per_second = math.ceil(terms.ceiling - 1e-9)
    if s.limit:
        per_second = min(per_second, s.limit)
    kept = min(max(per_second, 1), RECENT_GRANTS)
    oldest = s.recent.latest(kept)
    if oldest is None:
        return -math.inf
    span = 1.0 + max(terms.jitter, s.spread + terms.tolerance)
    # Past 1024 a second, the guard holds the last 1024 to their share of the span.
    return oldest + span * kept / max(per_second, 1)


def _window_slot(s: BudgetState, start: float, terms: Terms) -> Grant | None:
    """The next free slot of the first fixed window whose zone has one left after ``start``."""
    lo, hi = s.lo, s.hi
    # D is the longest grant-to-answer time seen lately, not a bound on the next one: a busy
    # machine (a GC pause, a starved event loop) can hold one request longer. Half as much
    # again plus 20 ms keeps it off the window's edge; the zone only gets a little shorter, the
    # window's allowance is the same.
    delay = s.delay * 1.5 + 0.02
    if 1.0 - (hi - lo) - delay < _MIN_ZONE:
        return None
    first = math.floor(start + hi + delay) + 1  # the first window whose zone ends after start
    for window in range(first, first + 3):
        zone_start, zone_end = window - 1 - lo, window - hi - delay
        count = _window(s, window)
        cap = _cap(s, window, count, terms)
        if count.used >= cap:
            continue
        ideal = zone_start + (count.used + 0.5) * (zone_end - zone_start) / cap
        at = max(start, ideal)
        if at >= zone_end:
            continue
        count.used += 1
        s.tat = max(s.tat, at)
        return Grant(at, (window,), fixed=True, zone_end=zone_end)
    return None


def _cap(s: BudgetState, window: int, count: WindowCount, terms: Terms) -> int:
    """How many permits to allot in ``window``: our allowance, less what others took lately."""
    allowance = math.floor(min(s.limit, math.floor(terms.ceiling + 1e-9)) * s.factor + 1e-9)
    foreign = _others(s, window)
    # Leave one slot more than others used, since Remaining shows only the requests that
    # arrived before ours; at least one permit per window keeps the estimate fresh.
    fair = s.limit - foreign - (1 if foreign else 0)
    cap = max(1, min(allowance, fair))
    room = _room(s, window, count)
    return min(cap, room) if room is not None else cap


def _others(s: BudgetState, window: int) -> int:
    """What other clients of the key will likely use in ``window``: the most they used in one
    of the last three windows, fading by a fifth a window. Not just the last window's: one
    that waits out a 429's Retry-After skips a window and comes back."""
    seen = 0.0
    for back in range(1, KEPT_WINDOWS):
        count = s.windows.get(window - back)
        if count is not None and count.complete:
            seen = max(seen, count.foreign * _FADE ** (back - 1))
    return math.ceil(seen - 1e-9)


def _count(s: BudgetState, at: float) -> tuple[int, ...]:
    """Count a permit granted at ``at`` in every window it may land in."""
    if not s.placed():
        return ()
    if not s.counted_since:
        s.counted_since = at
    first = math.floor(at + s.lo) + 1
    last = math.floor(at + s.hi + s.delay) + 1
    if last - first >= _WIDEST_RANGE:
        return ()
    for window in range(first, last + 1):
        _window(s, window).used += 1
    return tuple(range(first, last + 1))


def _window(s: BudgetState, window: int) -> WindowCount:
    """The count of ``window``. Every permit granted once the server clock was placed counts in
    each window it may land in, so a window is first met at the first permit that may land in
    it. Those granted before (the first round trip) are not counted, but their answers' low
    Remaining covers them (see :class:`WindowCount`)."""
    count = s.windows.get(window)
    if count is None:
        earliest = window - 1 - s.hi - s.delay  # the first grant that may land in it
        complete = bool(s.counted_since) and earliest >= s.counted_since
        count = s.windows[window] = WindowCount(complete=complete)
        while len(s.windows) > KEPT_WINDOWS:
            del s.windows[min(s.windows)]
    return count


def _interval(s: BudgetState, terms: Terms, now: float) -> float:
    """Even spacing. A sliding second is only safe if each request arrives at least 1 s after
    the one ``L`` before it, so J must cover the spread of arrival times; round trips cannot
    tell which way their spread lies, so J is at least all of it. What others were seen to use
    of the key is left to them, less one (not for the older way, whose rate already carries
    its margin and knows nothing of others)."""
    rate = terms.ceiling * s.factor
    if not terms.allot:
        return (1.0 + terms.jitter) / rate
    others = s.others_rate * _FADE ** max(now - s.others_at, 0.0)
    if s.limit and others >= 0.5:
        rate = min(rate, max(s.limit - others - 1.0, s.limit * _FLOOR_FRACTION))
    return (1.0 + max(terms.jitter, s.spread + terms.tolerance)) / rate


def _recover(s: BudgetState, now: float) -> None:
    """Add back 2 % of the ceiling per clean second since the last change (rule 14)."""
    if s.factor < 1.0 and now - s.adjusted >= 1.0:
        steps = int(now - s.adjusted)
        s.factor = min(1.0, s.factor + steps * _RECOVERY)
        s.adjusted += steps


def _sanitise(s: BudgetState, now: float, terms: Terms) -> None:
    """Forget times that only a wall clock set backwards can explain, and a stale model."""
    interval = _interval(s, terms, now)
    # Permits are reserved up to a few seconds past now, or past a pause: anything later than
    # that was planned on a wall clock since set back.
    horizon = max(now, s.paused_until) + 2 * interval + 5.0
    if s.tat > horizon:
        s.tat = now
    if s.paused_until > now + 3600.0:
        s.paused_until = now
    if s.recent.times and s.recent.times[-1] > horizon:
        s.recent = RecentGrants()
    if s.seen and not -_CLOCK_SLACK <= now - s.seen <= _MODEL_TTL:
        forget_windows(s)


def forget_windows(s: BudgetState) -> None:
    """Start learning the windows again (their kind, the server clock, the counts)."""
    fresh = BudgetState()
    s.fixed, s.violated_at, s.limit, s.size = False, 0.0, 0, 1
    s.lo_date, s.lo_reset, s.hi, s.delay = fresh.lo_date, fresh.lo_reset, fresh.hi, fresh.delay
    s.spread, s.counted_since = fresh.spread, fresh.counted_since
    s.others_rate, s.others_at = fresh.others_rate, fresh.others_at
    s.seen = 0.0
    s.windows.clear()


# -- what answers teach -------------------------------------------------------------------------


class Facts(NamedTuple):
    """One answer's rate-limit headers and what this process made of them."""

    sent: float
    received: float
    limit: int | None
    remaining: int | None
    reset: int | None
    date: float | None
    windows: tuple[int, ...]  # the windows its permit was counted in
    fixed_slot: bool
    delay: float  # this process's bound D on grant-to-arrival time
    spread: float | None  # this process's range of grant-to-answer times, when new
    size: int
    proves_fixed: bool
    pause_spread: float


def absorb(s: BudgetState, facts: Facts, now: float) -> bool:
    """Learn from one answer; return whether it paused the key for a window spent by others."""
    if s.seen and not -_CLOCK_SLACK <= now - s.seen <= _MODEL_TTL:
        forget_windows(s)
    s.seen, s.delay, s.size = max(s.seen, now), facts.delay, facts.size
    if facts.spread is not None:
        s.spread = facts.spread
    if facts.limit:
        s.limit = facts.limit
    if facts.proves_fixed:
        s.fixed = True
    _learn_clock(s, facts)
    _learn_window(s, facts, now)
    if s.fixed:
        return False
    _learn_others_rate(s, facts, now)
    return _pause_if_foreign(s, facts)


def _learn_clock(s: BudgetState, facts: Facts) -> None:
    """Narrow the server clock offset: the request arrived before Reset (and, for fixed windows,
    after Reset − 1); the answer left after Date."""
    if facts.reset is not None:
        s.hi = min(s.hi, facts.reset - facts.sent)
        s.lo_reset = max(s.lo_reset, facts.reset - 1 - facts.received)
    if facts.date is not None:
        s.lo_date = max(s.lo_date, facts.date - facts.received)
    if s.lo_date > s.hi:  # the server clock jumped: start again from this answer
        s.lo_date = facts.date - facts.received if facts.date is not None else -math.inf
        s.hi = facts.reset - facts.sent if facts.reset is not None else math.inf
        s.lo_reset = -math.inf
    if s.fixed and s.lo_reset > s.hi:
        _withdraw_fixed(s)  # no whole-second windows fit these answers


def _learn_window(s: BudgetState, facts: Facts, now: float) -> None:
    """The answer says which window its request landed in: take it off the others it was
    counted in, and let its Remaining bound the window's room and count others' use of it."""
    landed, remaining = facts.reset, facts.remaining
    if landed is None or remaining is None or not s.limit or landed not in facts.windows:
        if facts.fixed_slot and landed is not None:
            _withdraw_fixed(s)  # an allotted request landed outside its window: model is wrong
            s.paused_until = max(s.paused_until, now + 1.0)
        return
    for window in facts.windows:
        count = s.windows.get(window)
        if count is not None and window != landed:
            count.used = max(count.used - 1, 0)
    count = s.windows.get(landed)
    if count is None:
        return
    if remaining > 0:  # (a 429 also says 0, and was not counted)
        count.answered += 1
    count.low = remaining if count.low is None else min(count.low, remaining)
    # What the server counted, less every permit of ours that can have arrived by then.
    count.foreign = max(count.foreign, s.limit - remaining - count.used)


def _ours_before(s: BudgetState, facts: Facts) -> int:
    """How many of our admitted requests can have arrived in the second before this one did
    (at most): those granted from 1 s + D before it was sent until it was answered."""
    return s.histogram.total(facts.sent - 1.0 - s.delay, facts.received)


def _learn_others_rate(s: BudgetState, facts: Facts, now: float) -> None:
    """Others' requests in the last second, at least: what the server counted, less ours."""
    if not facts.limit or facts.remaining is None or not s.placed():
        return
    seen = facts.limit - facts.remaining - _ours_before(s, facts)
    faded = s.others_rate * _FADE ** max(now - s.others_at, 0.0)
    s.others_rate, s.others_at = max(float(seen), faded), now


def _pause_if_foreign(s: BudgetState, facts: Facts) -> bool:
    """Remaining 0 that our own requests of the last second cannot explain: others spent the
    window; wait until the server's clock has surely passed its reset."""
    if facts.remaining != 0 or not facts.limit or facts.reset is None or not s.placed():
        return False
    ours = _ours_before(s, facts)
    if ours >= facts.limit:
        return False
    # Until the server clock passes Reset. Reset − 1 bounds that clock from below only if the
    # windows are fixed, which is not known yet; but Date is often cached and late, and with
    # a sliding second, resuming a little early costs at most one (absorbed) 429.
    lower = max(s.lo_date, s.lo_reset)
    s.paused_until = max(s.paused_until, facts.reset - lower + facts.pause_spread)
    return True


def _withdraw_fixed(s: BudgetState) -> None:
    s.fixed = False
    s.lo_reset = -math.inf
    s.violated_at = 0.0


def note_rate_limited(s: BudgetState, slot: Slot | None, now: float) -> None:
    """A 429: slow down; a second one on an allotted slot within 10 s withdraws fixed windows."""
    s.factor = max(s.factor * _SLOWDOWN, _FLOOR_FRACTION)
    s.adjusted = now
    if slot is not None:
        s.histogram.remove(slot.planned)  # refused: the server did not count it
        s.recent.remove(slot.planned)
    if slot is None or not slot.fixed or not s.fixed:
        return
    if now - s.violated_at <= _VIOLATION_SPAN:
        _withdraw_fixed(s)
        s.paused_until = max(s.paused_until, now + 1.0)  # let a sliding second drain
    else:
        s.violated_at = now


# -- the pacer ----------------------------------------------------------------------------------


class Pacer:
    """Permits for every worker of one key, at most ``rate`` per second.

    ``jitter`` is the margin J for evenly spaced permits (rule 11). Left at ``None``, the caller
    has already taken it out of ``rate`` (the older way): permits are then only ever evenly
    spaced, never allotted per window. With a number, ``rate`` is the whole budget, and once
    the answers prove the windows fixed, each window's allowance is sent inside it.
    """

    def __init__(
        self,
        rate: float,
        *,
        jitter: float | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = anyio.sleep,
        tolerance: float = _TOLERANCE,
        store: Store | None = None,
    ) -> None:
        if rate <= 0:
            msg = f"rate must be positive, not {rate}"
            raise ValueError(msg)
        if jitter is not None and not 0 <= jitter < 1:
            msg = f"jitter must be in [0, 1), not {jitter}"
            raise ValueError(msg)
        self._terms = Terms(rate, jitter or 0.0, tolerance, jitter is not None)
        self._clock = clock
        self._sleep = sleep
        self._store: Store = store or MemoryStore()
        self._lock = anyio.Lock()

    @property
    def ceiling(self) -> float:
        """The most permits per second this pacer gives."""
        return self._terms.ceiling

    @property
    def rate(self) -> float:
        """Permits per second now (the ceiling, less any slow-down not yet recovered)."""
        return self._terms.ceiling * self._store.update(lambda s: s.factor)

    @property
    def clock(self) -> Callable[[], float]:
        """The wall clock this pacer (and its watch) run on."""
        return self._clock

    @property
    def fixed_windows(self) -> bool:
        """Whether the answers proved the key's windows fixed."""
        return self._store.update(lambda s: s.fixed)

    async def acquire(self) -> None:
        """Wait for the next permit."""
        # Each transaction reads the clock once it holds the state (the lock may be waited for):
        # a time read before could be half a second old, and allot a slot whose zone is over.
        clock, terms = self._clock, self._terms
        async with self._lock:
            grant = self._store.update(lambda s: reserve(s, clock(), terms))
            for _ in range(_MAX_TRIES):
                wait = grant.at - clock()
                if grant.fixed and wait > _REPLAN:
                    await self._sleep(_REPLAN)
                    grant = self._replan(grant)
                elif await self._wait_for(grant):
                    break
                else:
                    grant = self._store.update(lambda s: reserve(s, clock(), terms))
            _SLOT.set(Slot(clock(), grant.windows, grant.fixed, grant.at))

    def _replan(self, grant: Grant) -> Grant:
        clock, terms = self._clock, self._terms
        return self._store.update(lambda s: replan(s, grant, clock(), terms))

    async def _wait_for(self, grant: Grant) -> bool:
        """Sleep until ``grant`` is due; return whether it may still be used then."""
        # An allotted permit must never go early (its zone starts at the window's edge), and
        # a timer may fire a little before its time; an evenly spaced one may go 2 ms early.
        early = 0.0 if grant.fixed else self._terms.tolerance
        slept = False
        for _ in range(3):
            wait = grant.at - self._clock()
            if wait <= early:
                break
            await self._sleep(wait)
            slept = True
        if not slept and not grant.fixed:
            return True
        # (An allotted permit is checked even when it was due at once: its zone may have ended
        # while the transaction that granted it waited for the lock.)
        clock, tolerance = self._clock, self._terms.tolerance
        return self._store.update(lambda s: still_good(s, grant, clock(), tolerance))

    def pause_until(self, when: float) -> None:
        """Issue no permit before ``when`` (on this pacer's wall clock)."""

        def pause(s: BudgetState) -> None:
            s.paused_until = max(s.paused_until, when)

        self._store.update(pause)

    def pause_for(self, seconds: float) -> None:
        """Issue no permit for ``seconds`` from now."""
        self.pause_until(self._clock() + seconds)

    def slow_down(self) -> None:
        """A 429 was seen: cut the rate (never below 5 % of the ceiling)."""
        slot, clock = _SLOT.get(), self._clock
        self._store.update(lambda s: note_rate_limited(s, slot, clock()))

    def lower_ceiling(self, rate: float) -> None:
        """The server says the limit is lower than assumed."""
        if 0 < rate < self._terms.ceiling:
            terms = self._terms
            self._terms = Terms(rate, terms.jitter, terms.tolerance, terms.allot)

    def absorb(self, facts: Facts) -> tuple[bool, bool]:
        """Learn from one answer: (whether it paused the key, whether windows are fixed)."""
        clock = self._clock

        def take(s: BudgetState) -> tuple[bool, bool]:
            return absorb(s, facts, clock()), s.fixed

        return self._store.update(take)

    def close(self) -> None:
        """Let go of the shared state (nothing for a pacer of one process)."""
        self._store.close()


class WindowWatch:
    """Reads each answer's ``X-RateLimit-*`` headers for the pacer: the server's clock, the
    windows' kind and size, the time from grant to arrival, and others' use of the key."""

    def __init__(
        self,
        pacer: Pacer,
        *,
        jitter: Callable[[], float] = lambda: random.uniform(0.0, 0.05),
    ) -> None:
        self._pacer = pacer
        self._jitter = jitter
        # (sent, received) of our answers that were surely admitted (Remaining > 0), newest last.
        self._admitted: deque[tuple[float, float]] = deque()
        self._delays: deque[float] = deque(maxlen=_DELAY_SAMPLES)
        self._delay = _DEFAULT_DELAY
        self._samples = 0
        self._last_reset: int | None = None
        self._steps = 0
        self._step_gcd = 0
        self._fixed = False
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
        # The permit this task took last is this request's (the sender takes one right before
        # each request); one taken long before the request was sent is not.
        slot = _SLOT.get()
        if slot is not None and not -5.0 <= slot.granted_at - sent_wall <= _TOLERANCE:
            slot = None
        granted = slot.granted_at if slot is not None else sent_wall
        new_window = reset is not None and reset != self._last_reset
        facts = Facts(
            sent=sent_wall,
            received=received_wall,
            limit=limit,
            remaining=remaining,
            reset=reset,
            date=date,
            windows=slot.windows if slot is not None else (),
            fixed_slot=slot is not None and slot.fixed,
            delay=self._learn_delay(received_wall - granted),
            spread=self._spread(),
            size=self._learn_size(reset),
            proves_fixed=new_window
            and self._proves_fixed(sent_wall, received_wall, limit, remaining),
            pause_spread=self._jitter(),
        )
        if limit is not None:
            self._pacer.lower_ceiling(float(limit))
        paused, self._fixed = self._pacer.absorb(facts)
        self.foreign_pauses += paused
        if remaining is not None and remaining > 0:
            self._remember(sent_wall, received_wall)

    def _learn_delay(self, sample: float) -> float:
        """D: the longest of the recent grant-to-answer times (an upper bound on grant to
        arrival), recomputed now and then so that one slow answer ages out."""
        sample = min(max(sample, _TOLERANCE), _MAX_DELAY)
        self._delays.append(sample)
        self._samples += 1
        if self._samples < 32:  # too few to know the tail: keep the cautious default
            self._delay = max(_DEFAULT_DELAY, *self._delays)
        elif self._samples % 32 == 0:
            self._delay = max(self._delays)
        else:
            self._delay = max(self._delay, sample)
        return self._delay

    def _spread(self) -> float | None:
        """The whole range of the recent grant-to-answer times, now and then. Not a percentile
        spread: one pair of requests a second apart that is off by more than J is a 429 on a
        sliding second, and over thousands of pairs a 1 % tail is met."""
        if self._samples >= 32 and self._samples % 8:
            return None
        return min(max(self._delays) - min(self._delays), _MAX_SPREAD)

    def _learn_size(self, reset: int | None) -> int:
        """Fixed windows are aligned to their size, so every step between two Resets is a
        multiple of it; after three steps their greatest common divisor is the size."""
        if reset is not None and self._last_reset is not None and reset != self._last_reset:
            self._step_gcd = math.gcd(self._step_gcd, abs(reset - self._last_reset))
            self._steps += 1
        if reset is not None:
            self._last_reset = reset
        return self._step_gcd if self._steps >= 3 and self._step_gcd <= 60 else 1

    def _proves_fixed(
        self, sent: float, received: float, limit: int | None, remaining: int | None
    ) -> bool:
        """Whether this answer rules out a sliding second: it left more than ``limit − n``,
        where ``n`` counts this request and ours that surely arrived in the second before it
        (answered before this one was sent, sent after it was answered less 1 s). Others'
        requests only lower Remaining, so they can never make this true by mistake."""
        if self._fixed or not limit or remaining is None:
            return False
        surely = 1
        for sent_k, received_k in reversed(self._admitted):
            if received_k < received - 1.5:
                break  # older entries (nearly in answer order) cannot qualify
            if received_k <= sent and sent_k > received - 1.0:
                surely += 1
        return remaining > limit - surely

    def _remember(self, sent: float, received: float) -> None:
        self._admitted.append((sent, received))
        while self._admitted and self._admitted[0][1] < received - 2.0:
            self._admitted.popleft()


async def wait_retry_after(pacer: Pacer, seconds: float) -> None:
    """Pause every worker for a server-given delay (plus a little spread), and slow down."""
    pacer.pause_for(seconds + random.uniform(0.0, 0.1))
    pacer.slow_down()
    await anyio.lowlevel.checkpoint()
