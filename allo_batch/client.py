"""The Allo API client: the only code that knows paths, the auth header and the error envelope.

Every answer becomes an :class:`Answer`; nothing here raises for an HTTP status. httpx errors are
translated where they happen into the local codes ``TIMEOUT`` and ``CONNECTION_ERROR``. Every
text an Answer carries from outside (exception text, the API's messages) passes :func:`clean_text`
first, because it ends up in result files and logs.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import ssl
import time
import unicodedata
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Final, Literal
from urllib.parse import quote

import httpx

from allo_batch.config import Secret
from allo_batch.constants import (
    AUTH_SCHEME,
    BATCH_PATH,
    HEADER_LIMIT,
    HEADER_REMAINING,
    HEADER_RESET,
    HEADER_RETRY_AFTER,
    ITEM_PATH,
    MAX_BATCH_IDS,
    ME_PATH,
    SUMMARY_PATH,
)
from allo_batch.errors import UsageError
from allo_batch.models import CONNECTION_ERROR, TIMEOUT, URL_TOO_LONG

AnswerKind = Literal["ok", "error", "unreadable", "transport"]
AuthForm = Literal["prefixed", "bare"]
AuthChoice = Literal["auto", "prefixed", "bare"]

MESSAGE_LIMIT: Final = 300
REDACTED: Final = "[redacted]"


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """One request's outcome, typed.

    ``kind`` says what came back:

    - ``"ok"``: a 2xx with the expected ``data`` (an object in ``data``; for a batch read, the
      array's well-formed entries in ``items``).
    - ``"error"``: an API error envelope (v2 ``{"error": {…}}`` or legacy v1 ``{"code", …}``);
      ``error_code`` is the API's code.
    - ``"unreadable"``: neither: a non-JSON page (a gateway's 502, say), JSON without an envelope,
      or a 2xx without the expected ``data``; ``error_code`` is ``HTTP_<status>``.
    - ``"transport"``: no HTTP answer at all; ``error_code`` is ``TIMEOUT`` or ``CONNECTION_ERROR``
      and ``http_status`` is None.

    ``retryable`` says whether sending the same request again can succeed; ``message`` is already
    cleaned (:func:`clean_text`).
    """

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
    items: tuple[dict[str, Any], ...] | None = None


def new_request_id() -> str:
    """``req_`` + 12 alphanumerics, the API's own format; sent as X-Request-Id.

    An id only has to be unlikely to repeat, not to be unguessable: it comes from a generator
    seeded from the OS once (and again in a forked child), not from a system call per request
    as ``secrets`` would make (3 % of the client's time per request)."""
    return f"req_{_REQUEST_IDS.getrandbits(48):012x}"


_REQUEST_IDS: Final = random.Random()
os.register_at_fork(after_in_child=_REQUEST_IDS.seed)


TransportName = Literal["httpcore", "aiohttp"]
TRANSPORTS: Final[tuple[TransportName, ...]] = ("httpcore", "aiohttp")
TRANSPORT_ENV: Final = "ALLO_BATCH_TRANSPORT"
DEFAULT_TRANSPORT: TransportName = "aiohttp"
"""What carries httpx's requests when no transport is given: ``"aiohttp"``
(:class:`AiohttpTransport`) or ``"httpcore"`` (httpx's own). The environment variable
``ALLO_BATCH_TRANSPORT`` overrides it. Chosen by ``tests/benchmarks/transports.py``: at 8
workers aiohttp costs about half the client CPU per request of httpcore (h11 and httpcore's pool
are most of a request's CPU there)."""


def chosen_transport(transport: TransportName | None = None) -> TransportName:
    """``transport``, else ``$ALLO_BATCH_TRANSPORT``, else :data:`DEFAULT_TRANSPORT`."""
    name = transport or os.environ.get(TRANSPORT_ENV) or DEFAULT_TRANSPORT
    if name not in TRANSPORTS:
        msg = f"unknown HTTP transport {name!r}; known: {', '.join(TRANSPORTS)}"
        raise ValueError(msg)
    return name


def make_http_client(
    *,
    timeout: float,
    transport: httpx.AsyncBaseTransport | TransportName | None = None,
    verify: ssl.SSLContext | bool = True,
) -> httpx.AsyncClient:
    """An AsyncClient for one worker: HTTP/1.1 over one kept-alive connection (perf rules 1–4;
    why one each: :func:`http_lanes`).

    ``transport`` is an httpx transport (a test's MockTransport), or the name of the one to
    build (see :data:`DEFAULT_TRANSPORT`). Timeouts, redirects (never followed), TLS
    verification and the errors raised are the same whichever carries the requests.

    Proxies: when the environment names one (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``,
    any case), httpx's own transport carries the requests whatever the name given, because it
    goes through the proxy as httpx documents (``NO_PROXY`` included) and the aiohttp one
    would not. Loopback hosts are never proxied (as Go's clients do): a sandbox on 127.0.0.1
    answers behind a corporate proxy too.
    """
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    proxied = environment_proxied()
    if not isinstance(transport, httpx.AsyncBaseTransport) and (
        chosen_transport(transport) == "aiohttp" and not proxied
    ):
        transport = AiohttpTransport(verify=verify, keepalive_expiry=limits.keepalive_expiry)
    try:
        return _Lane(
            limits=limits,
            timeout=httpx.Timeout(timeout, pool=None),
            transport=transport if isinstance(transport, httpx.AsyncBaseTransport) else None,
            mounts=dict.fromkeys(_LOOPBACK) if proxied else None,
            follow_redirects=False,
            verify=verify,
        )
    except (ValueError, httpx.InvalidURL, ImportError) as exc:
        if not proxied:
            raise
        # The user's environment, not a bug. Its value is not quoted: it may hold a password.
        # (A socks:// proxy needs httpx[socks], which allo-batch does not install.)
        msg = (
            "the proxy named by HTTPS_PROXY, HTTP_PROXY or ALL_PROXY cannot be used "
            f"({type(exc).__name__}): give it as http(s)://host:port, or unset it"
        )
        raise UsageError(msg) from None


# httpx patterns of the hosts no proxy is used for; None: the client's own transport.
_LOOPBACK: Final = ("all://localhost", "all://127.0.0.1", "all://[::1]")


def environment_proxied() -> bool:
    """Whether the environment names a proxy for HTTP or HTTPS (what httpx would use)."""
    from urllib.request import getproxies

    return any(scheme in ("http", "https", "all") for scheme in getproxies())


@asynccontextmanager
async def http_lanes(
    *,
    workers: int,
    timeout: float,  # noqa: ASYNC109 (each request's timeout, not this function's)
    transport: httpx.AsyncBaseTransport | TransportName | None = None,
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """The run's clients, built once: one single-connection client per worker, all sharing one
    TLS context (building one costs 0.06 ms with it, performance.md L8).

    Why not one pool of ``workers`` connections: httpcore 1.0 hands an idle connection to every
    request queued at that moment, and the losers retry (``ConnectionNotAvailable``). With 8
    workers paced by allo-batch that happened 2.2 times per request and cost ~40 % more CPU per
    request than a bare loop; it also makes each scan of the pool cost more the more connections
    it holds (L3). A pool that only its own worker uses never races and scans one connection.
    """
    verify: ssl.SSLContext | bool = (
        True if isinstance(transport, httpx.AsyncBaseTransport) else ssl.create_default_context()
    )
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                make_http_client(timeout=timeout, transport=transport, verify=verify)
            )
            for _ in range(max(workers, 1))
        ]


class _NoCookies(httpx.Cookies):
    """A cookie jar that never takes a cookie from a response (so it never sends one)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class _Lane(httpx.AsyncClient):
    """An AsyncClient without a cookie jar.

    The API authenticates with a key and sets no cookies; a jar would only carry state from one
    row's answer to the next. And it is not free: httpx rebuilds every response as a urllib
    request and an email message for it, about 45 CPU-µs per request, a fifth of a whole
    request over aiohttp (measured with tests/benchmarks/transports.py).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise AttributeError("allo-batch's HTTP clients keep no cookies")


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's requests carried by aiohttp, over at most one kept-alive connection.

    Why not the ``httpx-aiohttp`` package's transport: it maps a refused and a dropped
    connection to ``httpx.ConnectTimeout`` (so they would count as TIMEOUT), lets a malformed
    answer out as an aiohttp exception, and hands aiohttp the URL as text, which yarl decodes and
    normalises again (``/items/%2E%2E/summary`` goes out as ``/summary``).

    Here every failure becomes the httpx exception httpcore raises for it: a refused connection
    ``ConnectError``, a connect timeout ``ConnectTimeout``, a read timeout ``ReadTimeout``, a
    connection dropped before or during the answer or a malformed answer
    ``RemoteProtocolError``, a reset ``ReadError``.

    The answer's body is read here, whole (the API's answers are small JSON), so the response
    given to httpx is complete and the connection is back in the pool when httpx gets it.
    Timeouts: httpx's connect and read timeouts become aiohttp's ``sock_connect`` and
    ``sock_read``; aiohttp has no write timeout (a request body is at most ~100 KB, which the
    socket buffers take). HTTP/1.1 only, and no proxy: :func:`make_http_client` does not use
    it when the environment names one.
    """

    def __init__(
        self, *, verify: ssl.SSLContext | bool = True, keepalive_expiry: float | None = 5.0
    ):
        try:
            import aiohttp
        except ImportError as exc:  # pragma: no cover (a required dependency)
            msg = "the aiohttp transport needs aiohttp (pip install aiohttp)"
            raise ImportError(msg) from exc
        import yarl

        self._aiohttp = aiohttp
        self._url = yarl.URL
        self._ssl = (
            verify
            if isinstance(verify, ssl.SSLContext)
            else httpx.create_ssl_context(verify=verify)
        )
        self._keepalive = keepalive_expiry
        self._session: Any = None
        self._timeouts: dict[tuple[Any, Any], Any] = {}

    def _open(self) -> Any:
        aiohttp = self._aiohttp
        connector = aiohttp.TCPConnector(
            limit=1, ssl=self._ssl, keepalive_timeout=self._keepalive, force_close=False
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self._session

    def _timeout(self, request: httpx.Request) -> Any:
        given = request.extensions.get("timeout") or {}
        key = (given.get("connect"), given.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=key[0], sock_read=key[1]
            )
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        try:
            async with session.request(
                request.method,
                # As httpx encoded it: yarl would otherwise decode and normalise the path again,
                # turning an id of ``..`` (sent as ``%2E%2E``) back into a step up.
                self._url(str(request.url), encoded=True),
                headers=request.headers.multi_items(),
                data=request.content or None,
                allow_redirects=False,
                compress=False,
                timeout=self._timeout(request),
            ) as answer:
                body = await answer.read()
                status, headers, reason = answer.status, answer.raw_headers, answer.reason
        except Exception as exc:
            raise self._translated(exc) from exc
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if reason:
            extensions["reason_phrase"] = reason.encode("ascii", "replace")
        return httpx.Response(
            status, headers=headers, content=body, request=request, extensions=extensions
        )

    def _translated(self, exc: Exception) -> Exception:
        """The httpx exception httpcore would raise for ``exc``; ``exc`` itself if it is none
        of the transport's (a bug of ours, say)."""
        aiohttp = self._aiohttp
        text = str(exc) or type(exc).__name__
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return httpx.ConnectTimeout(text)
        if isinstance(exc, TimeoutError):
            return httpx.ReadTimeout(text)
        if isinstance(exc, aiohttp.ClientConnectorError):
            return httpx.ConnectError(text)
        if isinstance(exc, aiohttp.ClientOSError):
            return httpx.ReadError(text)
        if isinstance(exc, aiohttp.ClientError | aiohttp.http_exceptions.HttpProcessingError):
            return httpx.RemoteProtocolError(text)
        if isinstance(exc, OSError):
            return httpx.ReadError(text)
        return exc

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


_OWN_HEADERS: Final = frozenset({"authorization", "content-type", "x-request-id"})


class AlloClient:
    """Talks to one Allo base URL with one key.

    ``auth`` picks the ``Authorization`` form. The guides say ``Api-Key <key>`` ("prefixed"); the
    endpoint pages' generated samples send the bare key ("bare"); which one v2 accepts is not
    documented. ``"auto"`` lets :meth:`me` find out (see there); the others force one form.
    ``auth_form`` is the form kept, for the run's records: the forced one, or under ``"auto"``
    None until :meth:`me` has settled it.
    """

    def __init__(
        self,
        http: httpx.AsyncClient | Sequence[httpx.AsyncClient],
        base_url: str,
        api_key: Secret,
        *,
        auth: AuthChoice = "auto",
    ) -> None:
        self._lanes = [http] if isinstance(http, httpx.AsyncClient) else list(http)
        # What httpx's request() would merge into every request, taken once per lane: the
        # requests are built here and given to send(), a sixth less CPU per request. The
        # headers this client sets are its own (a lane's default would go out beside them).
        self._lane_headers = [
            {name: value for name, value in lane.headers.items() if name not in _OWN_HEADERS}
            for lane in self._lanes
        ]
        self._lane_timeouts = [lane.timeout.as_dict() for lane in self._lanes]
        self._base = base_url.rstrip("/")
        self._key = api_key.reveal()
        self._auth_values: dict[AuthForm, str] = {
            "prefixed": f"{AUTH_SCHEME} {self._key}",
            "bare": self._key,
        }
        self._auth_form: AuthForm | None = None if auth == "auto" else auth
        self._send_form(self._auth_form or "prefixed")

    @property
    def auth_form(self) -> AuthForm | None:
        """The Authorization form kept: "prefixed" or "bare"; None while unknown."""
        return self._auth_form

    async def me(self) -> Answer:
        """``GET /v2/api/me``: the key's scopes and rate limits (in ``data``).

        Under ``auth="auto"`` with no form known yet, this is the one place that falls back: the
        documented ``Api-Key <key>`` first and, only if that answers 401, the bare key once. The
        form that works is kept for every later request: the prefixed one once it gets an answer
        that identified the key (2xx or 403), the bare one as soon as it is not refused. If both
        answer 401 the first 401 is returned; at most two requests, never a loop.
        """
        if self._auth_form is not None:
            return await self._me(self._auth_form)
        first = await self._me("prefixed")
        if first.http_status != 401:
            self._learn_prefixed(first)
            return first
        second = await self._me("bare")
        if second.http_status == 401:
            return first
        # The prefix was refused, so the bare key is the only form left: kept even when this
        # answer (a 5xx, a dropped connection) does not prove it yet.
        self._auth_form = "bare"
        self._send_form("bare")
        return second

    async def update_summary(
        self, call_id: str, body: bytes, *, request_id: str | None = None, lane: int = 0
    ) -> Answer:
        """``PATCH …/items/{id}/summary`` with a body serialised once by the planner."""
        path = SUMMARY_PATH.format(id=path_segment(call_id))
        return await self._request("PATCH", path, body, self._json_headers, request_id, lane)

    async def get_item(self, call_id: str, *, lane: int = 0) -> Answer:
        """``GET …/items/{id}``: one conversation item, in ``data``."""
        path = ITEM_PATH.format(id=path_segment(call_id))
        return await self._request("GET", path, None, self._read_headers, lane=lane)

    async def read_items(self, ids: Sequence[str], *, lane: int = 0) -> Answer:
        """``POST …/items/batch`` for 1 to 100 ids; the items that came back are in ``items``.

        The answer reports only what the API returned: items may come in any order, repeat, or
        leave out ids it does not know; the caller matches them by ``id``. Entries that are not
        objects with a string ``id`` are dropped. Raises ValueError for no ids or more than 100
        (a caller's bug, not something to spend a request on).
        """
        if isinstance(ids, str):
            raise TypeError("ids must be a sequence of ids, not one string")
        if not 1 <= len(ids) <= MAX_BATCH_IDS:
            raise ValueError(f"a batch read takes 1 to {MAX_BATCH_IDS} ids, got {len(ids)}")
        body = json.dumps({"ids": list(ids)}).encode()
        return await self._request(
            "POST", BATCH_PATH, body, self._json_headers, lane=lane, many=True
        )

    async def _me(self, form: AuthForm) -> Answer:
        headers = {"Authorization": self._auth_values[form]}
        return await self._request("GET", ME_PATH, None, headers)

    def _send_form(self, form: AuthForm) -> None:
        # Built once per form, not per request: the send path is hot (performance.md).
        auth = self._auth_values[form]
        self._read_headers = {"Authorization": auth}
        self._json_headers = {"Authorization": auth, "Content-Type": "application/json"}

    def _learn_prefixed(self, answer: Answer) -> None:
        # Only an answer that identified the key proves the form: success, or 403 (a valid key
        # without the permission). A 5xx or a dropped connection says nothing about it, so the
        # form stays unknown (and the documented one is sent meanwhile).
        if answer.kind == "ok" or answer.http_status == 403:
            self._auth_form = "prefixed"

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        request_id: str | None = None,
        lane: int = 0,
        *,
        many: bool = False,
    ) -> Answer:
        request_id = request_id or new_request_id()
        sent_wall = time.time()
        started = time.perf_counter()
        index = lane % len(self._lanes)
        try:
            request = httpx.Request(
                method,
                self._base + path,
                content=body,
                headers={**self._lane_headers[index], **headers, "X-Request-Id": request_id},
                extensions={"timeout": self._lane_timeouts[index]},
            )
        except httpx.InvalidURL:
            # The docs bound ids only by their prefix, so such an id is valid input that no
            # request can carry: its row fails, and a rerun cannot change that.
            message = f"not sent: a {len(path):,}-character path is more than a URL can hold"
            return _transport(request_id, URL_TOO_LONG, message, retryable=False)
        try:
            response = await self._lanes[index].send(request)
        except httpx.TimeoutException as exc:
            message = f"no answer in time ({type(exc).__name__})"
            return _transport(request_id, TIMEOUT, clean_text(message, self._key))
        except httpx.TransportError as exc:
            message = f"{type(exc).__name__}: {exc}"
            return _transport(request_id, CONNECTION_ERROR, clean_text(message, self._key))
        latency = time.perf_counter() - started
        return _answer(response, request_id, sent_wall, latency, self._key, many=many)


def path_segment(value: str) -> str:
    """``value`` as exactly one percent-encoded path segment.

    ``quote(safe="")`` encodes ``/ ? # %`` and the rest, but leaves dots alone, and a segment that
    is only ``.`` or ``..`` is removed by URL normalisation (httpx does it), so those dots are
    encoded too. Lone surrogates (possible from JSON input) are encoded rather than raising.
    """
    if value in (".", ".."):
        return value.replace(".", "%2E")
    return quote(value, safe="", errors="surrogatepass")


# An Authorization header value as it shows in exception texts and header reprs:
# ``Authorization: Api-Key x``, ``'authorization': 'x'``, ``authorization=Bearer x``. The scheme
# is matched possessively and ``[redacted]`` skipped, so a value already redacted stays as it is.
_AUTH_HEADER = re.compile(
    r"""(authorization['"]?\s*[:=]\s*['"]?)"""
    r"""(?:(?:api-key|bearer|basic|token)\s+)?+(?!\[redacted\])[^\s'",;})\]]+""",
    re.IGNORECASE,
)
# A credential after a scheme name, wherever it appears without the header's name.
_SCHEMED = re.compile(r"""\b((?:api-key|bearer)\s+)(?!\[redacted\])[^\s'",;})\]]+""", re.IGNORECASE)


def clean_text(text: str, secret: str | None = None, *, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` made safe for result files and logs: every occurrence of ``secret`` and anything
    that looks like an Authorization value replaced by ``[redacted]``, control and format
    characters removed (whitespace ones become a space), at most ``limit`` characters.

    Redaction runs before the cut so that a key straddling the limit cannot leak in part, and
    the key itself goes first so that a key with a quote or comma in it is not cut in two by the
    header patterns.
    """
    if secret:
        text = text.replace(secret, REDACTED)
    text = _AUTH_HEADER.sub(rf"\g<1>{REDACTED}", text)
    text = _SCHEMED.sub(rf"\g<1>{REDACTED}", text)
    if not text.isprintable():
        text = "".join(_printable(char) for char in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _printable(char: str) -> str:
    """Drop what could forge a log line or break a UTF-8 file: controls, bidi and other format
    characters, line separators, lone surrogates; whitespace among them becomes a space."""
    if char.isprintable():
        return char
    if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
        return " " if char.isspace() else ""
    return char


def _transport(request_id: str, code: str, message: str, *, retryable: bool = True) -> Answer:
    now = time.time()
    return Answer(
        kind="transport",
        request_id=request_id,
        error_code=code,
        retryable=retryable,
        message=message,
        sent_wall=now,
        received_wall=now,
    )


def _answer(
    response: httpx.Response,
    request_id: str,
    sent_wall: float,
    latency: float,
    secret: str,
    *,
    many: bool,
) -> Answer:
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
    if 200 <= response.status_code < 300:
        return _success(payload, request_id, common, many=many)
    return _failure(payload, request_id, common, headers.get(HEADER_RETRY_AFTER), secret)


def _success(payload: Any, request_id: str, common: dict[str, Any], *, many: bool) -> Answer:
    data = payload.get("data") if isinstance(payload, dict) else None
    if many and isinstance(data, list):
        items = tuple(i for i in data if isinstance(i, dict) and isinstance(i.get("id"), str))
        return Answer(kind="ok", request_id=request_id, items=items, **common)
    if not many and isinstance(data, dict):
        updated_at = data.get("updated_at")
        return Answer(
            kind="ok",
            request_id=request_id,
            version=_int(data.get("version")),
            updated_at=updated_at if isinstance(updated_at, str) else None,
            data=data,
            **common,
        )
    # A success we cannot read: a proxy's page, say. The PATCH replaces the whole summary, so
    # sending it again is harmless and may get a readable answer.
    shape = "array" if many else "object"
    return Answer(
        kind="unreadable",
        request_id=request_id,
        error_code=f"HTTP_{common['http_status']}",
        retryable=True,
        message=f"the API answered success without a readable data {shape}",
        **common,
    )


def _failure(
    payload: Any,
    request_id: str,
    common: dict[str, Any],
    retry_after_header: str | None,
    secret: str,
) -> Answer:
    status: int = common["http_status"]
    error = _envelope(payload)
    retry_after = _seconds(retry_after_header)
    if error is None:
        what = "a non-JSON body" if payload is None else "JSON that is not an error envelope"
        return Answer(
            kind="unreadable",
            request_id=request_id,
            error_code=f"HTTP_{status}",
            retryable=_transient(status),
            message=f"HTTP {status} with {what}",
            retry_after=retry_after,
            **common,
        )
    if retry_after is None:
        retry_after = _seconds(error.get("retry_after_seconds"))
    message = _error_message(error)
    return Answer(
        kind="error",
        request_id=clean_text(str(error.get("request_id") or request_id), secret),
        error_code=clean_text(str(error.get("code") or f"HTTP_{status}"), secret),
        retryable=_retryable(status, error.get("retryable")),
        message=clean_text(message, secret) if message else None,
        retry_after=retry_after,
        **common,
    )


def _retryable(status: int, flag: Any) -> bool:
    """The envelope's ``retryable`` when it has one (an explicit false on a 500 included), except
    that a 429 is always retryable (error-handling guide); without it, 408, 429 and 5xx."""
    if status == 429:
        return True
    if isinstance(flag, bool):
        return flag
    return _transient(status)


def _transient(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _error_message(error: dict[str, Any]) -> str:
    """v2's ``message``, else the legacy v1 ``details[].message`` joined."""
    message = error.get("message")
    if message:
        return str(message)
    details = error.get("details")
    if isinstance(details, list):
        return "; ".join(
            str(d["message"]) for d in details if isinstance(d, dict) and d.get("message")
        )
    return ""


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


def _seconds(value: Any) -> float | None:
    """A wait in seconds; None for anything else (a NaN or negative wait would break sleeping)."""
    try:
        seconds = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _http_date(value: str | None) -> float | None:
    return _parse_http_date(value) if value else None


# ``Date`` has a resolution of one second, so almost every answer repeats a recent one.
@lru_cache(maxsize=4)
def _parse_http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
