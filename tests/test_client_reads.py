"""Reads: the batch read of up to 100 items and GET of one item."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import httpx
import pytest

from allo_batch.client import AlloClient, Answer, make_http_client
from allo_batch.config import Secret

Handler = Callable[[httpx.Request], httpx.Response]


def run(handler: Handler, steps: Callable[[AlloClient], Awaitable[Answer]]) -> Answer:
    async def go() -> Answer:
        async with make_http_client(timeout=1, transport=httpx.MockTransport(handler)) as http:
            return await steps(AlloClient(http, "https://api.test", Secret("ak_k")))

    return anyio.run(go)


def read(ids: Sequence[str], handler: Handler) -> Answer:
    return run(handler, lambda client: client.read_items(ids))


def items(data: Any) -> Handler:
    return lambda _: httpx.Response(200, json={"data": data})


def test_a_batch_read_posts_the_ids_with_auth_and_request_id() -> None:
    """POST …/items/batch, ``{"ids": [...]}`` as JSON, Api-Key auth, our X-Request-Id."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [{"id": "cll-1"}]})

    answer = read(["cll-1", "cll-2"], handler)
    [request] = seen
    assert (request.method, request.url.raw_path) == ("POST", b"/v2/api/conversations/items/batch")
    assert json.loads(request.content) == {"ids": ["cll-1", "cll-2"]}
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Authorization"] == "Api-Key ak_k"
    assert answer.request_id == request.headers["X-Request-Id"]
    assert (answer.kind, answer.items, answer.data) == ("ok", ({"id": "cll-1"},), None)


def test_a_batch_read_reports_items_as_they_came_back() -> None:
    """Any order, duplicates kept, unknown ids simply absent: matching by id is the caller's."""
    came_back = [{"id": "cll-3", "summary": "c"}, {"id": "cll-1"}, {"id": "cll-3", "summary": "c"}]
    answer = read(["cll-1", "cll-2", "cll-3"], items(came_back))
    assert answer.items == tuple(came_back)


def test_a_batch_read_drops_entries_that_are_not_objects_with_a_string_id() -> None:
    """Nulls, strings, objects without an id or with a numeric one are not items."""
    answer = read(["cll-1"], items([None, "cll-1", {"x": 1}, {"id": 7}, {"id": "cll-1"}]))
    assert answer.items == ({"id": "cll-1"},)


def test_an_empty_data_array_is_an_ok_answer_with_no_items() -> None:
    """None of the ids exists: success, nothing came back."""
    answer = read(["cll-404"], items([]))
    assert (answer.kind, answer.items) == ("ok", ())


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "INVALID_ITEM_ID"), (404, "CONVERSATION_ITEM_NOT_FOUND"), (400, "BATCH_TOO_LARGE")],
)
def test_a_refused_batch_read_is_an_error_without_items(status: int, code: str) -> None:
    """The API may refuse the whole request with an envelope; the answer says so."""
    answer = read(["msg-1"], lambda _: httpx.Response(status, json={"error": {"code": code}}))
    assert (answer.kind, answer.error_code, answer.retryable, answer.items) == (
        "error",
        code,
        False,
        None,
    )


def test_a_batch_read_success_without_a_data_array_is_unreadable() -> None:
    """``data`` as an object (or missing) is not what a batch read answers."""
    answer = read(["cll-1"], items({"id": "cll-1"}))
    assert (answer.kind, answer.error_code, answer.items) == ("unreadable", "HTTP_200", None)


def test_a_batch_read_takes_up_to_100_ids() -> None:
    """Exactly 100 ids are sent."""
    answer = read([f"cll-{n}" for n in range(100)], items([]))
    assert answer.kind == "ok"


@pytest.mark.parametrize(
    ("ids", "error"),
    [
        pytest.param([f"cll-{n}" for n in range(101)], ValueError, id="101"),
        pytest.param([], ValueError, id="none"),
        pytest.param("cll-1", TypeError, id="one-string"),
    ],
)
def test_a_batch_read_outside_1_to_100_ids_raises_without_a_request(
    ids: Sequence[str], error: type[Exception]
) -> None:
    """A caller's bug is not worth a request of a 5/s budget."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": []})

    with pytest.raises(error):
        read(ids, handler)
    assert seen == []


def test_get_item_reads_one_item_into_data() -> None:
    """GET …/items/{id}, no body, Api-Key auth; the item is ``data``."""
    seen: list[httpx.Request] = []
    item = {"id": "cll-1", "type": "CALL", "summary": "# Summary"}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": item})

    answer = run(handler, lambda client: client.get_item("cll-1"))
    [request] = seen
    assert (request.method, request.url.raw_path) == ("GET", b"/v2/api/conversations/items/cll-1")
    assert request.content == b""
    assert request.headers["Authorization"] == "Api-Key ak_k"
    assert (answer.kind, answer.data, answer.items) == ("ok", item, None)


def test_get_item_of_an_unknown_id_is_a_final_error() -> None:
    """404 CONVERSATION_ITEM_NOT_FOUND: an error, not retryable."""
    body = {"error": {"code": "CONVERSATION_ITEM_NOT_FOUND", "retryable": False}}
    answer = run(lambda _: httpx.Response(404, json=body), lambda client: client.get_item("cll-9"))
    assert (answer.kind, answer.error_code, answer.retryable) == (
        "error",
        "CONVERSATION_ITEM_NOT_FOUND",
        False,
    )
