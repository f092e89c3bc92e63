"""The sandbox as a plain ASGI application that behaves like the documented Allo v2 API.

Routes (allo-api.md §1–§7):

- ``PATCH /v2/api/conversations/items/{id}/summary`` (``CONVERSATIONS_WRITE``)
- ``GET /v2/api/conversations/items/{id}`` and ``POST /v2/api/conversations/items/batch``
  (``CONVERSATIONS_READ``)
- ``GET /v2/api/me`` (any valid key)

and, under the separate prefix ``/_sandbox/`` (no key, loopback only): ``GET state``,
``POST reset``, ``POST revoke`` (``{"key": ...}``).

Routing uses the raw path, split on ``/`` and then percent-decoded segment by segment, so an id
sent as one encoded segment (``cll-x%2F..%2Fme``) is that literal id and never another route.

Choices where the docs are silent (allo-api.md marks them UNKNOWN) are switches of a
:class:`~allo_batch.sandbox.personas.Behaviour`, chosen by persona (see ``personas.py``): the
accepted ``Authorization`` forms, fixed or sliding rate windows, the batch read's budget, where a
429 says how long to wait, ``retryable`` on 500s, gateway errors as pages or envelopes, whether an
identical PATCH bumps the version, read lag, which template a read shows, batch order, missing and
duplicate ids, and ``Idempotency-Key``. The default persona, ``documented``, keeps the sandbox's
earlier choices: ``Api-Key`` only, fixed windows, the batch read on the write budget (it is a
POST), ``Retry-After`` and ``retry_after_seconds`` both, ``retryable: true`` on 500, HTML gateway
pages, identical PATCHes bump the version, reads show writes at once and show
``MARKDOWN_CLASSIC`` of two, batch results in input order with unknown ids left out and repeated
ids repeated, ``Idempotency-Key`` ignored.

Choices that are not switches, because a client cannot tell them apart or they are fixed by the
check order: checks run in the order auth → rate limit → scope → media type → id → body →
existence; a call with no completed summary and no ``template_key`` answers 404
``SUMMARY_TEMPLATE_NOT_FOUND``; ``content`` length counts code points; 401 answers carry no
rate-limit headers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from copy import deepcopy
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

import anyio

from allo_batch.constants import (
    AUTH_SCHEME,
    CALL_PREFIX,
    ERROR_TYPES,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_IDEMPOTENCY_REPLAYED,
    MAX_BATCH_IDS,
    MAX_CONTENT_CHARS,
    READ_SCOPE,
    SMS_PREFIX,
    TEMPLATE_KEYS,
    WRITE_SCOPE,
    Code,
)
from allo_batch.sandbox.faults import Fault, FaultSpec, decide
from allo_batch.sandbox.limits import Limiter, Verdict, make_limiter
from allo_batch.sandbox.personas import DOCUMENTED, Behaviour, persona_name
from allo_batch.sandbox.world import ApiKey, Summary, World

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_JSON = (b"content-type", b"application/json")
_GATEWAY_PAGE = b"<html><head><title>%d</title></head><body><h1>%d %s</h1></body></html>"
_GATEWAY_REASONS = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
# No code is documented for gateway errors (allo-api.md §2); these follow the catalogue's style.
_GATEWAY_CODES = {502: "BAD_GATEWAY", 503: "SERVICE_UNAVAILABLE", 504: "GATEWAY_TIMEOUT"}
# From the second-hand error catalogue (allo-api.md §2, §5); not a documented code.
_IDEMPOTENCY_KEY_REUSE = "IDEMPOTENCY_KEY_REUSE"
_IDEMPOTENCY_TTL = 3600.0
_CLASSIC, _SHORT = TEMPLATE_KEYS
_ACCEPTED_FORMS = {"prefixed": ("prefixed",), "bare": ("bare",), "both": ("prefixed", "bare")}
_AUTH_HINTS = {
    "prefixed": f"'Authorization: {AUTH_SCHEME} <key>'",
    "bare": "'Authorization: <key>'",
    "both": f"'Authorization: {AUTH_SCHEME} <key>' or 'Authorization: <key>'",
}
# The counter each route adds to, so that a test can count exactly what a client sent.
_ROUTE_COUNTERS = {
    "me": "me",
    "summary": "patch",
    "item": "get_item",
    "batch": "batch",
    "method": "wrong_method",
    "unknown": "unknown_route",
}

Route = Literal["me", "summary", "item", "batch", "method", "unknown"]


@dataclass(slots=True)
class _Answer:
    status: int
    body: dict[str, Any]
    headers: Headers


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str  # as decoded by the server, for messages and fault targets
    route: Route
    item_id: str
    headers: dict[bytes, bytes]
    body: bytes
    request_id: str


@dataclass(frozen=True, slots=True)
class _Stored:
    """A successful PATCH kept for ``Idempotency-Key`` replays."""

    fingerprint: str
    at: float
    body: dict[str, Any]


class _Refusal(Exception):
    """Raised inside a handler to answer with an error envelope.

    ``retryable=None`` leaves the flag out of the envelope; ``retry_after`` adds
    ``retry_after_seconds``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        *,
        retryable: bool | None = False,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.retryable, self.retry_after = retryable, retry_after


class SandboxApp:
    """A simulated Allo API over a :class:`World`; see the module docstring for the routes.

    ``behaviour`` picks every undocumented choice (default: the ``documented`` persona);
    ``batch_bucket``, when given, overrides the behaviour's switch of that name.
    """

    def __init__(
        self,
        world: World,
        *,
        faults: FaultSpec | None = None,
        seed: int = 0,
        behaviour: Behaviour | None = None,
        batch_bucket: Literal["read", "write"] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        behaviour = behaviour or DOCUMENTED
        if batch_bucket is not None:
            behaviour = replace(behaviour, batch_bucket=batch_bucket)
        self.behaviour = behaviour
        self.world = world
        self._initial = deepcopy(world)
        self.faults = faults or FaultSpec()
        self.seed = seed
        self._clock = clock
        self.limiter: Limiter = make_limiter(behaviour.window, clock)
        self.counters: Counter[str] = Counter()
        self._target_counts: Counter[str] = Counter()
        self._request_serial = 0
        # Per (call, template): (time written, content), oldest first, for lagged reads and
        # "latest"; the first entry of a never-pruned history is the initial content at -inf.
        self._history: dict[tuple[str, str], deque[tuple[float, str]]] = {}
        # Per (API key, Idempotency-Key), in insertion (= time) order so expiry pops the front.
        self._idempotent: dict[tuple[str, str], _Stored] = {}

    @property
    def batch_bucket(self) -> Literal["read", "write"]:
        """The budget the batch read spends (the behaviour's switch)."""
        return self.behaviour.batch_bucket

    # -- ASGI entry ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        body = await _read_body(receive)
        if path.startswith("/_sandbox/"):
            await _respond(send, *self._inspect(method, path, scope, body))
            return
        headers = dict(scope["headers"])
        route, item_id = _route(method, _segments(scope))
        request = _Request(method, path, route, item_id, headers, body, self._request_id(headers))
        self.counters["requests"] += 1
        self.counters[_ROUTE_COUNTERS[route]] += 1
        try:
            key = self._authenticate(headers)
        except _Refusal as refusal:
            await self._send_error(send, refusal, request.request_id, [])
            return
        await self._serve(request, key, receive, send)

    async def _serve(self, request: _Request, key: ApiKey, receive: Receive, send: Send) -> None:
        verdict = self._admit(request, key)
        rate_headers = _rate_headers(verdict)
        if not verdict.allowed:
            await self._send_rate_limited(send, request.request_id, verdict, rate_headers)
            return
        fault = await self._decide_fault(request)
        if await self._inject_early(fault, send, request.request_id, rate_headers):
            return
        try:
            answer = self._dispatch(request, key)
        except _Refusal as refusal:
            await self._send_error(send, refusal, request.request_id, rate_headers)
            return
        if fault == "stall":
            await _stall(receive, self.faults.stall_time)
        await _respond(send, answer.status, answer.body, rate_headers + answer.headers)

    def _admit(self, request: _Request, key: ApiKey) -> Verdict:
        bucket = "read" if request.method == "GET" else "write"
        if request.route == "batch":
            bucket = self.behaviour.batch_bucket
        limit = key.read_per_second if bucket == "read" else key.write_per_second
        return self.limiter.admit(key.key, bucket, limit)

    async def _send_rate_limited(
        self, send: Send, request_id: str, verdict: Verdict, rate_headers: Headers
    ) -> None:
        self.counters["rate_limited"] += 1
        where = self.behaviour.retry_after
        refusal = _Refusal(
            429,
            Code.RATE_LIMIT_EXCEEDED,
            f"Rate limit of {verdict.limit} requests per second hit.",
            retryable=True,
            retry_after=verdict.retry_after if where in ("body", "both") else None,
        )
        headers = list(rate_headers)
        if where in ("header", "both"):
            headers.append((b"retry-after", str(verdict.retry_after).encode()))
        await self._send_error(send, refusal, request_id, headers)

    # -- routing and handlers ------------------------------------------------------------------

    def _dispatch(self, request: _Request, key: ApiKey) -> _Answer:
        route = request.route
        if route == "me":
            return self._me(key)
        if route == "batch":
            self._require(key, READ_SCOPE)
            return self._batch(request)
        if route == "item":
            self._require(key, READ_SCOPE)
            return self._get_item(request.item_id)
        if route == "summary":
            self._require(key, WRITE_SCOPE)
            return self._patch_summary(request, key)
        if route == "method":
            raise _Refusal(
                405, Code.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.path}."
            )
        raise _Refusal(404, Code.ENDPOINT_NOT_FOUND, f"No endpoint at {request.path}.")

    def _patch_summary(self, request: _Request, key: ApiKey) -> _Answer:
        _require_json(request.headers)
        idempotency_key = self._idempotency_key(request.headers)
        fingerprint = hashlib.sha256(request.item_id.encode() + b"\x00" + request.body).hexdigest()
        if idempotency_key is not None:
            replayed = self._replay(key.key, idempotency_key, fingerprint)
            if replayed is not None:
                return replayed
        content, template_key = _patch_fields(request.item_id, request.body)
        summary, template_key = self._summary_to_patch(request.item_id, template_key)
        data = self._apply(request.item_id, template_key, summary, content)
        if idempotency_key is not None:
            stored = _Stored(fingerprint, self._clock(), {"data": data})
            self._idempotent[(key.key, idempotency_key)] = stored
        return _Answer(200, {"data": data}, [])

    def _summary_to_patch(self, item_id: str, template_key: str | None) -> tuple[Summary, str]:
        summaries = self.world.calls.get(item_id)
        if summaries is None:
            raise _Refusal(
                404, Code.CONVERSATION_ITEM_NOT_FOUND, f"Call '{item_id}' was not found.", "id"
            )
        if template_key is None:
            if len(summaries) > 1:
                raise _Refusal(
                    400,
                    Code.SUMMARY_TEMPLATE_KEY_REQUIRED,
                    f"Call '{item_id}' has {len(summaries)} completed summaries; "
                    "give template_key.",
                    "template_key",
                )
            template_key = next(iter(summaries), None)
        summary = summaries.get(template_key) if template_key else None
        if summary is None or template_key is None:
            raise _Refusal(
                404,
                Code.SUMMARY_TEMPLATE_NOT_FOUND,
                f"Call '{item_id}' has no completed summary for {template_key or 'any template'}.",
                "template_key",
            )
        return summary, template_key

    def _apply(
        self, item_id: str, template_key: str, summary: Summary, content: str
    ) -> dict[str, Any]:
        now = self._clock()
        if self.behaviour.identical_bumps_version or content != summary.content:
            self._remember_content(item_id, template_key, summary.content, content, now)
            summary.content = content
            summary.version += 1
            summary.updated_at = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        else:
            # Accepted and counted as a write, but nothing changed, so nothing moves.
            self.counters["identical_no_bump"] += 1
        summary.writes += 1
        self.counters["writes_applied"] += 1
        return {
            "id": item_id,
            "content": summary.content,
            "version": summary.version,
            "updated_at": summary.updated_at,
            "updated_by": {"id": "usr-sandbox000001", "name": "Sandbox API User"},
        }

    def _get_item(self, item_id: str) -> _Answer:
        if not item_id.startswith((CALL_PREFIX, SMS_PREFIX)):
            raise _Refusal(
                400, Code.INVALID_ITEM_ID, f"'{item_id}' is not a conversation item id.", "id"
            )
        item = self._item(item_id)
        if item is None:
            raise _Refusal(
                404, Code.CONVERSATION_ITEM_NOT_FOUND, f"Item '{item_id}' was not found.", "id"
            )
        return _Answer(200, {"data": item}, [])

    def _batch(self, request: _Request) -> _Answer:
        _require_json(request.headers)
        ids = _parse_object(request.body).get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise _Refusal(400, Code.INVALID_REQUEST_BODY, "ids must be a list of strings.", "ids")
        if len(ids) > MAX_BATCH_IDS:
            raise _Refusal(
                400,
                Code.BATCH_TOO_LARGE,
                f"{len(ids)} ids given; the maximum is {MAX_BATCH_IDS}.",
                "ids",
            )
        if self.behaviour.batch_duplicates == "once":
            ids = list(dict.fromkeys(ids))
        if self.behaviour.batch_missing == "error":
            self._require_all_found(ids)
        items = [item for item in map(self._item, ids) if item is not None]
        if self.behaviour.batch_order == "shuffled":
            # Seeded by the app's seed and the request, so the same request gets the same order.
            random.Random("\x00".join([str(self.seed), *ids])).shuffle(items)
        return _Answer(200, {"data": items}, [])

    def _require_all_found(self, ids: list[str]) -> None:
        bad = [i for i in ids if not i.startswith((CALL_PREFIX, SMS_PREFIX))]
        if bad:
            raise _Refusal(
                400, Code.INVALID_ITEM_ID, f"'{bad[0]}' is not a conversation item id.", "ids"
            )
        missing = [i for i in ids if i not in self.world.calls and i not in self.world.sms]
        if missing:
            raise _Refusal(
                404, Code.CONVERSATION_ITEM_NOT_FOUND, f"Item '{missing[0]}' was not found.", "ids"
            )

    def _item(self, item_id: str) -> dict[str, Any] | None:
        if item_id in self.world.sms:
            return {"id": item_id, "type": "SMS", "summary": None, "content": "SMS text"}
        summaries = self.world.calls.get(item_id)
        if summaries is None:
            return None
        return {
            "id": item_id,
            "type": "CALL",
            "direction": "INBOUND",
            "result": "ANSWERED",
            "date": "2026-01-01T00:00:00Z",
            "duration": 120,
            "summary": self._shown_summary(item_id, summaries),
            "tags": [],
        }

    def _me(self, key: ApiKey) -> _Answer:
        data = {
            "api_key_id": key.key_id,
            "scopes": list(key.scopes),
            "endpoints": [],
            "team": {"id": "team-sandbox", "name": "Sandbox Team"},
            "rate_limits": {
                "read_per_second": key.read_per_second,
                "write_per_second": key.write_per_second,
            },
        }
        return _Answer(200, {"data": data}, [])

    # -- what reads show -----------------------------------------------------------------------

    def _shown_summary(self, call_id: str, summaries: dict[str, Summary]) -> str | None:
        """The one ``summary`` string of a read: lagged by read_lag, one template of two."""
        at = self._clock() - self.behaviour.read_lag
        seen = {t: self._content_at(call_id, t, s, at) for t, s in summaries.items()}
        if len(seen) < 2:
            return next((content for _, content in seen.values()), None)
        choice = self.behaviour.two_template_read
        if choice == "latest":
            # Ties (neither written yet) go to MARKDOWN_CLASSIC, the first of the enum.
            ordered = [t for t in TEMPLATE_KEYS if t in seen]
            return seen[max(ordered, key=lambda t: seen[t][0])][1]
        return seen[_CLASSIC if choice == "classic" else _SHORT][1]

    def _content_at(
        self, call_id: str, template: str, summary: Summary, at: float
    ) -> tuple[float, str]:
        """(time written, content) of the summary as it was at ``at``."""
        history = self._history.get((call_id, template))
        if history is None:
            return -math.inf, summary.content
        shown = history[0]
        for entry in history:
            if entry[0] > at:
                break
            shown = entry
        return shown

    def _remember_content(
        self, call_id: str, template: str, before: str, after: str, now: float
    ) -> None:
        history = self._history.setdefault((call_id, template), deque([(-math.inf, before)]))
        history.append((now, after))
        # Keep only what a read can still show: the last entry at least read_lag old, and newer.
        cutoff = now - self.behaviour.read_lag
        while len(history) > 1 and history[1][0] <= cutoff:
            history.popleft()

    # -- checks --------------------------------------------------------------------------------

    def _authenticate(self, headers: dict[bytes, bytes]) -> ApiKey:
        raw = headers.get(b"authorization", b"").decode("latin-1").strip()
        form, token = _auth_form(raw)
        self.counters[f"auth_{form}"] += 1
        if form not in _ACCEPTED_FORMS[self.behaviour.auth]:
            self.counters["unauthorized"] += 1
            hint = _AUTH_HINTS[self.behaviour.auth]
            raise _Refusal(401, Code.UNAUTHORIZED, f"Send your key as {hint}.")
        if token in self.world.revoked:
            raise _Refusal(401, Code.API_KEY_REVOKED, "This API key was revoked.")
        key = self.world.keys.get(token)
        if key is None:
            raise _Refusal(401, Code.API_KEY_INVALID, "This API key is not valid.")
        return key

    @staticmethod
    def _require(key: ApiKey, scope: str) -> None:
        if scope not in key.scopes:
            raise _Refusal(
                403, Code.API_KEY_INSUFFICIENT_SCOPE, f"This endpoint needs the {scope} scope."
            )

    # -- Idempotency-Key -----------------------------------------------------------------------

    def _idempotency_key(self, headers: dict[bytes, bytes]) -> str | None:
        """The key to honour, or None; raises under ``refuse`` if the header is there at all."""
        value = headers.get(HEADER_IDEMPOTENCY_KEY.lower().encode())
        if value is None or self.behaviour.idempotency == "ignore":
            return None
        if self.behaviour.idempotency == "refuse":
            raise _Refusal(
                400,
                Code.INVALID_REQUEST_BODY,
                f"{HEADER_IDEMPOTENCY_KEY} is not supported on this endpoint.",
                HEADER_IDEMPOTENCY_KEY,
            )
        return value.decode("latin-1") or None

    def _replay(self, api_key: str, idempotency_key: str, fingerprint: str) -> _Answer | None:
        """The stored answer for a repeat, 409 for the key reused on another request, or None."""
        horizon = self._clock() - _IDEMPOTENCY_TTL
        while self._idempotent:
            oldest = next(iter(self._idempotent))
            if self._idempotent[oldest].at > horizon:
                break
            del self._idempotent[oldest]
        stored = self._idempotent.get((api_key, idempotency_key))
        if stored is None:
            return None
        if stored.fingerprint != fingerprint:
            raise _Refusal(
                409,
                _IDEMPOTENCY_KEY_REUSE,
                f"This {HEADER_IDEMPOTENCY_KEY} was used for a different request.",
                HEADER_IDEMPOTENCY_KEY,
            )
        self.counters["idempotent_replays"] += 1
        return _Answer(200, stored.body, [(HEADER_IDEMPOTENCY_REPLAYED.lower().encode(), b"true")])

    # -- faults --------------------------------------------------------------------------------

    async def _decide_fault(self, request: _Request) -> Fault:
        if request.route not in ("summary", "item", "batch") or not self.faults.any_fault:
            return "none"
        target = f"{request.method} {request.path}"
        fault, delay = decide(self.faults, self.seed, target, self._target_counts[target])
        self._target_counts[target] += 1
        if delay > 0:
            await anyio.sleep(delay)
        if fault != "none":
            self.counters[f"fault_{fault}"] += 1
        return fault

    async def _inject_early(
        self, fault: Fault, send: Send, request_id: str, rate_headers: Headers
    ) -> bool:
        if fault == "500":
            refusal = _Refusal(
                500,
                Code.INTERNAL_SERVER_ERROR,
                "Internal server error.",
                retryable=self.behaviour.retryable_500,
            )
            await self._send_error(send, refusal, request_id, rate_headers)
            return True
        if fault in ("502", "503", "504"):
            await self._send_gateway_error(send, int(fault), request_id)
            return True
        if fault == "drop":
            # Headers promise a body that never comes; uvicorn then closes the connection.
            headers = [_JSON, (b"content-length", b"64")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            return True
        return False

    async def _send_gateway_error(self, send: Send, status: int, request_id: str) -> None:
        """A gateway in front of the API answered; it adds no rate-limit headers."""
        reason = _GATEWAY_REASONS[status]
        if self.behaviour.gateway == "envelope":
            refusal = _Refusal(status, _GATEWAY_CODES[status], f"{reason}.", retryable=True)
            await self._send_error(send, refusal, request_id, [])
            return
        page = _GATEWAY_PAGE % (status, status, reason.encode())
        headers = [(b"content-type", b"text/html"), (b"content-length", b"%d" % len(page))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": page})

    # -- envelope ------------------------------------------------------------------------------

    def _request_id(self, headers: dict[bytes, bytes]) -> str:
        given = headers.get(b"x-request-id")
        if given:
            return given.decode("latin-1")
        self._request_serial += 1
        return f"req_{self._request_serial:012d}"

    async def _send_error(
        self, send: Send, refusal: _Refusal, request_id: str, headers: Headers
    ) -> None:
        self.counters[f"status_{refusal.status}"] += 1
        error: dict[str, Any] = {
            "type": ERROR_TYPES.get(refusal.status, "server_error"),
            "code": refusal.code,
            "message": refusal.message,
            "retryable": refusal.retryable,
            "request_id": request_id,
            "doc_url": f"https://help.withallo.com/en/v2/api-reference/guides/error-codes#{refusal.code}",
        }
        if refusal.retryable is None:
            del error["retryable"]
        if refusal.param:
            error["param"] = refusal.param
        if refusal.retry_after is not None:
            error["retry_after_seconds"] = refusal.retry_after
        await _respond(send, refusal.status, {"error": error}, headers)

    # -- inspection ----------------------------------------------------------------------------

    def _inspect(
        self, method: str, path: str, scope: Scope, body: bytes
    ) -> tuple[int, dict[str, Any], Headers]:
        name = path[len("/_sandbox/") :]
        if method == "GET" and name == "state":
            written_only = b"written=1" in scope.get("query_string", b"")
            return 200, self.state(written_only=written_only), []
        if method == "POST" and name == "reset":
            self.reset()
            return 200, {"ok": True}, []
        if method == "POST" and name == "revoke":
            key = _parse_json(body).get("key") if body else None
            if not isinstance(key, str) or key not in self.world.keys:
                return 404, {"ok": False, "error": "no such key"}, []
            self.world.revoked.add(key)
            return 200, {"ok": True}, []
        return 404, {"ok": False, "error": f"no inspection endpoint {method} {path}"}, []

    def state(self, *, written_only: bool = False) -> dict[str, Any]:
        """Per (call, template): content hash, version, applied writes; the persona, counters.

        ``counters`` counts requests per route (``me``, ``patch``, ``get_item``, ``batch``),
        per ``Authorization`` form (``auth_prefixed``, ``auth_bare``, ``auth_other``,
        ``auth_missing``), refused forms (``unauthorized``), statuses, faults and writes.
        """
        summaries = [
            {
                "call_id": call_id,
                "template_key": template,
                "version": summary.version,
                "writes": summary.writes,
                "content_sha256": hashlib.sha256(summary.content.encode()).hexdigest(),
                "updated_at": summary.updated_at,
            }
            for call_id, templates in self.world.calls.items()
            for template, summary in templates.items()
            if summary.writes or not written_only
        ]
        return {
            "persona": persona_name(self.behaviour),
            "behaviour": self.behaviour.as_dict(),
            "summaries": summaries,
            "counters": dict(self.counters),
        }

    def reset(self) -> None:
        """Restore the initial world and zero every counter, window, history and stored key."""
        self.world = deepcopy(self._initial)
        self.limiter = make_limiter(self.behaviour.window, self._clock)
        self.counters.clear()
        self._target_counts.clear()
        self._history.clear()
        self._idempotent.clear()


def _segments(scope: Scope) -> list[str]:
    """The path's segments, split before percent-decoding so ``%2F`` stays inside its segment."""
    raw: bytes | None = scope.get("raw_path")
    if not raw:
        # Without raw_path only the decoded path is known; decoding it again would be wrong.
        return str(scope["path"]).split("/")
    raw = raw.split(b"?", 1)[0]
    return [unquote_to_bytes(part).decode("utf-8", "replace") for part in raw.split(b"/")]


def _route(method: str, segments: list[str]) -> tuple[Route, str]:
    """The route and the item id (empty when the route has none)."""
    if segments[:3] != ["", "v2", "api"]:
        return "unknown", ""
    rest = segments[3:]
    if rest == ["me"]:
        return ("me" if method == "GET" else "method"), ""
    if rest[:2] != ["conversations", "items"] or len(rest) < 3 or not rest[2]:
        return "unknown", ""
    item = rest[2:]
    if item == ["batch"]:
        return ("batch" if method == "POST" else "method"), ""
    if len(item) == 1:
        return ("item" if method == "GET" else "method"), item[0]
    if len(item) == 2 and item[1] == "summary":
        return ("summary" if method == "PATCH" else "method"), item[0]
    return "unknown", ""


def _auth_form(raw: str) -> tuple[str, str]:
    """Which form an ``Authorization`` value has (prefixed, bare, other, missing) and its key."""
    if not raw:
        return "missing", ""
    scheme, _, token = raw.partition(" ")
    if scheme == AUTH_SCHEME and token.strip():
        return "prefixed", token.strip()
    if not any(char.isspace() for char in raw):
        return "bare", raw
    return "other", ""


def _patch_fields(item_id: str, body: bytes) -> tuple[str, str | None]:
    """``content`` and ``template_key`` of a PATCH, after the id and body checks."""
    if not item_id.startswith(CALL_PREFIX):
        raise _Refusal(400, Code.INVALID_ITEM_ID, f"'{item_id}' is not a call id (cll-...).", "id")
    payload = _parse_object(body)
    content = payload.get("content")
    if not isinstance(content, str):
        raise _Refusal(
            400, Code.INVALID_REQUEST_BODY, "content is required and must be a string.", "content"
        )
    if len(content) > MAX_CONTENT_CHARS:
        raise _Refusal(
            400,
            Code.INVALID_REQUEST_BODY,
            f"content is {len(content)} characters; the maximum is {MAX_CONTENT_CHARS}.",
            "content",
        )
    template_key = payload.get("template_key")
    if template_key is not None and template_key not in TEMPLATE_KEYS:
        raise _Refusal(
            400,
            Code.INVALID_REQUEST_BODY,
            f"template_key must be one of {', '.join(TEMPLATE_KEYS)}.",
            "template_key",
        )
    return content, template_key


def _rate_headers(verdict: Verdict) -> Headers:
    return [
        (b"x-ratelimit-limit", str(verdict.limit).encode()),
        (b"x-ratelimit-remaining", str(verdict.remaining).encode()),
        (b"x-ratelimit-reset", str(verdict.reset).encode()),
    ]


def _require_json(headers: dict[bytes, bytes]) -> None:
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if content_type != b"application/json":
        raise _Refusal(415, Code.UNSUPPORTED_MEDIA_TYPE, "Send Content-Type: application/json.")


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Refusal(400, Code.INVALID_REQUEST_BODY, "The body is not valid JSON.") from exc


def _parse_object(body: bytes) -> dict[str, Any]:
    payload = _parse_json(body)
    if not isinstance(payload, dict):
        raise _Refusal(400, Code.INVALID_REQUEST_BODY, "The body must be a JSON object.")
    return payload


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _respond(send: Send, status: int, body: dict[str, Any], headers: Headers) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    all_headers = [_JSON, (b"content-length", b"%d" % len(payload)), *headers]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": payload})


async def _stall(receive: Receive, seconds: float) -> None:
    """Hold the answer back until ``seconds`` pass or the client gives up."""
    with anyio.move_on_after(seconds):
        while (await receive())["type"] != "http.disconnect":
            pass


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
