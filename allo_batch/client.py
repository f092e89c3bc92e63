"""The Allo API client: the only code that knows paths, the auth header and the error envelope.

Every answer becomes an :class:`Answer`; nothing here raises for an HTTP status. httpx errors are
translated where they happen into the local codes ``TIMEOUT`` and ``CONNECTION_ERROR``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Literal

import httpx

from allo_batch.config import Secret
from allo_batch.constants import (
    AUTH_SCHEME,
    HEADER_LIMIT,
    HEADER_REMAINING,
    HEADER_RESET,
    HEADER_RETRY_AFTER,
    ME_PATH,
    SUMMARY_PATH,
)
from allo_batch.models import CONNECTION_ERROR, TIMEOUT

AnswerKind = Literal["ok", "refused", "transport"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """One request's outcome, typed."""

    kind: AnswerKind
    request_id: str
    http_status: int | None = None
    error_code: str | None = None
    retryable: bool = False
    message: str | None = None
    version: int | None = None
    updated_at: str | None = None
    retry_after: float | None = None
    limit: int | None = None
    remaining: int | None = None
    reset: int | None = None
    date: float | None = None
    sent_wall: float = 0.0
    received_wall: float = 0.0
    latency: float = 0.0
    data: dict[str, Any] | None = None


def new_request_id() -> str:
    """``req_`` + 12 alphanumerics, the API's own format; sent as X-Request-Id."""
    return f"req_{secrets.token_hex(6)}"


def make_http_client(
    *, timeout: float, transport: Any = None, verify: Any = True
) -> httpx.AsyncClient:
    """An AsyncClient for one worker: HTTP/1.1 over one kept-alive connection (perf rules 1–4;
    why one each: :func:`http_lanes`)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(
        limits=limits,
        timeout=httpx.Timeout(timeout, pool=None),
        transport=transport,
        follow_redirects=False,
        verify=verify,
    )


@asynccontextmanager
async def http_lanes(
    *,
    workers: int,
    timeout: float,  # noqa: ASYNC109 (each request's timeout, not this function's)
    transport: Any = None,
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """The run's clients, built once: one single-connection client per worker, all sharing one
    TLS context (building one costs 0.06 ms with it, performance.md L8).

    Why not one pool of ``workers`` connections: httpcore 1.0 hands an idle connection to every
    request queued at that moment, and the losers retry (``ConnectionNotAvailable``). With 8
    workers paced by allo-batch that happened 2.2 times per request and cost ~40 % more CPU per
    request than a bare loop; it also makes each scan of the pool cost more the more connections
    it holds (L3). A pool that only its own worker uses never races and scans one connection.
    """
    import ssl

    verify: Any = ssl.create_default_context() if transport is None else True
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                make_http_client(timeout=timeout, transport=transport, verify=verify)
            )
            for _ in range(max(workers, 1))
        ]


class AlloClient:
    """Talks to one Allo base URL with one key."""

    def __init__(
        self,
        http: httpx.AsyncClient | Sequence[httpx.AsyncClient],
        base_url: str,
        api_key: Secret,
    ) -> None:
        self._lanes = [http] if isinstance(http, httpx.AsyncClient) else list(http)
        self._base = base_url.rstrip("/")
        self._auth = f"{AUTH_SCHEME} {api_key.reveal()}"
        self._patch_headers = {"Authorization": self._auth, "Content-Type": "application/json"}

    async def me(self) -> Answer:
        """``GET /v2/api/me``: the key's scopes and rate limits (in ``data``)."""
        return await self._request("GET", ME_PATH, None, {"Authorization": self._auth})

    async def update_summary(
        self, call_id: str, body: bytes, *, request_id: str | None = None, lane: int = 0
    ) -> Answer:
        """``PATCH …/items/{id}/summary`` with a body serialised once by the planner."""
        return await self._request(
            "PATCH", SUMMARY_PATH.format(id=call_id), body, self._patch_headers, request_id, lane
        )

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        request_id: str | None = None,
        lane: int = 0,
    ) -> Answer:
        request_id = request_id or new_request_id()
        sent_wall = time.time()
        started = time.perf_counter()
        try:
            response = await self._lanes[lane % len(self._lanes)].request(
                method,
                self._base + path,
                content=body,
                headers={**headers, "X-Request-Id": request_id},
            )
        except httpx.TimeoutException as exc:
            return _transport(request_id, TIMEOUT, f"no answer in time ({type(exc).__name__})")
        except httpx.TransportError as exc:
            return _transport(request_id, CONNECTION_ERROR, f"{type(exc).__name__}: {exc}")
        return _answer(response, request_id, sent_wall, time.perf_counter() - started)


def _transport(request_id: str, code: str, message: str) -> Answer:
    now = time.time()
    return Answer(
        kind="transport",
        request_id=request_id,
        error_code=code,
        retryable=True,
        message=message,
        sent_wall=now,
        received_wall=now,
    )


def _answer(response: httpx.Response, request_id: str, sent_wall: float, latency: float) -> Answer:
    headers = response.headers
    common: dict[str, Any] = {
        "http_status": response.status_code,
        "limit": _int(headers.get(HEADER_LIMIT)),
        "remaining": _int(headers.get(HEADER_REMAINING)),
        "reset": _int(headers.get(HEADER_RESET)),
        "date": _http_date(headers.get("Date")),
        "sent_wall": sent_wall,
        "received_wall": time.time(),
        "latency": latency,
    }
    payload = _json(response)
    status = response.status_code
    if 200 <= status < 300:
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, dict):
            return Answer(
                kind="refused",
                request_id=request_id,
                error_code=f"HTTP_{status}",
                retryable=True,
                message="the API answered success without a readable data object",
                **common,
            )
        return Answer(
            kind="ok",
            request_id=request_id,
            version=_int(data.get("version")),
            updated_at=data.get("updated_at") if isinstance(data.get("updated_at"), str) else None,
            data=data,
            **common,
        )
    error = _envelope(payload)
    transient = status == 429 or status >= 500
    retry_after = _float(headers.get(HEADER_RETRY_AFTER))
    if retry_after is None and error is not None:
        retry_after = _float(error.get("retry_after_seconds"))
    if error is None:
        return Answer(
            kind="refused",
            request_id=request_id,
            error_code=f"HTTP_{status}",
            retryable=transient or status == 408,
            message=f"HTTP {status} with a non-JSON body",
            retry_after=retry_after,
            **common,
        )
    return Answer(
        kind="refused",
        request_id=str(error.get("request_id") or request_id),
        error_code=str(error.get("code") or f"HTTP_{status}"),
        retryable=transient or error.get("retryable") is True,
        message=str(error.get("message") or "")[:500] or None,
        retry_after=retry_after,
        **common,
    )


def _envelope(payload: Any) -> dict[str, Any] | None:
    """The v2 ``error`` object, or the legacy v1 ``{code, details}`` shape, or None."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(payload.get("code"), str):
        return payload
    return None


def _json(response: httpx.Response) -> Any:
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _http_date(value: str | None) -> float | None:
    return _parse_http_date(value) if value else None


# ``Date`` has a resolution of one second, so almost every answer repeats a recent one.
@lru_cache(maxsize=4)
def _parse_http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
