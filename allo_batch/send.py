"""Sending: a fixed pool of workers reads one bounded stream of planned requests (DESIGN §1, §5).

Each worker takes a permit from the shared pacer right before it writes a request, retries what
can succeed (429, 5xx, timeouts, dropped connections, ``retryable: true``) with capped, jittered
exponential backoff (``Retry-After`` wins), and turns the last answer into a :class:`RowResult`.
A 429 is never a row failure: the pacer pauses and slows, and the row waits its turn.

A stop (401/403, ``--max-errors``, a run of transient failures, a signal) ends sending but never
drops a row: queued rows become ``not_sent``; requests in flight get a grace period, then are
cancelled and recorded ``not_sent`` (they may have landed; resending is safe).
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

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
from allo_batch.models import PlannedRequest, RowResult
from allo_batch.ratelimit import Pacer, WindowWatch, wait_retry_after
from allo_batch.record import Journal

Emit = Callable[[RowResult], None]


@dataclass(slots=True)
class SendStats:
    """Counters the reporter reads while the run goes."""

    requests: int = 0
    rate_limited: int = 0
    failed_rows: int = 0
    consecutive_transient: int = 0
    first_dispatch: float | None = None
    last_dispatch: float | None = None
    latencies: array[float] = field(default_factory=lambda: array("d"))

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
        watch: WindowWatch,
        *,
        policy: RetryPolicy,
        journal: Journal,
        emit: Emit,
        max_errors: int | None,
        clock: Callable[[], float],
    ) -> None:
        self._client = client
        self._pacer = pacer
        self._watch = watch
        self._policy = policy
        self._journal = journal
        self._emit = emit
        self._max_errors = max_errors
        self._clock = clock
        self.stats = SendStats()
        self.stop_error: AlloBatchError | None = None
        self._stopping = anyio.Event()
        self._in_flight: set[anyio.CancelScope] = set()

    @property
    def stopping(self) -> bool:
        """Whether sending has been told to stop."""
        return self._stopping.is_set()

    def stop(self, error: AlloBatchError, *, grace: float) -> None:
        """Stop taking rows; cancel requests still in flight after ``grace`` seconds."""
        if self.stop_error is None:
            self.stop_error = error
        self._stopping.set()
        if grace <= 0:
            self.cancel_in_flight()

    async def wait_stopping(self) -> None:
        """Return once sending has been told to stop."""
        await self._stopping.wait()

    def stop_message(self) -> str:
        """The ``message`` of rows left unsent by the stop."""
        reason = self.stop_error.message if self.stop_error else "stopped"
        return f"not sent: the run stopped ({reason})"

    def cancel_in_flight(self) -> None:
        """Cancel every request now in flight (their rows become not_sent)."""
        for scope in list(self._in_flight):
            scope.cancel()

    async def run(self, stream: MemoryObjectReceiveStream[PlannedRequest], workers: int) -> None:
        """Run ``workers`` workers until the stream is closed and drained."""
        async with stream, anyio.create_task_group() as group:
            for lane in range(workers):
                group.start_soon(self._worker, stream.clone(), lane)

    async def _worker(self, stream: MemoryObjectReceiveStream[PlannedRequest], lane: int) -> None:
        async with stream:
            async for request in stream:
                self._emit(await self._send(request, lane))

    async def _send(self, request: PlannedRequest, lane: int = 0) -> RowResult:
        attempts = failures = rate_limited = 0
        last: Answer | None = None
        while True:
            if self.stopping:
                return _not_sent(request, attempts, last, self.stop_message())
            await self._pacer.acquire()
            if self.stopping:
                return _not_sent(request, attempts, last, self.stop_message())
            answer = await self._dispatch(request, lane)
            if answer is None:
                return _not_sent(
                    request, attempts + 1, last, "stopped while in flight; may have landed"
                )
            attempts += 1
            last = answer
            if answer.kind == "ok":
                self.stats.consecutive_transient = 0
                return _result(request, "updated", attempts, answer)
            if answer.http_status == 429:
                self.stats.rate_limited += 1
                rate_limited += 1
                if rate_limited > self._policy.max_rate_limited:
                    return self._failed(request, attempts, answer)
                await wait_retry_after(self._pacer, answer.retry_after or 1.0)
                continue
            if answer.http_status in (401, 403):
                self.stop(AuthRefusedError(_auth_message(answer)), grace=0)
                return _result(request, "failed", attempts, answer, retryable=True)
            if not answer.retryable:
                self.stats.consecutive_transient = 0
                return self._failed(request, attempts, answer)
            failures += 1
            self._note_transient()
            if failures >= self._policy.max_attempts:
                return self._failed(request, attempts, answer)
            await self._backoff(failures, answer.retry_after)

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
                self._journal.sent(
                    request.row,
                    request.call_id,
                    request.template_key,
                    request.content_sha256,
                    request_id,
                )
                answer = await self._client.update_summary(
                    request.call_id, request.body, request_id=request_id, lane=lane
                )
            finally:
                self._in_flight.discard(scope)
        if answer is None:
            return None
        if answer.kind != "transport":
            self.stats.latencies.append(answer.latency)
            self._watch.observe(
                sent_wall=answer.sent_wall,
                received_wall=answer.received_wall,
                limit=answer.limit,
                remaining=answer.remaining,
                reset=answer.reset,
                date=answer.date,
            )
        return answer

    async def _backoff(self, failures: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = retry_after
        else:
            ceiling = min(
                self._policy.backoff_max, self._policy.backoff_initial * 2 ** (failures - 1)
            )
            delay = random.uniform(ceiling / 2, ceiling)
        with anyio.move_on_after(delay):
            await self._stopping.wait()

    def _failed(self, request: PlannedRequest, attempts: int, answer: Answer) -> RowResult:
        self.stats.failed_rows += 1
        if self._max_errors is not None and self.stats.failed_rows >= self._max_errors:
            self.stop(
                TooManyErrorsError(
                    f"{self.stats.failed_rows} rows failed (--max-errors {self._max_errors})"
                ),
                grace=5.0,
            )
        return _result(request, "failed", attempts, answer)

    def _note_transient(self) -> None:
        self.stats.consecutive_transient += 1
        if self.stats.consecutive_transient >= self._policy.breaker_threshold:
            self.stop(
                ApiUnavailableError(
                    f"the API failed {self.stats.consecutive_transient} requests in a row "
                    "with transient errors"
                ),
                grace=5.0,
            )


def _auth_message(answer: Answer) -> str:
    what = "refused the key" if answer.http_status == 401 else "refused the key's permissions"
    return f"the API {what}: {answer.error_code} (HTTP {answer.http_status})"


def _result(
    request: PlannedRequest,
    status: str,
    attempts: int,
    answer: Answer,
    *,
    retryable: bool | None = None,
) -> RowResult:
    return RowResult(
        row=request.row,
        call_id=request.call_id,
        template_key=request.template_key,
        status="updated" if status == "updated" else "failed",
        content_sha256=request.content_sha256,
        error_code=answer.error_code,
        retryable=answer.retryable if retryable is None else retryable,
        http_status=answer.http_status,
        version=answer.version,
        updated_at=answer.updated_at,
        attempts=attempts,
        request_id=answer.request_id,
        message=answer.message if status != "updated" else None,
    )


def _not_sent(
    request: PlannedRequest, attempts: int, last: Answer | None, message: str
) -> RowResult:
    return RowResult(
        row=request.row,
        call_id=request.call_id,
        template_key=request.template_key,
        status="not_sent",
        content_sha256=request.content_sha256,
        error_code=last.error_code if last else None,
        retryable=True,
        http_status=last.http_status if last else None,
        attempts=attempts,
        request_id=last.request_id if last else None,
        message=message,
    )


def not_sent(request: PlannedRequest, sender: Sender | None) -> RowResult:
    """A planned row that was never handed to a worker."""
    message = sender.stop_message() if sender is not None else "not sent"
    return _not_sent(request, 0, None, message)
