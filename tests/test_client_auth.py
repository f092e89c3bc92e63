"""The Authorization form: ``Api-Key <key>`` first, the bare key once if that is refused."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx

from allo_batch.client import AlloClient, AuthChoice, make_http_client
from allo_batch.config import Secret

KEY = "ak_live_k3y"
PREFIXED = f"Api-Key {KEY}"
ME = {"data": {"scopes": ["CONVERSATIONS_WRITE"], "rate_limits": {"write_per_second": 5}}}
SUMMARY = {"data": {"id": "cll-1", "version": 2}}


class Api:
    """A MockTransport handler that accepts only some Authorization values and counts requests."""

    def __init__(self, accepts: set[str], *, me_status: int | None = None) -> None:
        self.accepts = accepts
        self.me_status = me_status
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if request.headers["Authorization"] not in self.accepts:
            code = f"REFUSED_{len(self.seen)}"
            return httpx.Response(401, json={"error": {"code": code, "retryable": False}})
        if request.url.path == "/v2/api/me":
            if self.me_status is not None:
                return httpx.Response(self.me_status, json={"error": {"code": "NOPE"}})
            return httpx.Response(200, json=ME)
        return httpx.Response(200, json=SUMMARY)

    def auth_sent(self) -> list[str]:
        return [request.headers["Authorization"] for request in self.seen]


def run(api: Api, steps: Callable[[AlloClient], Awaitable[Any]], auth: AuthChoice = "auto") -> Any:
    async def go() -> Any:
        async with make_http_client(timeout=1, transport=httpx.MockTransport(api)) as http:
            return await steps(AlloClient(http, "https://api.test", Secret(KEY), auth=auth))

    return anyio.run(go)


async def me_then_patch(client: AlloClient) -> tuple[Any, ...]:
    before = client.auth_form
    me = await client.me()
    learned = client.auth_form
    patch = await client.update_summary("cll-1", b'{"content":"x"}')
    return before, me, learned, patch


def test_a_prefixed_key_that_is_accepted_costs_one_request() -> None:
    """The documented ``Api-Key <key>`` works: one /me request, and every later one uses it."""
    api = Api({PREFIXED})
    before, me, learned, patch = run(api, me_then_patch)
    assert (before, me.kind, learned, patch.kind) == (None, "ok", "prefixed", "ok")
    assert api.auth_sent() == [PREFIXED, PREFIXED]


def test_only_a_bare_key_accepted_costs_two_me_requests_then_stays_bare() -> None:
    """A 401 on the prefixed form is followed by the bare key once; the PATCH then sends it."""
    api = Api({KEY})
    _, me, learned, patch = run(api, me_then_patch)
    assert (me.kind, me.data, learned, patch.kind) == ("ok", ME["data"], "bare", "ok")
    assert api.auth_sent() == [PREFIXED, KEY, KEY]


def test_the_learned_form_serves_reads_as_well() -> None:
    """GET item and the batch read use the form /me found."""
    api = Api({KEY})

    async def steps(client: AlloClient) -> None:
        await client.me()
        await client.get_item("cll-1")
        await client.read_items(["cll-1"])

    run(api, steps)
    assert api.auth_sent() == [PREFIXED, KEY, KEY, KEY]


def test_both_forms_refused_costs_two_requests_and_returns_the_first_401() -> None:
    """No loop: two requests, the prefixed form's 401 comes back, and no form is known."""
    api = Api(set())

    async def steps(client: AlloClient) -> tuple[Any, ...]:
        return await client.me(), client.auth_form

    me, form = run(api, steps)
    assert (me.kind, me.http_status, me.error_code, form) == ("error", 401, "REFUSED_1", None)
    assert api.auth_sent() == [PREFIXED, KEY]


def test_a_403_proves_the_prefixed_form_without_trying_the_bare_one() -> None:
    """403 means a valid key without the permission: the form works, nothing to fall back to."""
    api = Api({PREFIXED}, me_status=403)
    _, me, learned, _ = run(api, me_then_patch)
    assert (me.http_status, learned) == (403, "prefixed")
    assert api.auth_sent() == [PREFIXED, PREFIXED]


def test_a_5xx_on_me_proves_nothing_and_does_not_fall_back() -> None:
    """Only a 401 triggers the bare key; a server error leaves the form unknown."""
    api = Api({PREFIXED}, me_status=500)
    _, me, learned, _ = run(api, me_then_patch)
    assert (me.http_status, learned) == (500, None)
    assert api.auth_sent() == [PREFIXED, PREFIXED]


def test_after_a_refused_prefix_the_bare_form_is_kept_even_if_me_then_fails() -> None:
    """Prefixed 401, bare 500: the prefix is known to fail and bare is the only form left, so it
    is kept (and reported) for later requests."""
    api = Api({KEY}, me_status=500)
    _, me, learned, patch = run(api, me_then_patch)
    assert (me.http_status, learned, patch.kind) == (500, "bare", "ok")
    assert api.auth_sent() == [PREFIXED, KEY, KEY]


def test_a_second_me_sends_only_the_learned_form() -> None:
    """Once a form is known, /me does not probe again."""
    api = Api({KEY})

    async def steps(client: AlloClient) -> None:
        await client.me()
        await client.me()

    run(api, steps)
    assert api.auth_sent() == [PREFIXED, KEY, KEY]


def test_a_401_on_a_patch_never_falls_back() -> None:
    """The fallback belongs to /me alone: a refused PATCH is one request and a 401."""
    api = Api(set())
    patch = run(api, lambda client: client.update_summary("cll-1", b"{}"))
    assert patch.http_status == 401
    assert api.auth_sent() == [PREFIXED]


def test_a_forced_bare_form_is_known_from_the_start_and_never_falls_back() -> None:
    """``auth="bare"`` sends the bare key only, and reports it before any request."""
    api = Api({PREFIXED})

    async def steps(client: AlloClient) -> tuple[Any, ...]:
        before = client.auth_form
        return before, await client.me(), client.auth_form

    before, me, after = run(api, steps, auth="bare")
    assert (before, me.http_status, after) == ("bare", 401, "bare")
    assert api.auth_sent() == [KEY]


def test_a_forced_prefixed_form_never_falls_back() -> None:
    """``auth="prefixed"`` refused is one request and a 401."""
    api = Api({KEY})
    me = run(api, lambda client: client.me(), auth="prefixed")
    assert me.http_status == 401
    assert api.auth_sent() == [PREFIXED]
