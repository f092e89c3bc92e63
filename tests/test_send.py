"""The sender on its own: retries, 429s, stops, the breaker by time, backoff, all against
``httpx.MockTransport`` with an injected clock and sleep (no real waiting, no monkeypatching)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from allo_batch.client import AlloClient
from allo_batch.config import RetryPolicy, Secret
from allo_batch.errors import (
    ApiUnavailableError,
    AuthRefusedError,
    InterruptedRunError,
    TooManyErrorsError,
)
from allo_batch.look import ReadStoppedError
from allo_batch.models import PlannedRequest, RowResult
from allo_batch.ratelimit import Pacer
from allo_batch.send import Sender

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeTime:
    """A clock that only moves when the sender sleeps."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


@dataclass
class Recorded:
    """Stands in for the recorder: what the sender reported, in order."""

    sent: list[tuple[int, str]] = field(default_factory=list)
    results: list[RowResult] = field(default_factory=list)

    def sending(self, request: PlannedRequest, request_id: str) -> None:
        self.sent.append((request.row, request_id))

    def finished(self, result: RowResult) -> None:
        self.results.append(result)


def ok(version: int = 2) -> httpx.Response:
    body = {"data": {"id": "cll-1", "content": "x", "version": version, "updated_at": "t"}}
    return httpx.Response(200, json=body)


def envelope(status: int, code: str, *, retryable: bool | None = None) -> httpx.Response:
    error: dict[str, Any] = {"type": "x", "code": code, "message": "m", "request_id": "req_x"}
    if retryable is not None:
        error["retryable"] = retryable
    return httpx.Response(status, json={"error": error})


def scripted(*answers: httpx.Response | type[Exception]) -> tuple[Handler, list[str]]:
    """A handler that gives ``answers`` in order (an exception class is raised), then 200s."""
    queue: Iterator[httpx.Response | type[Exception]] = iter(answers)
    paths: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        answer = next(queue, None)
        if answer is None:
            return ok()
        if isinstance(answer, type):
            raise answer("boom", request=request)  # type: ignore[call-arg]
        return answer

    return handle, paths


def request(row: int = 0) -> PlannedRequest:
    return PlannedRequest(row, f"cll-{row}", None, "0" * 64, b'{"content":"x"}')


def run_sender(
    handler: Handler,
    rows: list[PlannedRequest],
    *,
    policy: RetryPolicy | None = None,
    max_errors: int | None = None,
    time: FakeTime | None = None,
) -> tuple[Sender, Recorded, FakeTime]:
    """Send ``rows`` one after another through one worker's path and collect the outcomes."""
    time = time or FakeTime()
    recorded = Recorded()

    async def go() -> Sender:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = AlloClient(http, "http://127.0.0.1:9", Secret("ak_send_test"))
            sender = Sender(
                client,
                Pacer(1e6),
                recorded,
                policy=policy or RetryPolicy(),
                max_errors=max_errors,
                clock=time.clock,
                sleep=time.sleep,
            )
            for row in rows:
                recorded.finished(await sender.send(row))
            return sender

    return anyio.run(go), recorded, time


def test_a_landed_row_is_updated_after_one_request_journaled_first() -> None:
    """The recorder hears of the request before the answer, and of the outcome after it."""
    sender, recorded, _ = run_sender(scripted()[0], [request(7)])
    [result] = recorded.results
    assert (result.status, result.version, result.attempts) == ("updated", 2, 1)
    assert recorded.sent[0][0] == 7
    assert sender.stats.requests == 1


def test_transient_errors_are_retried_with_growing_jittered_backoff() -> None:
    """A 500 (retryable) twice, then success: three requests, pauses in [b/2, b], [b, 2b]."""
    handler, paths = scripted(
        envelope(500, "INTERNAL_SERVER_ERROR", retryable=True),
        envelope(500, "INTERNAL_SERVER_ERROR", retryable=True),
    )
    _, recorded, time = run_sender(handler, [request(0), request(1)])
    assert [r.status for r in recorded.results] == ["updated", "updated"]
    assert recorded.results[0].attempts == 3
    first, second = time.sleeps
    assert 0.25 <= first <= 0.5
    assert 0.5 <= second <= 1.0
    assert len(paths) == 4


def test_an_explicit_retryable_false_fails_the_row_at_once() -> None:
    """The API said a retry cannot succeed: one request, the row failed with its code."""
    handler, paths = scripted(envelope(404, "CONVERSATION_ITEM_NOT_FOUND", retryable=False))
    _, recorded, time = run_sender(handler, [request()])
    [result] = recorded.results
    assert (result.status, result.error_code, result.attempts) == (
        "failed",
        "CONVERSATION_ITEM_NOT_FOUND",
        1,
    )
    assert len(paths) == 1
    assert time.sleeps == []


def test_a_row_that_keeps_failing_while_others_land_fails_after_max_attempts() -> None:
    """A poison row is not mistaken for an outage when the API serves the other rows."""
    poison = request(0)
    healthy = request(1)
    attempts = {"poison": 0}

    def handle(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/cll-0/summary"):
            attempts["poison"] += 1
            return envelope(500, "INTERNAL_SERVER_ERROR")
        return ok()

    recorded = Recorded()
    time = FakeTime()

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
            client = AlloClient(http, "http://127.0.0.1:9", Secret("ak_send_test"))
            sender = Sender(
                client,
                Pacer(1e6),
                recorded,
                policy=RetryPolicy(max_attempts=3),
                clock=time.clock,
                sleep=time.sleep,
            )
            async with anyio.create_task_group() as group:
                group.start_soon(lambda: _send_into(sender, poison, recorded))
                for _ in range(10):
                    await _send_into(sender, healthy, recorded)

    anyio.run(go)
    failed = [r for r in recorded.results if r.row == 0]
    assert failed[0].status == "failed"
    assert attempts["poison"] == 3


async def _send_into(sender: Sender, row: PlannedRequest, recorded: Recorded) -> None:
    recorded.finished(await sender.send(row))


def test_429_is_never_a_row_failure_and_honours_retry_after() -> None:
    """Three 429s then success: the row lands; the 429s are counted, not its attempts' limit."""
    slow = httpx.Response(
        429,
        headers={"Retry-After": "0.01"},
        json={"error": {"code": "RATE_LIMIT_EXCEEDED", "retryable": True}},
    )
    handler, paths = scripted(slow, slow, slow)
    sender, recorded, _ = run_sender(handler, [request()], policy=RetryPolicy(max_attempts=1))
    assert recorded.results[0].status == "updated"
    assert sender.stats.rate_limited == 3
    assert len(paths) == 4


def test_a_refused_key_stops_the_run_and_later_rows_are_not_sent() -> None:
    """401: the row is failed (retryable: a new key fixes it), the run stops, the next row is
    not sent at all."""
    handler, paths = scripted(envelope(401, "API_KEY_REVOKED"))
    sender, recorded, _ = run_sender(handler, [request(0), request(1)])
    assert isinstance(sender.stop_error, AuthRefusedError)
    assert [(r.status, r.retryable) for r in recorded.results] == [
        ("failed", True),
        ("not_sent", True),
    ]
    assert recorded.results[1].reason == "stopped"
    assert len(paths) == 1


def test_max_errors_stops_after_that_many_failed_rows() -> None:
    """--max-errors 2: two failed rows, then the run stops and the third is not sent."""
    bad = envelope(400, "SUMMARY_TEMPLATE_KEY_REQUIRED", retryable=False)
    handler, paths = scripted(bad, bad, bad)
    sender, recorded, _ = run_sender(handler, [request(0), request(1), request(2)], max_errors=2)
    assert isinstance(sender.stop_error, TooManyErrorsError)
    assert "2 rows failed" in sender.stop_error.message
    assert [r.status for r in recorded.results] == ["failed", "failed", "not_sent"]
    assert len(paths) == 2


@pytest.mark.parametrize("failure", [httpx.ConnectError, httpx.ReadTimeout])
def test_an_outage_shorter_than_max_outage_is_ridden_out(failure: type[Exception]) -> None:
    """Twelve failures in a row (past max_attempts 5), for about 60 s of the injected clock:
    the row waits for the API instead of failing, pauses never exceed the outage cap."""
    handler, paths = scripted(*[failure] * 12)
    policy = RetryPolicy(max_attempts=5, max_outage=300.0, outage_backoff_max=10.0)
    sender, recorded, time = run_sender(handler, [request()], policy=policy)
    [result] = recorded.results
    assert result.status == "updated"
    assert result.attempts == len(paths) == 13
    assert sender.stop_error is None
    assert max(time.sleeps) <= 10.0
    assert sender.unreachable_for() is None  # cleared by the success


def test_an_outage_longer_than_max_outage_stops_the_run_with_exit_3() -> None:
    """Failing continuously past --max-outage: the run stops (exit 3); the row is not sent."""
    handler, _ = scripted(*[httpx.ConnectError] * 1000)
    policy = RetryPolicy(max_outage=60.0, outage_backoff_max=10.0)
    sender, recorded, time = run_sender(handler, [request(0), request(1)], policy=policy)
    assert isinstance(sender.stop_error, ApiUnavailableError)
    assert sender.stop_error.exit_code == 3
    assert "unreachable for" in sender.stop_error.message
    assert [r.status for r in recorded.results] == ["not_sent", "not_sent"]
    assert 60.0 <= time.now - 1000.0 <= 80.0


def test_a_stop_wakes_rows_waiting_to_retry() -> None:
    """A row sleeping before its next try gives up at once when the run stops."""
    handler, _ = scripted(*[envelope(503, "HTTP_503")] * 5)
    recorded = Recorded()

    async def forever(seconds: float) -> None:
        await anyio.sleep_forever()

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = AlloClient(http, "http://127.0.0.1:9", Secret("ak_send_test"))
            sender = Sender(client, Pacer(1e6), recorded, policy=RetryPolicy(), sleep=forever)
            with anyio.fail_after(5):
                async with anyio.create_task_group() as group:
                    group.start_soon(_send_into, sender, request(), recorded)
                    await anyio.wait_all_tasks_blocked()
                    sender.stop(ApiUnavailableError("test stop"))

    anyio.run(go)
    assert [r.status for r in recorded.results] == ["not_sent"]


@pytest.mark.parametrize("what", ["write", "read"])
def test_a_stop_wakes_rows_waiting_for_a_permit(what: str) -> None:
    """At a low rate a permit can be minutes away: SIGTERM (a stop) must not wait it out. The
    first row lands at once; the next, waiting for its permit, is not sent; a read waiting for
    one gives up."""
    handler, paths = scripted()
    recorded = Recorded()

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = AlloClient(http, "http://127.0.0.1:9", Secret("ak_send_test"))
            sender = Sender(client, Pacer(0.001), recorded, policy=RetryPolicy())
            with anyio.fail_after(5):
                await _send_into(sender, request(0), recorded)
                async with anyio.create_task_group() as group:
                    if what == "write":
                        group.start_soon(_send_into, sender, request(1), recorded)
                    else:
                        group.start_soon(_read_stopped, sender)
                    await anyio.wait_all_tasks_blocked()
                    sender.stop(InterruptedRunError("interrupted by SIGTERM"))

    anyio.run(go)
    assert len(paths) == 1
    if what == "write":
        assert [r.status for r in recorded.results] == ["updated", "not_sent"]
        stopped = "not sent: the run stopped (interrupted by SIGTERM)"
        assert recorded.results[1].message == stopped


@pytest.mark.parametrize("signals", [1, 2])
def test_a_stop_cuts_off_a_batch_read_in_flight(signals: int) -> None:
    """A batch read that hangs (a stalled API) held a stopped run for its whole timeout (30 s
    by default: under Airflow, SIGTERM then a kill). It is in flight like a write: one signal
    cuts it off when the grace period ends, a second at once."""
    grace = 1.0

    async def stalled(request: httpx.Request) -> httpx.Response:
        await anyio.sleep_forever()
        raise AssertionError  # never reached

    async def go() -> float:
        transport = httpx.MockTransport(stalled)
        async with httpx.AsyncClient(transport=transport) as http:
            client = AlloClient(http, "http://127.0.0.1:9", Secret("ak_send_test"))
            sender = Sender(client, Pacer(1e6), Recorded(), policy=RetryPolicy())
            ended: list[float] = []

            async def read() -> None:
                await _read_stopped(sender)
                ended.append(anyio.current_time())

            with anyio.fail_after(10):
                async with anyio.create_task_group() as group:
                    group.start_soon(read)
                    group.start_soon(sender.enforce_grace)
                    await anyio.wait_all_tasks_blocked()
                    started = anyio.current_time()
                    sender.stop(InterruptedRunError("interrupted by SIGTERM"), grace=grace)
                    if signals == 2:
                        sender.cancel_in_flight()
            return ended[0] - started

    took = anyio.run(go)
    if signals == 1:
        assert grace <= took < grace + 3.0
    else:
        assert took < grace


async def _read_stopped(sender: Sender) -> None:
    with pytest.raises(ReadStoppedError):
        await sender.read_items(["cll-1"], lane=0)


def test_a_batch_read_is_retried_on_a_5xx_whatever_its_retryable_flag() -> None:
    """A read changes nothing, so a 500 that says `retryable: false` is still retried (a PATCH
    with that answer fails its row; a read must not stop the whole run)."""
    items = httpx.Response(200, json={"data": [{"id": "cll-1", "summary": "x"}]})
    handler, paths = scripted(envelope(500, "INTERNAL_SERVER_ERROR", retryable=False), items)
    time = FakeTime()

    async def go() -> Any:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = AlloClient(http, "http://127.0.0.1:9", Secret("ak_send_test"))
            sender = Sender(
                client,
                Pacer(1e6),
                Recorded(),
                policy=RetryPolicy(),
                clock=time.clock,
                sleep=time.sleep,
            )
            return await sender.read_items(["cll-1"], lane=0)

    answer = anyio.run(go)
    assert answer.kind == "ok"
    assert len(paths) == 2
