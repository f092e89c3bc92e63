"""Sending: a fixed pool of workers reads one bounded stream of planned requests (DESIGN §1, §5).

Each worker takes a permit from the shared pacer right before it writes a request, retries what
can succeed (429, 5xx, timeouts, dropped connections, ``retryable: true``) with capped, jittered
exponential backoff (``Retry-After`` wins), and reports each row's outcome to the recorder.
A 429 is never a row failure: the pacer pauses and slows, and the row waits its turn.

Outages are judged by time, not by a count of fast failures: while no request has succeeded
since the first failure and that is less than ``max_outage`` seconds ago, failures that say
"unreachable" (connection errors, timeouts, gateway pages, 5xx) do not use up a row's attempts;
the row waits with capped backoff. Past ``max_outage`` the run stops (exit 3).

A stop (401/403, ``--max-errors``, an outage, a signal) ends sending but never drops a row:
queued rows become ``not_sent``; requests in flight get a grace period, then are cancelled and
recorded ``not_sent`` (they may have landed; resending is safe).
"""

from __future__ import annotations

import random
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from allo_batch.client import AlloClient, Answer, new_request_id
from allo_batch.config import RetryPolicy
from allo_batch.errors import (
    AlloBatchError,
    ApiUnavailableError,
    AuthRefusedError,
    TooManyErrorsError,
)
from allo_batch.models import PlannedRequest, Reason, RowResult
from allo_batch.ratelimit import Pacer, WindowWatch, wait_retry_after

Sleep = Callable[[float], Awaitable[None]]
DEFAULT_GRACE = 5.0


class Outcomes(Protocol):
    """What the sender reports to: the recorder (``record.Recorder``)."""

    def sending(self, request: PlannedRequest, request_id: str) -> None:
        """A request for ``request`` is about to go out (recorded before it does)."""

    def finished(self, result: RowResult) -> None:
        """A sent row's final outcome for this run."""


class Timeline:
    """Per-second figures of the requests (kept for the run report, so its plots are true):
    requests, landed rows, 429s, errors by code and latency percentiles, one bucket a second.

    Buckets are merged two by two once there are more than ``max_buckets``, so a week-long run
    keeps a bounded, evenly spaced history.
    """

    def __init__(self, *, max_buckets: int = 2048) -> None:
        self.width = 1.0
        self._max = max_buckets
        self._start: float | None = None
        self._buckets: dict[int, dict[str, Any]] = {}

    def add(self, now: float, answer: Answer) -> None:
        """Count one answer (or transport failure) at ``now`` (monotonic seconds)."""
        if self._start is None:
            self._start = now
        index = int((now - self._start) / self.width)
        bucket = self._buckets.get(index)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._halve()
                index = int((now - self._start) / self.width)
            bucket = self._buckets.setdefault(
                index, {"requests": 0, "ok": 0, "rate_limited": 0, "errors": {}, "latency": []}
            )
        bucket["requests"] += 1
        if answer.kind == "ok":
            bucket["ok"] += 1
        elif answer.http_status == 429:
            bucket["rate_limited"] += 1
        else:
            code = answer.error_code or "UNKNOWN"
            bucket["errors"][code] = bucket["errors"].get(code, 0) + 1
        if answer.kind != "transport":
            bucket["latency"].append(answer.latency)

    def _halve(self) -> None:
        merged: dict[int, dict[str, Any]] = {}
        for index, bucket in sorted(self._buckets.items()):
            into = merged.setdefault(
                index // 2, {"requests": 0, "ok": 0, "rate_limited": 0, "errors": {}, "latency": []}
            )
            for name in ("requests", "ok", "rate_limited"):
                into[name] += bucket[name]
            for code, count in bucket["errors"].items():
                into["errors"][code] = into["errors"].get(code, 0) + count
            into["latency"].extend(bucket["latency"])
        self._buckets = merged
        self.width *= 2

    def as_dict(self) -> dict[str, Any]:
        """The JSON form kept in the run's sidecar (``timeline``)."""
        rows = []
        for index, bucket in sorted(self._buckets.items()):
            ordered = sorted(bucket["latency"])
            rows.append(
                {
                    "t": round(index * self.width, 3),
                    "requests": bucket["requests"],
                    "ok": bucket["ok"],
                    "rate_limited": bucket["rate_limited"],
                    "errors": bucket["errors"],
                    "latency_ms": [percentile_ms(ordered, q) for q in (0.5, 0.95, 0.99)],
                }
            )
        return {"bucket_seconds": self.width, "buckets": rows}


def percentile_ms(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted seconds, in milliseconds: a value that occurred (the one
    at rank ``q * n``), so a higher ``q`` never gives less, whatever ``n``."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


@dataclass(slots=True)
class SendStats:
    """Counters the reporter reads while the run goes."""

    requests: int = 0
    reads: int = 0
    rate_limited: int = 0
    failed_rows: int = 0
    first_dispatch: float | None = None
    last_dispatch: float | None = None
    latencies: array[float] = field(default_factory=lambda: array("d"))
    timeline: Timeline = field(default_factory=Timeline)

    def achieved_rate(self) -> float | None:
        """Requests per second between the first and the last dispatch."""
        if self.first_dispatch is None or self.last_dispatch is None or self.requests < 2:
            return None
        span = self.last_dispatch - self.first_dispatch
        return (self.requests - 1) / span if span > 0 else None


class Sender:
    """Owns the workers, the retry policy and the decision to stop."""

    def __init__(
        self,
        client: AlloClient,
        pacer: Pacer,
        outcomes: Outcomes,
        *,
        policy: RetryPolicy,
        max_errors: int | None = None,
        watch: WindowWatch | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self._client = client
        self._pacer = pacer
        self._outcomes = outcomes
        self._policy = policy
        self._max_errors = max_errors
        self._watch = watch
        self._clock = clock
        self._sleep = sleep
        self.stats = SendStats()
        self.stop_error: AlloBatchError | None = None
        self.grace = DEFAULT_GRACE
        self._stopping = anyio.Event()
        self._in_flight: set[anyio.CancelScope] = set()
        self._waiting: set[anyio.CancelScope] = set()
        self._failing_since: float | None = None
        self._successes = 0

    @property
    def stopping(self) -> bool:
        """Whether sending has been told to stop."""
        return self._stopping.is_set()

    def stop(self, error: AlloBatchError, *, grace: float = DEFAULT_GRACE) -> None:
        """Stop taking rows; requests in flight may finish for ``grace`` more seconds
        (:meth:`enforce_grace` cancels them then; 0 cancels them now)."""
        if self.stop_error is None:
            self.stop_error = error
        self.grace = min(self.grace, grace) if self.stopping else grace
        self._stopping.set()
        for scope in list(self._waiting):
            scope.cancel()  # rows waiting to retry give up at once
        if grace <= 0:
            self.cancel_in_flight()

    async def enforce_grace(self) -> None:
        """Once stopping, cancel whatever is still in flight after the grace period."""
        await self._stopping.wait()
        await self._wait(self.grace, interruptible=False)
        self.cancel_in_flight()

    def cancel_in_flight(self) -> None:
        """Cancel every request now in flight (their rows become not_sent)."""
        for scope in list(self._in_flight):
            scope.cancel()

    def unreachable_for(self) -> float | None:
        """Seconds the API has been failing with no success in between, or None."""
        if self._failing_since is None:
            return None
        return self._clock() - self._failing_since

    def stop_message(self) -> str:
        """The ``message`` of rows left unsent by the stop."""
        reason = self.stop_error.message if self.stop_error else "stopped"
        return f"not sent: the run stopped ({reason})"

    async def run(self, stream: MemoryObjectReceiveStream[PlannedRequest], workers: int) -> None:
        """Run ``workers`` workers until the stream is closed and drained."""
        async with stream, anyio.create_task_group() as group:
            for lane in range(workers):
                group.start_soon(self._worker, stream.clone(), lane)

    async def _worker(self, stream: MemoryObjectReceiveStream[PlannedRequest], lane: int) -> None:
        async with stream:
            async for request in stream:
                self._outcomes.finished(await self.send(request, lane))

    async def send(self, request: PlannedRequest, lane: int = 0) -> RowResult:
        """Send one row until it lands, fails for good, or the run stops."""
        attempts = failures = rate_limited = 0
        successes_at_first_failure = 0
        last: Answer | None = None
        while True:
            if not await self._permit():
                return not_sent(request, self.stop_message(), attempts, last)
            answer = await self._dispatch(request, lane)
            if answer is None:
                message = "stopped while in flight; may have landed"
                return not_sent(request, message, attempts + 1, last, reason="in_flight")
            attempts += 1
            last = answer
            if answer.kind == "ok":
                self._successes += 1
                self._failing_since = None
                return _result(request, attempts, answer)
            if answer.http_status == 429:
                self.stats.rate_limited += 1
                rate_limited += 1
                if rate_limited > self._policy.max_rate_limited:
                    return self._failed(request, attempts, answer)
                await wait_retry_after(self._pacer, answer.retry_after or 1.0)
                continue
            if answer.http_status in (401, 403):
                self.stop(AuthRefusedError(_auth_message(answer)), grace=0)
                return _result(request, attempts, answer, retryable=True)
            if not answer.retryable:
                self._failing_since = None  # the API answered, and meant it
                return self._failed(request, attempts, answer)
            failures += 1
            if failures == 1:
                successes_at_first_failure = self._successes
            # Nothing has landed since this row first failed and the API looks down: the
            # failures say nothing about the row, so it waits for the API instead of failing.
            api_down = _unreachable(answer) and self._successes == successes_at_first_failure
            if api_down:
                self._note_outage(answer)
            elif failures >= self._policy.max_attempts:
                return self._failed(request, attempts, answer)
            await self._backoff(failures, answer, api_down=api_down)

    def _note_outage(self, answer: Answer) -> None:
        """Start or continue the outage clock; past ``max_outage`` stop the run."""
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        down = now - self._failing_since
        if down >= self._policy.max_outage:
            self.stop(
                ApiUnavailableError(
                    f"the API has been unreachable for {down:.0f} s "
                    f"(--max-outage {self._policy.max_outage:g}); last: {answer.error_code}"
                )
            )

    async def read_items(self, ids: Sequence[str], *, lane: int) -> Answer:
        """A batch read, paced like a write and retried like one (429s, outages).

        Reads take their permit from the write pacer: whichever bucket the API counts them
        against (UNKNOWN), they then never push a write into a 429, and at one read per 100 rows
        they cost about 1 % of the write budget. Raises ``ReadStoppedError`` once the run stops.
        """
        from allo_batch.look import ReadStoppedError

        failures = 0
        while True:
            if not await self._permit():
                raise ReadStoppedError
            answer = await self._read_in_flight(ids, lane)
            if answer is None:  # cut off: the run stopped and its grace ran out
                raise ReadStoppedError
            self.stats.reads += 1
            if answer.kind == "ok":
                self._successes += 1
                self._failing_since = None
                return answer
            if answer.http_status == 429:
                self.stats.rate_limited += 1
                await wait_retry_after(self._pacer, answer.retry_after or 1.0)
                continue
            if answer.http_status in (401, 403):
                self.stop(AuthRefusedError(_auth_message(answer, "batch read")), grace=0)
                raise ReadStoppedError
            if not answer.retryable and not _unreachable(answer):
                # A refusal (an unknown id narrows the batch): the look stage decides. A 5xx
                # is retried whatever its flag says: a read changes nothing, so it is safe.
                return answer
            failures += 1
            api_down = _unreachable(answer)
            if api_down:
                self._note_outage(answer)
            elif failures >= self._policy.max_attempts:
                self.stop(ApiUnavailableError(f"batch reads kept failing: {answer.error_code}"))
                raise ReadStoppedError
            await self._backoff(failures, answer, api_down=api_down)

    async def _read_in_flight(self, ids: Sequence[str], lane: int) -> Answer | None:
        """One batch read, in flight like a write: a stop's grace period, or a second signal,
        cuts it off (None). A stalled read held a stopped run for its whole timeout."""
        answer: Answer | None = None
        with anyio.CancelScope() as scope:
            self._in_flight.add(scope)
            try:
                answer = await self._client.read_items(ids, lane=lane)
            finally:
                self._in_flight.discard(scope)
        return answer

    async def _dispatch(self, request: PlannedRequest, lane: int) -> Answer | None:
        now = self._clock()
        if self.stats.first_dispatch is None:
            self.stats.first_dispatch = now
        self.stats.last_dispatch = now
        self.stats.requests += 1
        answer: Answer | None = None
        with anyio.CancelScope() as scope:
            self._in_flight.add(scope)
            try:
                request_id = new_request_id()
                self._outcomes.sending(request, request_id)
                answer = await self._client.update_summary(
                    request.call_id, request.body, request_id=request_id, lane=lane
                )
            finally:
                self._in_flight.discard(scope)
        if answer is None:
            return None
        self.stats.timeline.add(self._clock(), answer)
        if answer.kind != "transport":
            self.stats.latencies.append(answer.latency)
            if self._watch is not None:
                self._watch.observe(
                    sent_wall=answer.sent_wall,
                    received_wall=answer.received_wall,
                    limit=answer.limit,
                    remaining=answer.remaining,
                    reset=answer.reset,
                    date=answer.date,
                )
        return answer

    async def _backoff(self, failures: int, answer: Answer, *, api_down: bool) -> None:
        if answer.retry_after is not None:
            await self._wait(answer.retry_after)
            return
        policy = self._policy
        # While the API is down, cap the pause so that its return is noticed soon.
        cap = policy.outage_backoff_max if api_down else policy.backoff_max
        ceiling = min(cap, policy.backoff_initial * 2 ** (failures - 1))
        await self._wait(random.uniform(ceiling / 2, ceiling))

    async def _permit(self) -> bool:
        """Wait for the pacer's next permit; False once the run stops. A stop wakes a worker
        waiting for one: at a low rate (or behind a long pause) that wait can be minutes, and
        SIGTERM must not wait it out."""
        if self.stopping:
            return False
        with anyio.CancelScope() as scope:
            self._waiting.add(scope)
            try:
                await self._pacer.acquire()
            finally:
                self._waiting.discard(scope)
        return not self.stopping

    async def _wait(self, seconds: float, *, interruptible: bool = True) -> None:
        """Sleep with the injected sleep; a stop wakes every row waiting to retry."""
        if interruptible and self.stopping:
            return
        with anyio.CancelScope() as scope:
            if interruptible:
                self._waiting.add(scope)
            try:
                await self._sleep(seconds)
            finally:
                self._waiting.discard(scope)

    def _failed(self, request: PlannedRequest, attempts: int, answer: Answer) -> RowResult:
        self.stats.failed_rows += 1
        if self._max_errors is not None and self.stats.failed_rows >= self._max_errors:
            self.stop(
                TooManyErrorsError(
                    f"{self.stats.failed_rows} rows failed (--max-errors {self._max_errors})"
                )
            )
        return _result(request, attempts, answer)


def _unreachable(answer: Answer) -> bool:
    """An answer that says the API as a whole is down, not that this row is wrong."""
    status = answer.http_status
    return answer.kind == "transport" or (status is not None and status >= 500)


def _auth_message(answer: Answer, during: str = "") -> str:
    what = "refused the key" if answer.http_status == 401 else "refused the key's permissions"
    where = f" on a {during}" if during else ""
    return f"the API {what}{where}: {answer.error_code} (HTTP {answer.http_status})"


def _result(
    request: PlannedRequest, attempts: int, answer: Answer, *, retryable: bool | None = None
) -> RowResult:
    landed = answer.kind == "ok"
    return request.result(
        "updated" if landed else "failed",
        error_code=answer.error_code,
        retryable=answer.retryable if retryable is None else retryable,
        http_status=answer.http_status,
        version=answer.version,
        updated_at=answer.updated_at,
        attempts=attempts,
        request_id=answer.request_id,
        message=None if landed else answer.message,
    )


def not_sent(
    request: PlannedRequest,
    message: str,
    attempts: int = 0,
    last: Answer | None = None,
    *,
    reason: Reason = "stopped",
) -> RowResult:
    """A row the run did not (or not surely) deliver; a rerun sends it."""
    return request.result(
        "not_sent",
        error_code=last.error_code if last else None,
        retryable=True,
        http_status=last.http_status if last else None,
        attempts=attempts,
        request_id=last.request_id if last else None,
        message=message,
        reason=reason,
    )
