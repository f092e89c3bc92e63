"""The sandbox as a plain ASGI application that behaves like the documented Allo v2 API.

Routes (allo-api.md §1–§7):

- ``PATCH /v2/api/conversations/items/{id}/summary`` (``CONVERSATIONS_WRITE``)
- ``GET /v2/api/conversations/items/{id}`` and ``POST /v2/api/conversations/items/batch``
  (``CONVERSATIONS_READ``)
- ``GET /v2/api/me`` (any valid key)

and, under the separate prefix ``/_sandbox/`` (no key, loopback only): ``GET state``,
``POST reset``, ``POST revoke`` (``{"key": ...}``).

Choices where the docs are silent (allo-api.md marks them UNKNOWN), each a constructor option
where it matters: checks run in the order auth → rate limit → scope → media type → id → body →
existence; a call with no completed summary and no ``template_key`` answers 404
``SUMMARY_TEMPLATE_NOT_FOUND``; an identical PATCH still bumps the version; ``content`` length
counts code points; the batch read counts against the *write* budget (it is a POST);
rejected or unknown ids in a batch are left out silently; 401 answers carry no rate-limit headers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from copy import deepcopy
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import anyio

from allo_batch.constants import (
    AUTH_SCHEME,
    CALL_PREFIX,
    ERROR_TYPES,
    MAX_BATCH_IDS,
    MAX_CONTENT_CHARS,
    READ_SCOPE,
    SMS_PREFIX,
    TEMPLATE_KEYS,
    WRITE_SCOPE,
    Code,
)
from allo_batch.sandbox.faults import Fault, FaultSpec, decide
from allo_batch.sandbox.limits import FixedWindowLimiter
from allo_batch.sandbox.world import ApiKey, World

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_ITEMS = "/v2/api/conversations/items/"
_JSON = (b"content-type", b"application/json")
_GATEWAY_PAGE = b"<html><head><title>%d</title></head><body><h1>%d %s</h1></body></html>"


@dataclass(slots=True)
class _Answer:
    status: int
    body: dict[str, Any]
    headers: Headers


class _Refusal(Exception):
    """Raised inside a handler to answer with an error envelope."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


class SandboxApp:
    """A simulated Allo API over a :class:`World`; see the module docstring for the routes."""

    def __init__(
        self,
        world: World,
        *,
        faults: FaultSpec | None = None,
        seed: int = 0,
        batch_bucket: Literal["read", "write"] = "write",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.world = world
        self._initial = deepcopy(world)
        self.faults = faults or FaultSpec()
        self.seed = seed
        self.batch_bucket = batch_bucket
        self._clock = clock
        self.limiter = FixedWindowLimiter(clock)
        self.counters: Counter[str] = Counter()
        self._target_counts: Counter[str] = Counter()
        self._request_serial = 0

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
        request_id = self._request_id(headers)
        self.counters["requests"] += 1
        try:
            await self._serve(method, path, headers, body, request_id, receive, send)
        except _Refusal as refusal:
            # Only refusals before a key is known (401) reach here.
            await self._send_error(send, refusal, request_id, [])

    async def _serve(
        self,
        method: str,
        path: str,
        headers: dict[bytes, bytes],
        body: bytes,
        request_id: str,
        receive: Receive,
        send: Send,
    ) -> None:
        key = self._authenticate(headers)
        route = _route(method, path)
        bucket = "read" if method == "GET" else "write"
        if route == "batch":
            bucket = self.batch_bucket
        limit = key.read_per_second if bucket == "read" else key.write_per_second
        verdict = self.limiter.admit(key.key, bucket, limit)
        rate_headers: Headers = [
            (b"x-ratelimit-limit", str(verdict.limit).encode()),
            (b"x-ratelimit-remaining", str(verdict.remaining).encode()),
            (b"x-ratelimit-reset", str(verdict.reset).encode()),
        ]
        if not verdict.allowed:
            self.counters["rate_limited"] += 1
            refusal = _Refusal(
                429, Code.RATE_LIMIT_EXCEEDED, f"Rate limit of {limit} requests per second hit."
            )
            extra = [(b"retry-after", str(verdict.retry_after).encode())]
            await self._send_error(
                send, refusal, request_id, rate_headers + extra, verdict.retry_after
            )
            return
        fault: Fault = "none"
        if route in ("summary", "item", "batch") and self.faults.any_fault:
            target = f"{method} {path}"
            fault, delay = decide(self.faults, self.seed, target, self._target_counts[target])
            self._target_counts[target] += 1
            if delay > 0:
                await anyio.sleep(delay)
            if fault != "none":
                self.counters[f"fault_{fault}"] += 1
            if await self._inject_early(fault, send, request_id, rate_headers):
                return
        try:
            answer = self._dispatch(route, method, path, headers, body, key)
        except _Refusal as refusal:
            await self._send_error(send, refusal, request_id, rate_headers)
            return
        if fault == "stall":
            await _stall(receive, self.faults.stall_time)
        await _respond(send, answer.status, answer.body, rate_headers + answer.headers)

    # -- routing and handlers ------------------------------------------------------------------

    def _dispatch(
        self,
        route: str,
        method: str,
        path: str,
        headers: dict[bytes, bytes],
        body: bytes,
        key: ApiKey,
    ) -> _Answer:
        if route == "me":
            return self._me(key)
        if route == "batch":
            self._require(key, READ_SCOPE)
            return self._batch(headers, body)
        if route == "item":
            self._require(key, READ_SCOPE)
            return self._get_item(path[len(_ITEMS) :])
        if route == "summary":
            self._require(key, WRITE_SCOPE)
            return self._patch_summary(path[len(_ITEMS) : -len("/summary")], headers, body)
        if route == "method":
            raise _Refusal(405, Code.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}.")
        raise _Refusal(404, Code.ENDPOINT_NOT_FOUND, f"No endpoint at {path}.")

    def _patch_summary(self, item_id: str, headers: dict[bytes, bytes], body: bytes) -> _Answer:
        _require_json(headers)
        if not item_id.startswith(CALL_PREFIX):
            raise _Refusal(
                400, Code.INVALID_ITEM_ID, f"'{item_id}' is not a call id (cll-...).", "id"
            )
        payload = _parse_object(body)
        content = payload.get("content")
        if not isinstance(content, str):
            raise _Refusal(
                400,
                Code.INVALID_REQUEST_BODY,
                "content is required and must be a string.",
                "content",
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
        if summary is None:
            raise _Refusal(
                404,
                Code.SUMMARY_TEMPLATE_NOT_FOUND,
                f"Call '{item_id}' has no completed summary for {template_key or 'any template'}.",
                "template_key",
            )
        summary.content = content
        summary.version += 1
        summary.writes += 1
        summary.updated_at = datetime.fromtimestamp(self._clock(), UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
        self.counters["writes_applied"] += 1
        data = {
            "id": item_id,
            "content": content,
            "version": summary.version,
            "updated_at": summary.updated_at,
            "updated_by": {"id": "usr-sandbox000001", "name": "Sandbox API User"},
        }
        return _Answer(200, {"data": data}, [])

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

    def _batch(self, headers: dict[bytes, bytes], body: bytes) -> _Answer:
        _require_json(headers)
        ids = _parse_object(body).get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise _Refusal(400, Code.INVALID_REQUEST_BODY, "ids must be a list of strings.", "ids")
        if len(ids) > MAX_BATCH_IDS:
            raise _Refusal(
                400,
                Code.BATCH_TOO_LARGE,
                f"{len(ids)} ids given; the maximum is {MAX_BATCH_IDS}.",
                "ids",
            )
        items = [item for item in map(self._item, ids) if item is not None]
        return _Answer(200, {"data": items}, [])

    def _item(self, item_id: str) -> dict[str, Any] | None:
        if item_id in self.world.sms:
            return {"id": item_id, "type": "SMS", "summary": None, "content": "SMS text"}
        summaries = self.world.calls.get(item_id)
        if summaries is None:
            return None
        shown = summaries.get(TEMPLATE_KEYS[0]) or next(iter(summaries.values()), None)
        return {
            "id": item_id,
            "type": "CALL",
            "direction": "INBOUND",
            "result": "ANSWERED",
            "date": "2026-01-01T00:00:00Z",
            "duration": 120,
            "summary": shown.content if shown else None,
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

    # -- checks --------------------------------------------------------------------------------

    def _authenticate(self, headers: dict[bytes, bytes]) -> ApiKey:
        raw = headers.get(b"authorization", b"").decode("latin-1").strip()
        if not raw:
            raise _Refusal(
                401, Code.UNAUTHORIZED, f"Send your key as 'Authorization: {AUTH_SCHEME} <key>'."
            )
        scheme, _, token = raw.partition(" ")
        if scheme != AUTH_SCHEME or not token:
            raise _Refusal(
                401, Code.UNAUTHORIZED, f"Send your key as 'Authorization: {AUTH_SCHEME} <key>'."
            )
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

    # -- faults --------------------------------------------------------------------------------

    async def _inject_early(
        self, fault: Fault, send: Send, request_id: str, rate_headers: Headers
    ) -> bool:
        if fault == "500":
            refusal = _Refusal(500, Code.INTERNAL_SERVER_ERROR, "Internal server error.")
            await self._send_error(send, refusal, request_id, rate_headers, retryable=True)
            return True
        if fault in ("502", "503"):
            status = int(fault)
            reason = b"Bad Gateway" if status == 502 else b"Service Unavailable"
            page = _GATEWAY_PAGE % (status, status, reason)
            headers = [(b"content-type", b"text/html"), (b"content-length", b"%d" % len(page))]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": page})
            return True
        if fault == "drop":
            # Headers promise a body that never comes; uvicorn then closes the connection.
            headers = [_JSON, (b"content-length", b"64")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            return True
        return False

    # -- envelope ------------------------------------------------------------------------------

    def _request_id(self, headers: dict[bytes, bytes]) -> str:
        given = headers.get(b"x-request-id")
        if given:
            return given.decode("latin-1")
        self._request_serial += 1
        return f"req_{self._request_serial:012d}"

    async def _send_error(
        self,
        send: Send,
        refusal: _Refusal,
        request_id: str,
        headers: Headers,
        retry_after: int | None = None,
        *,
        retryable: bool | None = None,
    ) -> None:
        self.counters[f"status_{refusal.status}"] += 1
        error: dict[str, Any] = {
            "type": ERROR_TYPES.get(refusal.status, "server_error"),
            "code": refusal.code,
            "message": refusal.message,
            "retryable": refusal.status == 429 if retryable is None else retryable,
            "request_id": request_id,
            "doc_url": f"https://help.withallo.com/en/v2/api-reference/guides/error-codes#{refusal.code}",
        }
        if refusal.param:
            error["param"] = refusal.param
        if retry_after is not None:
            error["retry_after_seconds"] = retry_after
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
        """Per (call, template): content hash, version, applied writes; plus the counters."""
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
        return {"summaries": summaries, "counters": dict(self.counters)}

    def reset(self) -> None:
        """Restore the initial world and zero every counter."""
        self.world = deepcopy(self._initial)
        self.limiter = FixedWindowLimiter(self._clock)
        self.counters.clear()
        self._target_counts.clear()


def _route(method: str, path: str) -> str:
    if path == "/v2/api/me":
        return "me" if method == "GET" else "method"
    if path == "/v2/api/conversations/items/batch":
        return "batch" if method == "POST" else "method"
    if path.startswith(_ITEMS):
        rest = path[len(_ITEMS) :]
        if rest.endswith("/summary") and "/" not in rest[: -len("/summary")]:
            return "summary" if method == "PATCH" else "method"
        if rest and "/" not in rest:
            return "item" if method == "GET" else "method"
    return "unknown"


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
