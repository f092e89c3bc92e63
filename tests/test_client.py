"""The API client, with httpx.MockTransport (the pacer's tests are in test_ratelimit.py)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from allo_batch.client import AlloClient, Answer, clean_text, make_http_client, new_request_id
from allo_batch.config import Secret

KEY = "ak_live_s3cr3tK3y"
Handler = Callable[[httpx.Request], httpx.Response]


def answer_for(handler: Handler, call_id: str = "cll-1", *, get: bool = False) -> Answer:
    """What the client makes of ``handler``'s answer to one PATCH (or GET item)."""

    async def go() -> Answer:
        async with make_http_client(timeout=1, transport=httpx.MockTransport(handler)) as http:
            client = AlloClient(http, "https://api.test", Secret(KEY))
            if get:
                return await client.get_item(call_id)
            return await client.update_summary(call_id, b'{"content":"x"}')

    return anyio.run(go)


def envelope(status: int, headers: dict[str, str] | None = None, **error: object) -> Handler:
    return lambda _: httpx.Response(status, json={"error": error}, headers=headers)


def page(status: int, text: str = "<html>bad gateway</html>") -> Handler:
    return lambda _: httpx.Response(status, text=text, headers={"content-type": "text/html"})


def test_request_shape() -> None:
    """PATCH to the documented path, Api-Key auth, JSON content type, our X-Request-Id."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"data": {"id": "cll-1", "version": 7, "updated_at": "2026-05-12T14:32:11"}}
        )

    answer = answer_for(handler)
    [request] = seen
    assert request.method == "PATCH"
    assert request.url.raw_path == b"/v2/api/conversations/items/cll-1/summary"
    assert request.headers["Authorization"] == f"Api-Key {KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert (answer.kind, answer.version, answer.updated_at) == ("ok", 7, "2026-05-12T14:32:11")
    assert answer.request_id == request.headers["X-Request-Id"]
    # Built by AlloClient, the request still carries what the client's request() would add.
    assert request.headers["User-Agent"].startswith("python-httpx/")
    assert request.extensions["timeout"] == httpx.Timeout(1, pool=None).as_dict()


def test_the_clients_own_headers_replace_a_lanes_defaults_and_the_rest_go_along() -> None:
    """A caller's AsyncClient may carry default headers: the key, the content type and the
    request id are AlloClient's alone (each sent once), and any other default still goes."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": {"id": "cll-1", "version": 1}})

    defaults = {"Authorization": "Bearer other", "X-Request-Id": "fixed", "X-Team": "ops"}

    async def go() -> Answer:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, headers=defaults) as http:
            return await AlloClient(http, "https://api.test", Secret(KEY)).update_summary(
                "cll-1", b"{}"
            )

    answer = anyio.run(go)
    [request] = seen
    assert request.headers.get_list("Authorization") == [f"Api-Key {KEY}"]
    assert request.headers.get_list("X-Request-Id") == [answer.request_id]
    assert request.headers.get_list("Content-Type") == ["application/json"]
    assert request.headers["X-Team"] == "ops"


def test_request_ids_have_the_api_format_and_do_not_repeat_even_across_a_fork() -> None:
    """Ids come from a generator seeded once: a forked child must not replay the parent's."""
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"req_[0-9a-f]{12}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    read, write = os.pipe()
    with warnings.catch_warnings():  # (3.12+ warns of forking a process with threads; the
        warnings.simplefilter("ignore", DeprecationWarning)  # child only writes and exits)
        pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(new_request_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_request_id() for _ in range(100)}
    assert len(child) == 100
    assert not child & parent


CALL_IDS = [
    pytest.param(
        "cll-x/../../../../../v2/api/webhooks/wh-1#",
        "cll-x%2F..%2F..%2F..%2F..%2F..%2Fv2%2Fapi%2Fwebhooks%2Fwh-1%23",
        id="traversal",
    ),
    pytest.param("cll-a/b", "cll-a%2Fb", id="slash"),
    pytest.param("..", "%2E%2E", id="dot-dot"),
    pytest.param(".", "%2E", id="dot"),
    pytest.param("cll-1?x=1&y", "cll-1%3Fx%3D1%26y", id="query"),
    pytest.param("cll-1#frag", "cll-1%23frag", id="fragment"),
    pytest.param("cll-%2F..%2F", "cll-%252F..%252F", id="already-encoded"),
    pytest.param("cll 1 +x", "cll%201%20%2Bx", id="spaces"),
    pytest.param("cll-é日", "cll-%C3%A9%E6%97%A5", id="unicode"),
    pytest.param("cll-\ud800", "cll-%ED%A0%80", id="lone-surrogate"),
]


@pytest.mark.parametrize(("call_id", "segment"), CALL_IDS)
def test_the_call_id_travels_as_exactly_one_encoded_path_segment(
    call_id: str, segment: str
) -> None:
    """``/``, dots, ``?``, ``#`` and ``%`` in an id cannot reach another path: the raw path on the
    wire has the id as one segment, not re-normalised by httpx."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": {"id": "cll-1"}})

    answer_for(handler, call_id)
    answer_for(handler, call_id, get=True)
    patch, get = seen
    items = b"/v2/api/conversations/items/"
    assert patch.url.raw_path == items + segment.encode() + b"/summary"
    assert get.url.raw_path == items + segment.encode()


@pytest.mark.parametrize(
    ("handler", "kind", "code"),
    [
        pytest.param(page(502), "unreadable", "HTTP_502", id="html-502"),
        pytest.param(
            lambda _: httpx.Response(404, text="nope"), "unreadable", "HTTP_404", id="text"
        ),
        pytest.param(
            lambda _: httpx.Response(404, json={"detail": "x"}), "unreadable", "HTTP_404", id="json"
        ),
        pytest.param(
            lambda _: httpx.Response(200, text="ok"), "unreadable", "HTTP_200", id="200-text"
        ),
        pytest.param(
            lambda _: httpx.Response(200, json={"id": "cll-1"}),
            "unreadable",
            "HTTP_200",
            id="no-data",
        ),
        pytest.param(
            lambda _: httpx.Response(200, json={"data": []}),
            "unreadable",
            "HTTP_200",
            id="data-list",
        ),
        pytest.param(
            envelope(404, code="CONVERSATION_ITEM_NOT_FOUND"),
            "error",
            "CONVERSATION_ITEM_NOT_FOUND",
            id="v2-envelope",
        ),
        pytest.param(
            lambda _: httpx.Response(400, json={"code": "LEGACY", "details": []}),
            "error",
            "LEGACY",
            id="v1-envelope",
        ),
        pytest.param(envelope(500), "error", "HTTP_500", id="envelope-without-code"),
    ],
)
def test_each_answer_is_named_for_what_came_back(handler: Handler, kind: str, code: str) -> None:
    """An API error envelope is an "error"; a page, JSON without an envelope or a success
    without a data object is "unreadable" with the code ``HTTP_<status>``."""
    answer = answer_for(handler)
    assert (answer.kind, answer.error_code) == (kind, code)


@pytest.mark.parametrize(
    ("handler", "retryable"),
    [
        pytest.param(envelope(409, code="OTHER", retryable=True), True, id="flag-true"),
        pytest.param(
            envelope(400, code="INVALID_REQUEST_BODY", retryable=False), False, id="flag-false"
        ),
        pytest.param(envelope(500, code="INTERNAL", retryable=False), False, id="500-flag-false"),
        pytest.param(
            envelope(429, code="RATE_LIMIT_EXCEEDED", retryable=False), True, id="429-always"
        ),
        pytest.param(envelope(400, code="INVALID_ITEM_ID"), False, id="400-no-flag"),
        pytest.param(envelope(408, code="TIMEOUT"), True, id="408-no-flag"),
        pytest.param(envelope(429, code="RATE_LIMIT_EXCEEDED"), True, id="429-no-flag"),
        pytest.param(envelope(500, code="INTERNAL_SERVER_ERROR"), True, id="500-no-flag"),
        pytest.param(envelope(503, code="UNAVAILABLE"), True, id="503-no-flag"),
        pytest.param(envelope(404, retryable="yes"), False, id="flag-not-a-boolean"),
        pytest.param(page(502), True, id="page-502"),
        pytest.param(page(503), True, id="page-503"),
        pytest.param(page(504), True, id="page-504"),
        pytest.param(page(429), True, id="page-429"),
        pytest.param(page(408), True, id="page-408"),
        pytest.param(page(404), False, id="page-404"),
        pytest.param(page(401), False, id="page-401"),
        pytest.param(lambda _: httpx.Response(200, text="ok"), True, id="success-without-data"),
    ],
)
def test_retryable_follows_the_envelope_flag_else_the_status(
    handler: Handler, retryable: bool
) -> None:
    """The envelope's ``retryable`` decides when present (an explicit false on a 500 too), a 429
    is always retryable, and without a flag 408, 429 and 5xx are: gateway pages included."""
    assert answer_for(handler).retryable is retryable


RATE_LIMITED: dict[str, Any] = {"code": "RATE_LIMIT_EXCEEDED", "retryable": True}


@pytest.mark.parametrize(
    ("handler", "wait"),
    [
        pytest.param(envelope(429, **RATE_LIMITED, retry_after_seconds=3), 3.0, id="body"),
        pytest.param(envelope(429, {"Retry-After": "2"}, **RATE_LIMITED), 2.0, id="header"),
        pytest.param(
            envelope(429, {"Retry-After": "2"}, **RATE_LIMITED, retry_after_seconds=3),
            2.0,
            id="header-wins",
        ),
        pytest.param(envelope(429, **RATE_LIMITED), None, id="neither"),
        pytest.param(
            lambda _: httpx.Response(503, text="busy", headers={"Retry-After": "5"}),
            5.0,
            id="header-on-a-page",
        ),
        pytest.param(
            envelope(429, {"Retry-After": "nan"}, **RATE_LIMITED, retry_after_seconds=-1),
            None,
            id="nonsense",
        ),
    ],
)
def test_retry_after_comes_from_the_header_else_the_envelope(
    handler: Handler, wait: float | None
) -> None:
    """``Retry-After`` wins, ``retry_after_seconds`` is the fallback; a value that is not a
    finite, non-negative number of seconds counts as absent."""
    assert answer_for(handler).retry_after == wait


def test_transport_errors_are_translated() -> None:
    """Timeouts and dropped connections become TIMEOUT / CONNECTION_ERROR, retryable."""

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def dropped(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed", request=request)

    for handler, code in ((timeout, "TIMEOUT"), (dropped, "CONNECTION_ERROR")):
        answer = answer_for(handler)
        assert (answer.kind, answer.error_code, answer.retryable) == ("transport", code, True)
        assert answer.http_status is None


def test_a_transport_error_never_carries_the_key_or_an_authorization_value() -> None:
    """Exception text goes to result files and logs: the key, any Authorization value and
    control characters are taken out, and the text is capped."""

    def leaky(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(
            f"bad header {dict(request.headers)!r}\r\nAuthorization: Bearer other-token "
            f"key={KEY}\x1b[2J" + "x" * 1000,
            request=request,
        )

    message = answer_for(leaky).message or ""
    assert KEY not in message
    assert "other-token" not in message
    assert not any(char in message for char in "\r\n\x1b")
    assert message.startswith("LocalProtocolError: bad header")
    assert "[redacted]" in message
    assert len(message) <= 300


def test_an_envelope_message_is_cleaned_like_any_other_text() -> None:
    """The API echoes input in ``message``; it is cleaned and capped before an Answer keeps it."""
    echoed = f"Header 'Authorization: Api-Key {KEY}' rejected\n" + "y" * 1000
    answer = answer_for(envelope(401, code="API_KEY_INVALID", message=echoed))
    message = answer.message or ""
    assert KEY not in message
    assert message.startswith("Header 'Authorization: Api-Key [redacted]' rejected y")
    assert len(message) == 300 and message.endswith("…")


def test_a_v1_envelope_message_comes_from_its_details() -> None:
    """The legacy shape has no ``message``; its ``details[].message`` are joined instead."""
    body = {"code": "LEGACY", "details": [{"message": "a", "field": "x"}, {"message": "b"}, 3]}
    answer = answer_for(lambda _: httpx.Response(400, json=body))
    assert answer.message == "a; b"


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        pytest.param(f"x {KEY} y {KEY}", "x [redacted] y [redacted]", id="key-anywhere"),
        pytest.param(
            "Authorization: Basic Zm9v; next", "Authorization: [redacted]; next", id="basic"
        ),
        pytest.param("{'authorization': 'tok'}", "{'authorization': '[redacted]'}", id="repr"),
        pytest.param("authorization=Bearer abc.def", "authorization=[redacted]", id="form"),
        pytest.param("sent Api-Key ak_other", "sent Api-Key [redacted]", id="scheme-only"),
        pytest.param("a\tb\x00c\u202ed\u2028e", "a bcd e", id="controls"),
        pytest.param("plain text", "plain text", id="untouched"),
    ],
)
def test_clean_text_strips_credentials_and_control_characters(text: str, cleaned: str) -> None:
    """The one cleaning rule every Answer message goes through."""
    assert clean_text(text, KEY) == cleaned


def test_each_worker_has_its_own_single_connection_pool() -> None:
    """httpcore 1.0 races queued requests for one idle connection (``ConnectionNotAvailable``),
    so no two workers share a pool: 20 workers get 20 clients of one connection each (the same
    for the aiohttp transport: tests/test_transports.py)."""
    from allo_batch.client import http_lanes

    async def go() -> list[int]:
        async with http_lanes(workers=20, timeout=1, transport="httpcore") as lanes:
            assert len({id(lane) for lane in lanes}) == 20
            return [lane._transport._pool._max_connections for lane in lanes]  # type: ignore[attr-defined]

    assert anyio.run(go) == [1] * 20
