"""The API client and the pacer, with httpx.MockTransport and an injected clock."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from allo_batch.client import AlloClient, make_http_client
from allo_batch.config import Secret
from allo_batch.ratelimit import Pacer, WindowWatch


def answer_for(handler: httpx.MockTransport) -> object:
    async def go() -> object:
        async with make_http_client(timeout=1, transport=handler) as http:
            return await AlloClient(http, "https://api.test", Secret("ak_k")).update_summary(
                "cll-1", b'{"content":"x"}'
            )

    return anyio.run(go)


def test_request_shape() -> None:
    """PATCH to the documented path, Api-Key auth, JSON content type, our X-Request-Id."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"data": {"id": "cll-1", "version": 7, "updated_at": "2026-05-12T14:32:11"}}
        )

    answer = answer_for(httpx.MockTransport(handler))
    [request] = seen
    assert request.method == "PATCH"
    assert request.url.path == "/v2/api/conversations/items/cll-1/summary"
    assert request.headers["Authorization"] == "Api-Key ak_k"
    assert request.headers["Content-Type"] == "application/json"
    assert answer.kind == "ok" and answer.version == 7  # type: ignore[attr-defined]
    assert answer.request_id == request.headers["X-Request-Id"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("response", "code", "retryable"),
    [
        pytest.param(
            httpx.Response(
                502, text="<html>bad gateway</html>", headers={"content-type": "text/html"}
            ),
            "HTTP_502",
            True,
            id="html-502",
        ),
        pytest.param(httpx.Response(404, text="nope"), "HTTP_404", False, id="plain-404"),
        pytest.param(
            httpx.Response(
                500, json={"error": {"code": "INTERNAL_SERVER_ERROR", "retryable": False}}
            ),
            "INTERNAL_SERVER_ERROR",
            True,
            id="500-always-retryable",
        ),
        pytest.param(
            httpx.Response(
                409, json={"error": {"code": "OTHER_TRANSACTION_IN_PROGRESS", "retryable": True}}
            ),
            "OTHER_TRANSACTION_IN_PROGRESS",
            True,
            id="envelope-retryable",
        ),
        pytest.param(
            httpx.Response(
                400, json={"error": {"code": "INVALID_REQUEST_BODY", "retryable": False}}
            ),
            "INVALID_REQUEST_BODY",
            False,
            id="400-final",
        ),
        pytest.param(
            httpx.Response(400, json={"code": "LEGACY", "details": []}),
            "LEGACY",
            False,
            id="v1-shape",
        ),
        pytest.param(httpx.Response(200, text="ok"), "HTTP_200", True, id="success-without-data"),
    ],
)
def test_answers_are_typed(response: httpx.Response, code: str, retryable: bool) -> None:
    """Every answer becomes a code and a retry decision; non-JSON pages become HTTP_<status>."""
    answer = answer_for(httpx.MockTransport(lambda _: response))
    assert (answer.error_code, answer.retryable) == (code, retryable)  # type: ignore[attr-defined]


def test_transport_errors_are_translated() -> None:
    """Timeouts and dropped connections become TIMEOUT / CONNECTION_ERROR, retryable."""

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def dropped(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed", request=request)

    assert answer_for(httpx.MockTransport(timeout)).error_code == "TIMEOUT"  # type: ignore[attr-defined]
    assert answer_for(httpx.MockTransport(dropped)).error_code == "CONNECTION_ERROR"  # type: ignore[attr-defined]


def test_retry_after_from_header_or_envelope() -> None:
    """A 429's wait comes from Retry-After, else retry_after_seconds."""
    body = json.dumps(
        {"error": {"code": "RATE_LIMIT_EXCEEDED", "retryable": True, "retry_after_seconds": 3}}
    )
    response = httpx.Response(
        429, content=body.encode(), headers={"content-type": "application/json"}
    )
    assert answer_for(httpx.MockTransport(lambda _: response)).retry_after == 3  # type: ignore[attr-defined]
    with_header = httpx.Response(
        429, content=body.encode(), headers={"content-type": "application/json", "Retry-After": "2"}
    )
    assert answer_for(httpx.MockTransport(lambda _: with_header)).retry_after == 2  # type: ignore[attr-defined]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pacer_spaces_permits_evenly_without_an_initial_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 5/s the permits come at 0, 0.2, 0.4 … seconds: no burst at the start."""
    clock = FakeClock()
    granted: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr("allo_batch.ratelimit.anyio.sleep", fake_sleep)

    async def go() -> None:
        pacer = Pacer(5.0, clock=clock)
        for _ in range(6):
            await pacer.acquire()
            granted.append(round(clock.now - 1000.0, 6))

    anyio.run(go)
    assert granted == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_pause_and_slowdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause holds the next permit back; a slowdown widens the spacing; it recovers."""
    clock = FakeClock()

    async def fake_sleep(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr("allo_batch.ratelimit.anyio.sleep", fake_sleep)

    async def go() -> list[float]:
        pacer = Pacer(10.0, clock=clock)
        await pacer.acquire()
        pacer.pause_for(2.0)
        await pacer.acquire()
        after_pause = clock.now - 1000.0
        pacer.slow_down()
        start = clock.now
        await pacer.acquire()
        return [after_pause, round(clock.now - start, 6), pacer.rate]

    after_pause, gap, rate = anyio.run(go)
    assert after_pause == pytest.approx(2.0)
    assert gap == pytest.approx(0.1)  # the permit already scheduled keeps its slot
    assert rate == pytest.approx(8.0)


def test_window_watch_pauses_only_when_another_client_spent_the_window() -> None:
    """Remaining 0 after our own 5th request of 5 is expected; after our 2nd it means sharing."""
    clock = FakeClock()
    pacer = Pacer(5.0, clock=clock)
    watch = WindowWatch(pacer, wall=lambda: 1_800_000_000.3, monotonic=clock, jitter=lambda: 0.0)
    for remaining in (4, 3, 2, 1, 0):
        watch.observe(
            sent_wall=1_800_000_000.2,
            received_wall=1_800_000_000.3,
            limit=5,
            remaining=remaining,
            reset=1_800_000_001,
            date=1_800_000_000.0,
        )
    assert watch.foreign_pauses == 0
    watch.observe(
        sent_wall=1_800_000_001.2,
        received_wall=1_800_000_001.3,
        limit=5,
        remaining=1,
        reset=1_800_000_002,
        date=1_800_000_001.0,
    )
    watch.observe(
        sent_wall=1_800_000_001.2,
        received_wall=1_800_000_001.3,
        limit=5,
        remaining=0,
        reset=1_800_000_002,
        date=1_800_000_001.0,
    )
    assert watch.foreign_pauses == 1


def test_each_worker_has_its_own_single_connection_pool() -> None:
    """httpcore 1.0 races queued requests for one idle connection (``ConnectionNotAvailable``),
    so no two workers share a pool: 20 workers get 20 clients of one connection each."""
    from allo_batch.client import http_lanes

    async def go() -> list[int]:
        async with http_lanes(workers=20, timeout=1) as lanes:
            assert len({id(lane) for lane in lanes}) == 20
            return [lane._transport._pool._max_connections for lane in lanes]  # type: ignore[attr-defined]

    assert anyio.run(go) == [1] * 20
