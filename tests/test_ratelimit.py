"""Pacing (ratelimit.py) and the shared budget (budget.py).

Three layers: the pacer with a fake clock; a virtual-time simulation of workers, pacer and the
sandbox's own window limiters, where the latency sits on the way *to* the server (it moves
arrivals across window edges, the case that costs 429s) and a minute of pacing takes
milliseconds whatever the machine's load; and a few short end-to-end runs against the sandbox
on 127.0.0.1. Exact throughput ratios are for the benchmarks; here the floors are loose, but
429 counts are exact.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import heapq
import itertools
import logging
import math
import os
import random
import stat
import struct
import threading
import time as wall
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import pytest

from allo_batch.budget import (
    BudgetStateError,
    FileStore,
    SharedBudget,
    budget_file_name,
    budget_key_id,
    decode,
    encode,
    state_directory,
)
from allo_batch.client import AlloClient, http_lanes
from allo_batch.config import RetryPolicy, Secret
from allo_batch.models import PlannedRequest, RowResult
from allo_batch.ratelimit import (
    RECENT_GRANTS,
    BudgetState,
    Facts,
    Grant,
    Histogram,
    MemoryStore,
    Pacer,
    RecentGrants,
    Slot,
    Store,
    Terms,
    WindowCount,
    WindowWatch,
    absorb,
    note_rate_limited,
    reserve,
    still_good,
    wait_retry_after,
)
from allo_batch.sandbox import build_world
from allo_batch.sandbox.limits import FixedWindowLimiter, Limiter, SlidingWindowLimiter
from allo_batch.send import Sender
from tests.conftest import SandboxFactory

START = 1_800_000_000.0
T = TypeVar("T")

# -- the pacer on a fake clock --------------------------------------------------------------------


class FakeClock:
    """A wall clock that moves only when the pacer sleeps."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def test_pacer_spaces_permits_evenly_without_an_initial_burst() -> None:
    """At 5/s the permits come at 0, 0.2, 0.4 … seconds: no burst at the start."""
    clock = FakeClock()
    granted: list[float] = []

    async def go() -> None:
        pacer = Pacer(5.0, clock=clock, sleep=clock.sleep)
        for _ in range(6):
            await pacer.acquire()
            granted.append(round(clock.now - 1000.0, 6))

    anyio.run(go)
    assert granted == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_the_jitter_margin_widens_even_spacing() -> None:
    """With a margin J, evenly spaced permits are (1 + J) / rate apart."""
    clock = FakeClock()

    async def go() -> list[float]:
        pacer = Pacer(10.0, jitter=0.25, clock=clock, sleep=clock.sleep)
        times = []
        for _ in range(3):
            await pacer.acquire()
            times.append(round(clock.now - 1000.0, 6))
        return times

    assert anyio.run(go) == [0.0, 0.125, 0.25]


def test_pause_and_slowdown() -> None:
    """A pause holds the next permit back; a slowdown widens the spacing; it recovers."""
    clock = FakeClock()

    async def go() -> list[float]:
        pacer = Pacer(10.0, clock=clock, sleep=clock.sleep)
        await pacer.acquire()
        pacer.pause_for(2.0)
        await pacer.acquire()
        after_pause = clock.now - 1000.0
        pacer.slow_down()
        start = clock.now
        await pacer.acquire()
        gap = round(clock.now - start, 6)
        rate = pacer.rate
        clock.now += 5.0
        return [after_pause, gap, rate, pacer.rate]

    after_pause, gap, rate, later = anyio.run(go)
    assert after_pause == pytest.approx(2.0)
    assert gap == pytest.approx(0.1)  # the permit already scheduled keeps its slot
    assert rate == pytest.approx(8.0)
    assert later == pytest.approx(8.0)  # recovery is counted at the next permit
    anyio.run(Pacer(10.0, clock=clock, sleep=clock.sleep).acquire)


def test_a_pause_that_comes_while_a_permit_waits_holds_it_back() -> None:
    """A 429 seen by another worker while this one sleeps until its slot: the slot is given up
    and the permit comes after the pause."""
    clock = FakeClock()

    async def go() -> float:
        pacer = Pacer(1.0, clock=clock, sleep=clock.sleep)
        await pacer.acquire()

        async def pause_midway() -> None:
            await anyio.lowlevel.checkpoint()
            pacer.pause_until(1003.0)

        async with anyio.create_task_group() as group:
            group.start_soon(pause_midway)
            await pacer.acquire()
        return clock.now

    assert anyio.run(go) >= 1003.0


def test_the_histogram_counts_recent_permits_and_forgets_old_ones() -> None:
    histogram = Histogram()
    for when in (100.001, 100.002, 100.5, 101.0, 102.999):
        histogram.add(when)
    assert histogram.total(100.0, 100.009) == 2
    assert histogram.total(100.0, 103.0) == 5
    histogram.remove(100.5)
    assert histogram.total(100.4, 100.6) == 0
    histogram.add(103.9)  # 100.00x is now more than 3 s old
    assert histogram.total(99.0, 105.0) == 3
    histogram.add(500.0)  # long idle: everything before is gone
    assert histogram.total(0.0, 1000.0) == 1


def test_a_window_counts_its_room_from_answers_in_any_order() -> None:
    """``answered + low`` never says more room than there is, even with answers reordered."""
    count = WindowCount(used=3)
    count.answered, count.low = 1, 17  # a later request's answer came first (3 arrived)
    assert count.room == 18  # too low while the others are on their way ...
    count.answered, count.low = 3, 17
    assert count.room == 20  # ... exact once they are in
    count.foreign = 3  # another client took 3 of the 20 so far: claim our share of the rest
    assert count.room == 3 + math.floor(17 * 3 / 6)


def test_two_429s_on_allotted_slots_withdraw_fixed_windows() -> None:
    state = BudgetState(fixed=True)
    slot = Slot(1000.0, (1001,), fixed=True, planned=1000.0)
    note_rate_limited(state, slot, 1000.0)
    assert state.fixed
    note_rate_limited(state, slot, 1005.0)
    assert not state.fixed
    assert state.paused_until >= 1006.0
    assert state.factor == pytest.approx(0.64)


def test_the_window_size_is_learned_from_the_steps_between_resets() -> None:
    """Fixed windows are aligned to their size: every Reset step is a multiple of it."""
    clock = FakeClock(START)
    store = MemoryStore()
    pacer = Pacer(10.0, jitter=0.02, clock=clock, sleep=clock.sleep, store=store)
    watch = WindowWatch(pacer, jitter=lambda: 0.0)
    for reset in (1_800_000_010, 1_800_000_020, 1_800_000_040, 1_800_000_050):
        clock.now = reset - 5.0
        watch.observe(
            sent_wall=clock.now - 0.05,
            received_wall=clock.now,
            limit=100,
            remaining=50,
            reset=reset,
            date=clock.now - 1,
        )
    assert store.state.size == 10
    # A server with one-second windows soon shows a step of one.
    watch.observe(
        sent_wall=clock.now,
        received_wall=clock.now,
        limit=100,
        remaining=50,
        reset=1_800_000_051,
        date=None,
    )
    assert store.state.size == 1


def answer(sent: float, received: float, *, limit: int, remaining: int, reset: int) -> Facts:
    """What the watch makes of one answer with these headers (no Date, no allotted slot)."""
    return Facts(
        sent=sent,
        received=received,
        limit=limit,
        remaining=remaining,
        reset=reset,
        date=None,
        windows=(),
        fixed_slot=False,
        delay=0.1,
        spread=None,
        size=1,
        proves_fixed=False,
        pause_spread=0.0,
    )


def test_state_expires_when_unused() -> None:
    """A budget file left by a run an hour ago says nothing about the server now."""
    state = BudgetState(fixed=True, limit=5, lo_date=0.1, hi=0.2, seen=1000.0)
    absorb(state, answer(5000.0, 5000.1, limit=5, remaining=4, reset=5001), 5000.1)
    assert not state.fixed
    assert state.hi == pytest.approx(5001 - 5000.0)


def test_a_clock_read_just_before_the_last_transaction_keeps_what_was_learned() -> None:
    """A transaction may carry a time a few milliseconds older than the last one's (the clock
    was once read before the lock; a clock may be slewed). That is no wall clock set backwards,
    and must not throw the windows' model away (it did: evenly spaced permits then followed a
    window's allotted burst, and the window got 21 of 20)."""
    terms = Terms(20.0, 0.02, 0.002, allot=True)
    state = BudgetState(fixed=True, limit=20, lo_date=-0.02, lo_reset=-0.01, hi=0.02, seen=1000.0)
    reserve(state, 999.99, terms)
    assert state.fixed and state.placed()
    absorb(state, answer(999.9, 999.98, limit=20, remaining=10, reset=1000), 999.98)
    assert state.fixed
    assert state.seen == 1000.0  # the latest time seen stays the latest
    reserve(state, 990.0, terms)  # a wall clock set back by 10 s: the model no longer holds
    assert not state.fixed
    assert not state.placed()


def most_in_any_span(times: list[float], span: float) -> int:
    """The most of ``times`` in any half-open interval ``span`` long."""
    ordered = sorted(times)
    return max(bisect.bisect_left(ordered, t + span) - i for i, t in enumerate(ordered))


@pytest.mark.parametrize("limit", [20, 1000])
def test_even_spacing_after_a_burst_keeps_the_limit_in_every_span(limit: int) -> None:
    """A window got three quarters of its limit allotted in its first 0.2 s, then the windows
    stopped being known fixed: the evenly spaced permits that follow keep at most the limit in
    any 1 + J seconds (a sliding second's rule), and once the burst is behind, the spacing is
    even again and no slower than before."""
    terms = Terms(float(limit), 0.02, 0.002, allot=True)
    state = BudgetState(limit=limit)
    burst = [1000.0 + n * 0.2 / (limit * 3 // 4) for n in range(limit * 3 // 4)]
    for when in burst:
        state.recent.add(when)
    state.tat = 1000.2
    now, granted = 1000.2, []
    for _ in range(4 * limit):
        grant = reserve(state, now, terms)
        granted.append(grant.at)
        now = grant.at
    span = 1.0 + terms.jitter
    assert most_in_any_span(burst + granted, span) <= limit
    interval = span / limit
    gaps = [b - a for a, b in itertools.pairwise(granted[-2 * limit :])]
    assert gaps == pytest.approx([interval] * len(gaps), abs=1e-5)


def test_a_pause_ends_with_even_spacing_not_a_burst() -> None:
    """Workers that all wait out a Retry-After pause of 10 s get permits spaced evenly from its
    end, not all at its end (the next permit's time once looked like a clock set back)."""
    terms = Terms(10.0, 0.02, 0.002, allot=True)
    state = BudgetState(limit=10, paused_until=1010.0)
    for when in (999.5, 999.7, 999.9):
        state.recent.add(when)
    times = [reserve(state, 1000.0, terms).at for _ in range(8)]
    interval = (1.0 + terms.jitter) / 10
    assert times == pytest.approx([1010.0 + n * interval for n in range(8)])
    assert list(state.recent.times[:3]) == [999.5, 999.7, 999.9]  # kept through the pause


def test_a_transaction_reads_the_clock_once_it_holds_the_state() -> None:
    """Waiting for the shared state's lock takes time; a permit reserved on a time read before
    the wait could go out after its window's zone had ended."""
    clock = FakeClock()

    class SlowStore(MemoryStore):
        def update(self, change: Callable[[BudgetState], T]) -> T:
            clock.now += 0.3  # the lock was held by another process meanwhile
            return super().update(change)

    store = SlowStore()
    pacer = Pacer(5.0, jitter=0.02, clock=clock, sleep=clock.sleep, store=store)
    anyio.run(pacer.acquire)
    assert store.state.recent.times[0] >= 1000.3
    before = clock.now
    pacer.slow_down()  # a 429's slow-down, too, is dated when it holds the state
    assert store.state.adjusted == pytest.approx(before + 0.3)
    pacer.absorb(answer(before, before, limit=5, remaining=4, reset=int(before) + 1))
    assert store.state.seen == pytest.approx(before + 0.6)


def test_an_allotted_permit_is_given_up_when_the_windows_stop_being_known_fixed() -> None:
    """A permit allotted to a fixed window, still asleep when a 429 or a stale model withdraws
    the windows' kind, is released rather than sent on top of the evenly spaced ones."""
    state = BudgetState(fixed=True, limit=20)
    state.windows[1001] = WindowCount(used=5)
    grant = Grant(1000.5, (1001,), fixed=True, zone_end=1000.9)
    assert still_good(state, grant, 1000.5, 0.002)
    state.fixed = False
    assert not still_good(state, grant, 1000.5, 0.002)
    assert state.windows[1001].used == 4


def test_the_answers_room_binds_a_window_unless_its_count_is_whole_and_ours() -> None:
    """The answers' room (answered + lowest Remaining) lags by the answers on their way, so it
    must not cut a window's allotment when every permit of ours in it was counted and nobody
    else was seen; it must in a first window, whose permits from before the server clock was
    placed are in no count, and wherever another client was seen."""
    grant = Grant(1000.5, (1001,), fixed=True, zone_end=1000.9)

    def usable(complete: bool, foreign: int) -> bool:
        state = BudgetState(fixed=True, limit=20)
        state.windows[1001] = WindowCount(18, 10, 5, foreign, complete)  # room 15 (or less)
        return still_good(state, grant, 1000.5, 0.002)

    assert usable(complete=True, foreign=0)
    assert not usable(complete=False, foreign=0)
    assert not usable(complete=True, foreign=2)


def test_recent_grants_keep_the_last_permits_in_order() -> None:
    recent = RecentGrants()
    for when in (3.0, 1.0, 2.0, 2.0):
        recent.add(when)
    assert list(recent.times) == [1.0, 2.0, 2.0, 3.0]
    assert recent.latest(1) == 3.0
    assert recent.latest(4) == 1.0
    assert recent.latest(5) is None
    recent.remove(2.0)
    recent.remove(7.0)  # never kept: nothing happens
    assert list(recent.times) == [1.0, 2.0, 3.0]
    for n in range(RECENT_GRANTS + 44):
        recent.add(10.0 + n)
    assert len(recent.times) == RECENT_GRANTS
    assert recent.latest(RECENT_GRANTS) == 10.0 + 44


# -- a virtual-time simulation ------------------------------------------------------------------


class VirtualTime:
    """A clock and a sleep for asyncio tasks: time jumps to the next timer once all wait."""

    def __init__(self, start: float = START) -> None:
        self.now = start
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + max(seconds, 0.0), next(self._order), future))
        await future

    async def run_until(self, done: Callable[[], bool], limit: float) -> None:
        """Advance timer by timer until ``done()`` or ``limit`` virtual seconds have passed."""
        end = self.now + limit
        for _ in range(10_000_000):  # bounded; the virtual limit ends it first
            await _settle()
            if done() or not self._timers or self.now >= end:
                return
            when, _, future = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not future.cancelled():
                future.set_result(None)


async def _settle() -> None:
    """Let every runnable task run until all of them wait again."""
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)
    for _ in range(10_000):
        await asyncio.sleep(0)
        if ready is not None and not ready:
            return


@dataclass
class Server:
    """The API's admission (the sandbox's limiters) on its own clock, ``offset`` from ours,
    with a ``Date`` that is refreshed once a second, as uvicorn does."""

    time: VirtualTime
    window: Literal["fixed", "sliding"]
    limit: int
    offset: float = 0.37
    limiter: Limiter = field(init=False)
    arrivals: list[float] = field(default_factory=list)
    refused: int = 0

    def __post_init__(self) -> None:
        clock = self.server_clock
        sliding = self.window == "sliding"
        self.limiter = SlidingWindowLimiter(clock) if sliding else FixedWindowLimiter(clock)

    def server_clock(self) -> float:
        return self.time.now + self.offset

    def date(self) -> float:
        refreshed = math.floor(self.server_clock() - 0.63) + 0.63
        return float(math.floor(refreshed))

    def per_window(self) -> list[int]:
        counts = Counter(math.floor(a + self.offset) for a in self.arrivals)
        return [counts[w] for w in range(min(counts), max(counts) + 1)]


@dataclass
class Client:
    """One allo-batch process: a pacer, its watch, its rows."""

    pacer: Pacer
    watch: WindowWatch
    rows: int
    sent: list[float] = field(default_factory=list)
    refused: int = 0
    landed: int = 0


@dataclass(frozen=True)
class Net:
    """Seconds from permit to arrival, and from arrival to answer."""

    forward: tuple[float, float]
    back: tuple[float, float] = (0.0, 0.01)


def client(time: VirtualTime, limit: int, rows: int, store: Store | None, seed: int) -> Client:
    pacer = Pacer(limit, jitter=0.02, clock=time.clock, sleep=time.sleep, store=store)
    rng = random.Random(seed)
    return Client(pacer, WindowWatch(pacer, jitter=lambda: rng.uniform(0.0, 0.05)), rows)


async def _worker(
    who: Client, server: Server, net: Net, rng: random.Random, queue: list[int]
) -> None:
    """What the sender does for each row: permit, request, observe, retry a 429."""
    time = server.time
    while queue:
        queue.pop()
        while True:
            await who.pacer.acquire()
            sent = time.now
            who.sent.append(sent)
            await time.sleep(rng.uniform(*net.forward))
            verdict = server.limiter.admit("key", "write", server.limit)
            server.arrivals.append(time.now)
            date = server.date()
            await time.sleep(rng.uniform(*net.back))
            who.watch.observe(
                sent_wall=sent,
                received_wall=time.now,
                limit=verdict.limit,
                remaining=verdict.remaining,
                reset=verdict.reset,
                date=date,
            )
            if verdict.allowed:
                who.landed += 1
                break
            who.refused += 1
            server.refused += 1
            await wait_retry_after(who.pacer, verdict.retry_after)


def simulate(
    server: Server,
    clients: list[Client],
    net: Net,
    *,
    workers: int,
    extra: Callable[[], Any] | None = None,
    limit: float = 300.0,
) -> None:
    """Run every client's rows through its own ``workers`` until all landed (virtual time)."""

    async def main() -> None:
        tasks = [asyncio.ensure_future(extra())] if extra else []
        for number, who in enumerate(clients):
            queue = list(range(who.rows))
            for lane in range(workers):
                rng = random.Random(number * 100 + lane)
                tasks.append(asyncio.ensure_future(_worker(who, server, net, rng, queue)))
        total = sum(c.rows for c in clients)
        await server.time.run_until(lambda: sum(c.landed for c in clients) >= total, limit)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def achieved(sent: list[float]) -> float:
    """Requests per second between the first and the last (as the run summary counts)."""
    ordered = sorted(sent)
    return (len(ordered) - 1) / (ordered[-1] - ordered[0])


@pytest.mark.parametrize(
    ("limit", "seconds", "net", "workers"),
    [
        pytest.param(5, 60, Net((0.03, 0.07)), 3, id="5/s, 50±20 ms to the server"),
        pytest.param(100, 20, Net((0.0, 0.02)), 32, id="100/s, 10±10 ms"),
        pytest.param(
            100, 20, Net((0.0, 0.005), (0.03, 0.07)), 32, id="100/s, 50±20 ms after it counts"
        ),
        pytest.param(1000, 5, Net((0.005, 0.015), (0.0, 0.002)), 32, id="1000/s, 10±5 ms"),
    ],
)
def test_fixed_windows_get_every_slot_with_no_429(
    limit: int, seconds: int, net: Net, workers: int
) -> None:
    """Once the answers prove the windows fixed, each window gets its whole limit, sent inside
    it away from both edges: no 429 although arrivals jitter by ±20 ms. Also when the latency
    comes after the server counts a request: the answers' Remaining then lags by the requests
    in flight, which must not leave the end of each window empty."""
    time = VirtualTime()
    server = Server(time, "fixed", limit)
    who = client(time, limit, limit * seconds, MemoryStore(), seed=1)
    simulate(server, [who], net, workers=workers)
    assert server.refused == 0
    assert who.pacer.fixed_windows
    assert achieved(who.sent) / limit >= 0.99
    full = server.per_window()[2:-1]  # after the switch, before the last partial window
    assert full == [limit] * len(full)


def test_a_sliding_second_is_paced_evenly_with_no_429() -> None:
    """A sliding second is never mistaken for fixed windows, and even spacing with a margin for
    the whole spread of arrival times gets no 429."""
    time = VirtualTime()
    server = Server(time, "sliding", 20)
    who = client(time, 20, 400, MemoryStore(), seed=1)
    simulate(server, [who], Net((0.03, 0.07)), workers=5)
    assert server.refused == 0
    assert not who.pacer.fixed_windows
    assert achieved(who.sent) / 20 >= 0.9


def test_the_older_way_never_allots_per_window() -> None:
    """``Pacer(rate)`` without a jitter margin (the caller took it out of the rate) spaces
    evenly at ``rate``, as before."""
    time = VirtualTime()
    server = Server(time, "fixed", 5)
    pacer = Pacer(5 / 1.02, clock=time.clock, sleep=time.sleep)
    who = Client(pacer, WindowWatch(pacer, jitter=lambda: 0.0), 60)
    simulate(server, [who], Net((0.03, 0.07)), workers=3)
    assert server.refused == 0
    assert achieved(who.sent) == pytest.approx(5 / 1.02, rel=0.001)


@pytest.mark.parametrize("window", ["fixed", "sliding"])
def test_processes_sharing_one_budget_send_at_the_limit_together(
    window: Literal["fixed", "sliding"],
) -> None:
    """Two processes with one state: the key's limit together, never twice it."""
    time = VirtualTime()
    server = Server(time, window, 20)
    store = MemoryStore()
    both = [client(time, 20, 200, store, seed=n) for n in (1, 2)]
    simulate(server, both, Net((0.005, 0.015)), workers=9)
    assert server.refused == 0
    ratio = achieved(both[0].sent + both[1].sent) / 20
    assert ratio >= (0.99 if window == "fixed" else 0.95)


def test_processes_that_cannot_see_each_other_share_through_the_headers() -> None:
    """Two processes on different machines: each counts the other's use from Remaining and
    leaves it; a few 429s while they meet, and every row lands."""
    time = VirtualTime()
    server = Server(time, "fixed", 20)
    both = [client(time, 20, 200, None, seed=n) for n in (1, 2)]
    simulate(server, both, Net((0.005, 0.015)), workers=9)
    assert [c.landed for c in both] == [200, 200]
    assert server.refused <= 0.01 * len(both[0].sent + both[1].sent)
    # Settled while both run, each leaving the other its share (once one is done, the other
    # takes the whole limit back as its estimate of the other's use fades).
    assert min(server.per_window()[4:14]) >= 18


def test_a_window_spent_by_another_client_pauses_the_run() -> None:
    """Another client spends 3 of 5 writes at the start of the first three windows: the run
    sees Remaining 0 that its own requests cannot explain and waits for the reset."""
    time = VirtualTime()
    server = Server(time, "fixed", 5)
    who = client(time, 5, 40, MemoryStore(), seed=1)
    spent: list[bool] = []

    async def other() -> None:
        for window in range(3):
            if window:
                edge = math.floor(server.server_clock()) + 1.01 - server.offset
                await time.sleep(edge - time.now)
            for _ in range(3):
                await time.sleep(0.05)
                spent.append(server.limiter.admit("key", "write", 5).allowed)

    simulate(server, [who], Net((0.03, 0.07)), workers=3, extra=other)
    assert spent == [True] * 9
    assert who.refused == 0
    assert who.watch.foreign_pauses >= 1


# -- the state file -------------------------------------------------------------------------------


def test_the_state_survives_the_file_unchanged() -> None:
    state = BudgetState(factor=0.8, paused_until=12.5, tat=11.0, fixed=True, limit=5, hi=0.3)
    state.lo_date, state.spread, state.others_rate = 0.1, 0.04, 2.5
    state.windows = {7: WindowCount(3, 2, 1, 1, True), 8: WindowCount(1)}
    state.histogram.add(10.0)
    state.recent.add(10.5)
    state.recent.add(10.0)
    again = decode(encode(state))
    assert again == state
    assert list(again.recent.times) == [10.0, 10.5]
    assert decode(b"") is None
    assert decode(b"x" * len(encode(state))) is None
    record = bytearray(encode(state))
    first, second, third = (-8 * (RECENT_GRANTS - n) for n in range(3))
    record[first:third] = record[second:third] + record[first:second]
    damaged = decode(bytes(record))  # the permit times out of order: not trusted
    assert damaged is not None
    assert not damaged.recent.times
    for bad in (math.nan, math.inf):
        record = bytearray(encode(state))
        second = -8 * (RECENT_GRANTS - 1)
        record[second : second + 8] = struct.pack("d", bad)  # the last kept time
        damaged = decode(bytes(record))
        assert damaged is not None
        assert not damaged.recent.times, bad


def test_a_slow_holder_of_the_lock_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that the OS or its own interpreter deschedules keeps the lock for tens of
    milliseconds on a loaded machine: the next transaction waits for it rather than going on
    unlocked and undoing the holder's (two permits on one slot)."""
    # A late timer thread on a loaded machine must not look like a stopped holder.
    monkeypatch.setattr("allo_batch.budget._LOCK_WAIT", 30.0)
    store = FileStore(tmp_path, "ab" * 16)
    holder = os.open(store.path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    release = threading.Timer(0.15, fcntl.flock, (holder, fcntl.LOCK_UN))
    release.start()
    start = wall.monotonic()
    store.update(lambda s: None)
    assert wall.monotonic() - start >= 0.1
    assert store.contended == 0
    release.join()
    os.close(holder)
    store.close()


def test_a_stopped_holder_of_the_lock_is_waited_for_once(tmp_path: Path) -> None:
    """A holder stopped by a debugger or SIGSTOP must not stop every run on the key: half a
    second, then this transaction and the next ones go on without the lock until it is free."""
    store = FileStore(tmp_path, "cd" * 16)
    holder = os.open(store.path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    start = wall.monotonic()
    store.update(lambda s: setattr(s, "limit", 7))
    assert wall.monotonic() - start >= 0.45
    assert store.contended == 1
    start = wall.monotonic()
    assert store.update(lambda s: s.limit) == 7
    assert wall.monotonic() - start < 0.45  # not waited for again
    assert store.contended == 2
    fcntl.flock(holder, fcntl.LOCK_UN)
    store.update(lambda s: None)
    assert store.contended == 2  # free again: locked as usual
    os.close(holder)
    store.close()


def test_a_budget_file_is_named_by_a_hash_never_the_key(tmp_path: Path) -> None:
    key = "ak_live_s3cr3tK3yS3cr3t"
    key_id = budget_key_id("https://api.allo.test", key)
    assert key not in key_id
    assert key_id != budget_key_id("http://127.0.0.1:8001", key)  # a sandbox is another budget
    with pytest.raises(ValueError, match="never the key"):
        SharedBudget(key, 5.0, state_dir=tmp_path)
    budget = SharedBudget(key_id, 5.0, state_dir=tmp_path / "state")
    assert budget.shared
    assert budget.state_path is not None
    assert key not in budget.state_path.read_bytes().decode("latin-1")
    # The record's format is in the name: an older allo-batch's file on the key is another.
    assert budget.state_path.name == f"{key_id}.t5.budget" == budget_file_name(key_id)
    budget.close()
    budget.pause_for(1.0)  # after close: in memory, never a reused file descriptor


def test_the_state_is_private_to_the_user(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    store = FileStore(folder, "ab" * 16)
    store.update(lambda s: None)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    store.close()
    os.chmod(store.path, 0o644)  # a umask or a user widened it: tightened again
    FileStore(folder, "ab" * 16).close()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_symlinks_are_refused(tmp_path: Path) -> None:
    """Another local user could point a symlink at a file of ours, or at a folder they read."""
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BudgetStateError, match="symlink"):
        FileStore(tmp_path / "state", "cd" * 16)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (real / budget_file_name("ef" * 16)).symlink_to(tmp_path / "victim")
    with pytest.raises(BudgetStateError, match="symlink"):
        FileStore(real, "ef" * 16)
    assert not (tmp_path / "victim").exists()


def test_an_unusable_state_leaves_the_run_with_a_budget_of_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        budget = SharedBudget("12" * 16, 5.0, state_dir=blocker)
    assert not budget.shared
    assert "not shared" in caplog.text
    assert not SharedBudget("12" * 16, 5.0, share=False).shared


def test_the_state_folder_is_the_users_runtime_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert state_directory() == Path("/run/user/1234/allo-batch")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert state_directory().name == f"allo-batch-{os.getuid()}"


def test_two_pacers_on_one_file_interleave_at_the_combined_rate(tmp_path: Path) -> None:
    """Two budgets on one file (two processes) take turns: 5/s together, not 10/s."""
    time = VirtualTime(1000.0)
    key_id = "0f" * 16
    budgets = [
        SharedBudget(
            key_id, 5.0, jitter=0.0, state_dir=tmp_path, clock=time.clock, sleep=time.sleep
        )
        for _ in range(2)
    ]
    granted: list[tuple[int, float]] = []

    async def take(number: int) -> None:
        for _ in range(5):
            await budgets[number].acquire()
            granted.append((number, round(time.now - 1000.0, 6)))

    async def main() -> None:
        tasks = [asyncio.ensure_future(take(n)) for n in (0, 1)]
        await time.run_until(lambda: len(granted) == 10, 10.0)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    # Evenly spaced, the margin always covers the 2 ms by which a late timer is caught up.
    assert [when for _, when in granted] == [round(n * 1.002 / 5, 6) for n in range(10)]
    assert Counter(number for number, _ in granted) == {0: 5, 1: 5}
    for budget in budgets:
        budget.close()


def test_two_budgets_on_one_file_share_everything_they_learn(tmp_path: Path) -> None:
    """Fixed windows proved, a pause, a slow-down: one process learns, the other knows."""
    time = VirtualTime()
    server = Server(time, "fixed", 20)
    key_id = "77" * 16
    budgets = [
        SharedBudget(key_id, 20, state_dir=tmp_path, clock=time.clock, sleep=time.sleep)
        for _ in range(2)
    ]
    spread = random.Random(1)
    both = [Client(b, WindowWatch(b, jitter=lambda: spread.uniform(0, 0.05)), 100) for b in budgets]
    simulate(server, both, Net((0.005, 0.015)), workers=9)
    assert server.refused == 0
    assert achieved(both[0].sent + both[1].sent) / 20 >= 0.98
    assert budgets[0].fixed_windows and budgets[1].fixed_windows
    budgets[0].slow_down()
    assert budgets[1].rate == pytest.approx(16.0)
    budgets[0].pause_for(30.0)
    assert budgets[1].state_path is not None
    state = decode(budgets[1].state_path.read_bytes())
    assert state is not None
    assert state.paused_until == pytest.approx(time.now + 30.0)
    for budget in budgets:
        budget.close()


# -- end to end, against the sandbox on 127.0.0.1 -----------------------------------------------

KEY = "ak_budget_e2e"


@dataclass
class Run:
    """One allo-batch process's sending, as the pipeline wires it."""

    results: list[RowResult] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    requests: int = 0
    rate_limited: int = 0

    def sending(self, request: PlannedRequest, request_id: str) -> None:
        pass

    def finished(self, result: RowResult) -> None:
        self.results.append(result)


def send_rows(base_url: str, rows: range, budget: Pacer, *, workers: int, run: Run) -> None:
    """Send ``rows`` through the sender with ``budget`` (in the calling thread's own loop)."""

    async def go() -> None:
        async with http_lanes(workers=workers, timeout=10) as lanes:
            client = AlloClient(lanes, base_url, Secret(KEY))
            await client.me()  # as the run's preflight: it also settles the Authorization form
            sender = Sender(client, budget, run, policy=RetryPolicy(), watch=WindowWatch(budget))
            send, receive = anyio.create_memory_object_stream[PlannedRequest](workers * 4)
            with anyio.fail_after(60):
                async with anyio.create_task_group() as group:
                    group.start_soon(sender.run, receive, workers)
                    async with send:
                        for row in rows:
                            body = f'{{"content": "row {row}"}}'.encode()
                            await send.send(
                                PlannedRequest(row, f"cll-{row:09d}", None, "0" * 64, body)
                            )
            run.first, run.last = sender.stats.first_dispatch, sender.stats.last_dispatch
            run.requests, run.rate_limited = sender.stats.requests, sender.stats.rate_limited

    anyio.run(go)


def in_threads(*jobs: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # surfaced in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)


def side_by_side(base_url: str, rows: int, budgets: list[SharedBudget]) -> list[Run]:
    """One run per budget at once, each in its own thread and loop, ``rows`` rows each (the
    n-th run's are rows n * rows onwards); the budgets are closed after."""
    runs = [Run() for _ in budgets]
    in_threads(
        *(
            lambda n=n: send_rows(
                base_url, range(n * rows, (n + 1) * rows), budgets[n], workers=9, run=runs[n]
            )
            for n in range(len(budgets))
        )
    )
    for budget in budgets:
        budget.close()
    return runs


def world(rows: int, rate: int) -> Any:
    pairs: list[tuple[str, str | None]] = [(f"cll-{row:09d}", None) for row in range(rows)]
    return build_world(seed_pairs=pairs, api_key=KEY, write_rate=rate)


def combined_rate(*runs: Run) -> float:
    requests = sum(run.requests for run in runs)
    first = min(run.first for run in runs if run.first is not None)
    last = max(run.last for run in runs if run.last is not None)
    return (requests - 1) / (last - first)


@pytest.mark.slow
@pytest.mark.parametrize("persona", ["documented", "secondhand"])
def test_one_run_with_jittery_latency_gets_no_429(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str
) -> None:
    """50 ± 20 ms of latency on fixed (documented) and sliding (secondhand) windows."""
    with sandbox_factory(
        world(60, 20), api_key=KEY, faults="latency=50ms,jitter=20ms", persona=persona
    ) as sandbox:
        run = Run()
        budget = SharedBudget(budget_key_id(sandbox.base_url, KEY), 20.0, state_dir=tmp_path)
        send_rows(sandbox.base_url, range(60), budget, workers=9, run=run)
        budget.close()
        counters = sandbox.state()["counters"]
    assert [r.status for r in run.results] == ["updated"] * 60
    assert counters.get("rate_limited", 0) == 0
    assert combined_rate(run) >= 0.85 * 20


@contextlib.contextmanager
def busy_thread(busy: bool) -> Iterator[None]:
    """A thread of this process that never waits: it holds the GIL whenever it can, so every
    other thread (the runs, the sandbox) gets it back only every few milliseconds, and a holder
    of the budget's lock keeps it for tens of them (as leftover threads late in a test suite
    did, and as a loaded machine does to a process)."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=spin, daemon=True)
    if busy:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if busy:
            thread.join(5)


@pytest.mark.slow
@pytest.mark.parametrize("busy", [False, True], ids=["", "with a busy thread"])
def test_two_runs_sharing_a_key_share_its_budget(
    sandbox_factory: SandboxFactory, tmp_path: Path, busy: bool
) -> None:
    """Two runs at once with one key and one state folder: the limit together, no 429; none
    either when a busy thread starves both of them and the sandbox."""
    rows, limit = 60, 20
    with (
        busy_thread(busy),
        sandbox_factory(
            world(2 * rows, limit), api_key=KEY, faults="latency=20ms,jitter=10ms"
        ) as sandbox,
    ):
        key_id = budget_key_id(sandbox.base_url, KEY)
        budgets = [SharedBudget(key_id, limit, state_dir=tmp_path) for _ in (0, 1)]
        runs = side_by_side(sandbox.base_url, rows, budgets)
        counters = sandbox.state()["counters"]
    assert all(r.status == "updated" for run in runs for r in run.results)
    assert sum(len(run.results) for run in runs) == 2 * rows
    assert counters.get("rate_limited", 0) == 0
    if not busy:  # (a starved run is slower, which is no fault of the pacer)
        assert combined_rate(*runs) >= 0.9 * limit


@pytest.mark.slow
def test_two_runs_that_cannot_see_each_other_rarely_meet_a_429(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Two runs with one key and different state folders (as on two machines): they meet
    through the headers; a 429 is rare, absorbed, and every row lands."""
    rows, limit = 150, 50
    with sandbox_factory(
        world(2 * rows, limit), api_key=KEY, faults="latency=20ms,jitter=10ms"
    ) as sandbox:
        key_id = budget_key_id(sandbox.base_url, KEY)
        budgets = [SharedBudget(key_id, limit, state_dir=tmp_path / str(n)) for n in (0, 1)]
        runs = side_by_side(sandbox.base_url, rows, budgets)
        counters = sandbox.state()["counters"]
    assert all(r.status == "updated" for run in runs for r in run.results)
    assert sum(len(run.results) for run in runs) == 2 * rows
    assert counters.get("rate_limited", 0) <= 0.01 * sum(run.requests for run in runs)
