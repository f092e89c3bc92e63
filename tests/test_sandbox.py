"""The sandbox reproduces the documented Allo v2 contract, over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from allo_batch.constants import MAX_CONTENT_CHARS
from allo_batch.sandbox import ApiKey, FaultSpecError, SandboxApp, build_world, parse_fault_spec
from allo_batch.sandbox.faults import decide
from allo_batch.sandbox.limits import FixedWindowLimiter
from allo_batch.sandbox.world import WorldError, load_world_file, pairs_from_file
from tests.helpers import SANDBOX_KEY, SandboxFactory, sha

KEY = SANDBOX_KEY
READ_ONLY = "ak_test_read"
WRITE_ONLY = "ak_test_write"


def make_world() -> Any:
    world = build_world(api_key=KEY, write_rate=1000, read_rate=1000)
    world.add_call("cll-one", ["MARKDOWN_CLASSIC"])
    world.add_call("cll-short", ["MARKDOWN_SHORT_CALL"])
    world.add_call("cll-two", ["MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"])
    world.add_call("cll-none", [])
    world.sms.add("msg-sms")
    world.add_key(ApiKey(key=READ_ONLY, scopes=("CONVERSATIONS_READ",)))
    world.add_key(ApiKey(key=WRITE_ONLY, scopes=("CONVERSATIONS_WRITE",)))
    return world


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Api-Key {key}"}


def patch(
    client: httpx.Client, call_id: str, body: Any, *, key: str = KEY, raw: bytes | None = None
) -> httpx.Response:
    headers = {**auth(key), "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return client.patch(
        f"/v2/api/conversations/items/{call_id}/summary", content=content, headers=headers
    )


@pytest.fixture
def client(sandbox_factory: SandboxFactory) -> Any:
    with (
        sandbox_factory(make_world(), api_key=KEY) as sandbox,
        httpx.Client(base_url=sandbox.base_url) as c,
    ):
        c.sandbox = sandbox  # type: ignore[attr-defined]
        yield c


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert {"type", "code", "message", "retryable", "request_id"} <= set(error)
    assert re.fullmatch(r"req_[A-Za-z0-9]{12}", error["request_id"])
    return error


class TestPatchSummary:
    def test_success_returns_documented_data_and_version_rises_by_one(
        self, client: httpx.Client
    ) -> None:
        """A PATCH answers the CallSummary object; each applied update adds one to the version."""
        first = patch(client, "cll-one", {"content": "# Fixed\n"})
        assert first.status_code == 200
        data = first.json()["data"]
        assert data["id"] == "cll-one"
        assert data["content"] == "# Fixed\n"
        assert data["version"] == 2
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", data["updated_at"])
        assert data["updated_by"]["id"].startswith("usr-")
        second = patch(
            client, "cll-one", {"content": "# Fixed\n", "template_key": "MARKDOWN_CLASSIC"}
        )
        assert second.json()["data"]["version"] == 3

    def test_template_key_selects_one_of_two(self, client: httpx.Client) -> None:
        """With two completed templates, each key updates its own summary."""
        assert (
            patch(
                client, "cll-two", {"content": "a", "template_key": "MARKDOWN_SHORT_CALL"}
            ).status_code
            == 200
        )
        state = {(s["call_id"], s["template_key"]): s for s in client.sandbox.state()["summaries"]}  # type: ignore[attr-defined]
        assert state[("cll-two", "MARKDOWN_SHORT_CALL")]["writes"] == 1
        assert state[("cll-two", "MARKDOWN_CLASSIC")]["writes"] == 0

    def test_exactly_the_maximum_length_is_accepted(self, client: httpx.Client) -> None:
        """100,000 characters is within the limit."""
        assert patch(client, "cll-one", {"content": "é" * MAX_CONTENT_CHARS}).status_code == 200

    @pytest.mark.parametrize(
        ("call_id", "body", "raw", "status", "code"),
        [
            pytest.param("msg-sms", {"content": "x"}, None, 400, "INVALID_ITEM_ID", id="sms-id"),
            pytest.param(
                "abc-1", {"content": "x"}, None, 400, "INVALID_ITEM_ID", id="other-prefix"
            ),
            pytest.param("cll-one", {}, None, 400, "INVALID_REQUEST_BODY", id="missing-content"),
            pytest.param(
                "cll-one",
                {"content": 5},
                None,
                400,
                "INVALID_REQUEST_BODY",
                id="content-not-string",
            ),
            pytest.param(
                "cll-one", {"content": None}, None, 400, "INVALID_REQUEST_BODY", id="content-null"
            ),
            pytest.param(
                "cll-one",
                {"content": "x" * (MAX_CONTENT_CHARS + 1)},
                None,
                400,
                "INVALID_REQUEST_BODY",
                id="too-long",
            ),
            pytest.param(
                "cll-one",
                {"content": "x", "template_key": "CUSTOM"},
                None,
                400,
                "INVALID_REQUEST_BODY",
                id="bad-template",
            ),
            pytest.param("cll-one", None, b"{not json", 400, "INVALID_REQUEST_BODY", id="not-json"),
            pytest.param("cll-one", None, b"[1, 2]", 400, "INVALID_REQUEST_BODY", id="json-array"),
            pytest.param(
                "cll-two",
                {"content": "x"},
                None,
                400,
                "SUMMARY_TEMPLATE_KEY_REQUIRED",
                id="two-templates",
            ),
            pytest.param(
                "cll-missing",
                {"content": "x"},
                None,
                404,
                "CONVERSATION_ITEM_NOT_FOUND",
                id="no-call",
            ),
            pytest.param(
                "cll-one",
                {"content": "x", "template_key": "MARKDOWN_SHORT_CALL"},
                None,
                404,
                "SUMMARY_TEMPLATE_NOT_FOUND",
                id="template-not-completed",
            ),
            pytest.param(
                "cll-none",
                {"content": "x"},
                None,
                404,
                "SUMMARY_TEMPLATE_NOT_FOUND",
                id="no-completed",
            ),
        ],
    )
    def test_refusals_carry_the_documented_code(
        self,
        client: httpx.Client,
        call_id: str,
        body: Any,
        raw: bytes | None,
        status: int,
        code: str,
    ) -> None:
        """Every documented refusal comes in the v2 envelope with its status and code."""
        response = patch(client, call_id, body, raw=raw)
        assert response.status_code == status
        error = error_of(response)
        assert error["code"] == code
        assert error["retryable"] is False
        assert error["type"] == {400: "validation_error", 404: "not_found_error"}[status]
        assert client.sandbox.state(written_only=True)["summaries"] == []  # type: ignore[attr-defined]

    def test_non_json_content_type_is_415(self, client: httpx.Client) -> None:
        """A body sent as text/plain is refused with UNSUPPORTED_MEDIA_TYPE."""
        response = client.patch(
            "/v2/api/conversations/items/cll-one/summary",
            content=b'{"content": "x"}',
            headers={**auth(), "Content-Type": "text/plain"},
        )
        assert response.status_code == 415
        assert error_of(response)["code"] == "UNSUPPORTED_MEDIA_TYPE"

    def test_client_request_id_is_used(self, client: httpx.Client) -> None:
        """An X-Request-Id sent by the client becomes the envelope's request_id."""
        response = client.patch(
            "/v2/api/conversations/items/msg-sms/summary",
            content=b'{"content": "x"}',
            headers={
                **auth(),
                "Content-Type": "application/json",
                "X-Request-Id": "req_abcdefABCDEF",
            },
        )
        assert error_of(response)["request_id"] == "req_abcdefABCDEF"


class TestAuth:
    @pytest.mark.parametrize(
        ("headers", "code"),
        [
            pytest.param({}, "UNAUTHORIZED", id="no-header"),
            pytest.param({"Authorization": f"Bearer {KEY}"}, "UNAUTHORIZED", id="bearer"),
            pytest.param({"Authorization": KEY}, "UNAUTHORIZED", id="bare-key"),
            pytest.param({"Authorization": "Api-Key ak_nope"}, "API_KEY_INVALID", id="unknown-key"),
        ],
    )
    def test_identity_problems_are_401(
        self, client: httpx.Client, headers: dict[str, str], code: str
    ) -> None:
        """Missing, malformed or unknown keys get 401 with authentication_error."""
        response = client.get("/v2/api/me", headers=headers)
        assert response.status_code == 401
        error = error_of(response)
        assert (error["code"], error["type"]) == (code, "authentication_error")

    def test_revoked_key_is_401_revoked(self, client: httpx.Client) -> None:
        """After the inspection endpoint revokes a key, it gets API_KEY_REVOKED."""
        assert client.post("/_sandbox/revoke", json={"key": KEY}).status_code == 200
        response = patch(client, "cll-one", {"content": "x"})
        assert response.status_code == 401
        assert error_of(response)["code"] == "API_KEY_REVOKED"

    def test_scopes_are_checked_per_endpoint(self, client: httpx.Client) -> None:
        """A read-only key cannot PATCH, a write-only key cannot read; /me needs no scope."""
        refused = patch(client, "cll-one", {"content": "x"}, key=READ_ONLY)
        assert refused.status_code == 403
        assert error_of(refused)["code"] == "API_KEY_INSUFFICIENT_SCOPE"
        assert error_of(refused)["type"] == "permission_error"
        read = client.get("/v2/api/conversations/items/cll-one", headers=auth(WRITE_ONLY))
        assert read.status_code == 403
        assert client.get("/v2/api/me", headers=auth(READ_ONLY)).json()["data"]["scopes"] == [
            "CONVERSATIONS_READ"
        ]


class TestReads:
    def test_me_reports_scopes_and_rate_limits(self, client: httpx.Client) -> None:
        """/me answers the key's scopes and per-second budgets."""
        data = client.get("/v2/api/me", headers=auth()).json()["data"]
        assert data["api_key_id"].startswith("api-")
        assert set(data["scopes"]) == {"CONVERSATIONS_READ", "CONVERSATIONS_WRITE"}
        assert data["rate_limits"] == {"read_per_second": 1000, "write_per_second": 1000}

    def test_get_item_shows_the_current_summary(self, client: httpx.Client) -> None:
        """GET item returns the call with its summary string, updated after a PATCH."""
        patch(client, "cll-one", {"content": "# New"})
        item = client.get("/v2/api/conversations/items/cll-one", headers=auth()).json()["data"]
        assert (item["id"], item["type"], item["summary"]) == ("cll-one", "CALL", "# New")
        sms = client.get("/v2/api/conversations/items/msg-sms", headers=auth()).json()["data"]
        assert (sms["type"], sms["summary"]) == ("SMS", None)
        missing = client.get("/v2/api/conversations/items/cll-nope", headers=auth())
        assert error_of(missing)["code"] == "CONVERSATION_ITEM_NOT_FOUND"
        bad = client.get("/v2/api/conversations/items/xyz-1", headers=auth())
        assert error_of(bad)["code"] == "INVALID_ITEM_ID"

    def test_batch_leaves_out_missing_ids_and_caps_at_100(self, client: httpx.Client) -> None:
        """The batch read returns known items only, and refuses more than 100 ids."""
        found = client.post(
            "/v2/api/conversations/items/batch",
            json={"ids": ["cll-one", "cll-nope", "msg-sms"]},
            headers=auth(),
        )
        assert [item["id"] for item in found.json()["data"]] == ["cll-one", "msg-sms"]
        too_many = client.post(
            "/v2/api/conversations/items/batch",
            json={"ids": [f"cll-{i}" for i in range(101)]},
            headers=auth(),
        )
        assert too_many.status_code == 400
        assert error_of(too_many)["code"] == "BATCH_TOO_LARGE"

    def test_unknown_endpoint_and_method(self, client: httpx.Client) -> None:
        """Unknown paths are 404 ENDPOINT_NOT_FOUND; wrong methods 405."""
        assert (
            error_of(client.get("/v2/api/nothing", headers=auth()))["code"] == "ENDPOINT_NOT_FOUND"
        )
        wrong = client.delete("/v2/api/conversations/items/cll-one/summary", headers=auth())
        assert (wrong.status_code, error_of(wrong)["code"]) == (405, "METHOD_NOT_ALLOWED")


class TestRateLimits:
    def test_headers_on_every_answer_and_429_past_the_limit(
        self, sandbox_factory: SandboxFactory
    ) -> None:
        """One window admits L writes, then 429 with Retry-After and the envelope."""
        world = build_world(api_key=KEY, write_rate=3, read_rate=50)
        world.add_call("cll-one", ["MARKDOWN_CLASSIC"])
        clock = FrozenClock(1_800_000_000.25)
        with (
            sandbox_factory(world, api_key=KEY, clock=clock) as sandbox,
            httpx.Client(base_url=sandbox.base_url) as c,
        ):
            answers = [patch(c, "cll-one", {"content": str(i)}) for i in range(4)]
            assert [a.status_code for a in answers] == [200, 200, 200, 429]
            assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
            assert {a.headers["X-RateLimit-Limit"] for a in answers} == {"3"}
            assert {a.headers["X-RateLimit-Reset"] for a in answers} == {"1800000001"}
            refused = answers[-1]
            assert refused.headers["Retry-After"] == "1"
            error = error_of(refused)
            assert (error["code"], error["type"], error["retryable"]) == (
                "RATE_LIMIT_EXCEEDED",
                "rate_limit_error",
                True,
            )
            assert error["retry_after_seconds"] == 1
            # Reads have their own budget, untouched by the writes.
            assert c.get("/v2/api/me", headers=auth()).headers["X-RateLimit-Remaining"] == "49"
            assert sandbox.state()["counters"]["rate_limited"] == 1

    def test_window_boundary_resets_the_budget(self, sandbox_factory: SandboxFactory) -> None:
        """The budget is the whole Unix second: spent at x.999, full at (x+1).000."""
        world = build_world(api_key=KEY, write_rate=2)
        world.add_call("cll-one", ["MARKDOWN_CLASSIC"])
        clock = FrozenClock(1_800_000_000.0)
        with (
            sandbox_factory(world, api_key=KEY, clock=clock) as sandbox,
            httpx.Client(base_url=sandbox.base_url) as c,
        ):
            assert [patch(c, "cll-one", {"content": "a"}).status_code for _ in range(3)] == [
                200,
                200,
                429,
            ]
            clock.now = 1_800_000_000.999
            assert patch(c, "cll-one", {"content": "b"}).status_code == 429
            clock.now = 1_800_000_001.0
            fresh = patch(c, "cll-one", {"content": "c"})
            assert fresh.status_code == 200
            assert fresh.headers["X-RateLimit-Reset"] == "1800000002"
            assert fresh.headers["X-RateLimit-Remaining"] == "1"

    def test_limits_are_per_key(self) -> None:
        """Two keys spend separate budgets."""
        limiter = FixedWindowLimiter(lambda: 100.5)
        assert limiter.admit("a", "write", 1).allowed
        assert not limiter.admit("a", "write", 1).allowed
        assert limiter.admit("b", "write", 1).allowed
        assert limiter.admit("a", "read", 1).allowed

    def test_real_clock_window_turns(self, sandbox_factory: SandboxFactory) -> None:
        """With the real clock, a spent window is open again after its Reset second."""
        world = build_world(api_key=KEY, write_rate=1)
        world.add_call("cll-one", ["MARKDOWN_CLASSIC"])
        with (
            sandbox_factory(world, api_key=KEY) as sandbox,
            httpx.Client(base_url=sandbox.base_url) as c,
        ):
            first = patch(c, "cll-one", {"content": "a"})
            statuses = [first.status_code]
            reset = int(first.headers["X-RateLimit-Reset"])
            deadline = time.monotonic() + 5
            while time.time() < reset and time.monotonic() < deadline:
                time.sleep(0.05)
            statuses.append(patch(c, "cll-one", {"content": "b"}).status_code)
            assert statuses == [200, 200]


class FrozenClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TestFaults:
    def test_spec_parsing(self) -> None:
        """The documented spec parses; mistakes are named."""
        spec = parse_fault_spec(
            "latency=50ms,jitter=20ms,500=0.1,502=0.05,503=0.05,drop=0.01,stall=0.02,stall-time=2s"
        )
        assert (
            spec.latency,
            spec.jitter,
            spec.p500,
            spec.p503,
            spec.drop,
            spec.stall,
            spec.stall_time,
        ) == (
            0.05,
            0.02,
            0.1,
            0.05,
            0.01,
            0.02,
            2.0,
        )
        for bad in ("latency=fast", "500=2", "teapot=0.1", "500", "500=0.6,503=0.6"):
            with pytest.raises(FaultSpecError):
                parse_fault_spec(bad)

    def test_decisions_depend_only_on_seed_target_and_count(self) -> None:
        """Same seed, same faults; another seed, other faults; rates near the probabilities."""
        spec = parse_fault_spec("500=0.2,drop=0.1,latency=10ms,jitter=5ms")
        first = [decide(spec, 7, f"t{i}", 0) for i in range(2000)]
        assert first == [decide(spec, 7, f"t{i}", 0) for i in range(2000)]
        assert first != [decide(spec, 8, f"t{i}", 0) for i in range(2000)]
        kinds = [kind for kind, _ in first]
        assert 300 < kinds.count("500") < 500
        assert 130 < kinds.count("drop") < 270
        assert all(0.005 <= delay <= 0.015 for _, delay in first)

    def test_injected_faults_over_the_wire(self, sandbox_factory: SandboxFactory) -> None:
        """500 envelopes, non-JSON 502/503 pages and dropped connections reach a real client."""
        world = build_world(api_key=KEY, write_rate=10_000)
        for i in range(60):
            world.add_call(f"cll-{i}", ["MARKDOWN_CLASSIC"])
        seen: dict[str, int] = {}
        with (
            sandbox_factory(
                world, api_key=KEY, faults="500=0.2,502=0.1,503=0.1,drop=0.2", seed=3
            ) as sandbox,
            httpx.Client(base_url=sandbox.base_url) as c,
        ):
            for i in range(60):
                try:
                    response = patch(c, f"cll-{i}", {"content": "x"})
                except httpx.TransportError:
                    seen["drop"] = seen.get("drop", 0) + 1
                    continue
                if response.status_code == 500:
                    assert error_of(response)["code"] == "INTERNAL_SERVER_ERROR"
                elif response.status_code in (502, 503):
                    assert response.headers["content-type"] == "text/html"
                    assert response.text.startswith("<html>")
                seen[str(response.status_code)] = seen.get(str(response.status_code), 0) + 1
            counters = sandbox.state()["counters"]
            applied = sandbox.state(written_only=True)["summaries"]
        assert seen.get("drop", 0) == counters.get("fault_drop", 0) > 0
        assert seen.get("500", 0) == counters.get("fault_500", 0) > 0
        assert (
            seen.get("502", 0) + seen.get("503", 0)
            == counters.get("fault_502", 0) + counters.get("fault_503", 0)
            > 0
        )
        assert len(applied) == seen["200"] == counters["writes_applied"]

    def test_stall_applies_the_write_and_withholds_the_answer(
        self, sandbox_factory: SandboxFactory
    ) -> None:
        """A stalled request times out at the client although its write landed."""
        world = build_world(api_key=KEY)
        world.add_call("cll-s", ["MARKDOWN_CLASSIC"])
        with (
            sandbox_factory(world, api_key=KEY, faults="stall=1,stall-time=5s") as sandbox,
            httpx.Client(base_url=sandbox.base_url, timeout=0.5) as c,
        ):
            with pytest.raises(httpx.ReadTimeout):
                patch(c, "cll-s", {"content": "landed"})
            state = sandbox.state(written_only=True)
        assert [(s["call_id"], s["writes"], s["version"]) for s in state["summaries"]] == [
            ("cll-s", 1, 2)
        ]
        assert state["counters"]["fault_stall"] == 1

    def test_latency_is_added(self, sandbox_factory: SandboxFactory) -> None:
        """Injected latency delays conversation answers by at least latency − jitter."""
        world = build_world(api_key=KEY, read_rate=100)
        world.add_call("cll-l", ["MARKDOWN_CLASSIC"])
        with (
            sandbox_factory(world, api_key=KEY, faults="latency=150ms,jitter=50ms") as sandbox,
            httpx.Client(base_url=sandbox.base_url) as c,
        ):
            started = time.perf_counter()
            assert c.get("/v2/api/conversations/items/cll-l", headers=auth()).status_code == 200
            assert time.perf_counter() - started >= 0.1


class TestInspectionAndWorlds:
    def test_state_reports_hash_version_writes_and_reset_restores(
        self, client: httpx.Client
    ) -> None:
        """State shows each summary's content hash, version and applied writes; reset undoes it."""
        patch(client, "cll-one", {"content": "# Fixed"})
        patch(client, "cll-one", {"content": "# Fixed again"})
        state = client.get("/_sandbox/state?written=1").json()
        [one] = state["summaries"]
        assert one["content_sha256"] == sha("# Fixed again")
        assert (one["version"], one["writes"]) == (3, 2)
        assert state["counters"]["writes_applied"] == 2
        assert client.post("/_sandbox/reset").json() == {"ok": True}
        after = client.get("/_sandbox/state").json()
        assert after["counters"] == {}
        assert {(s["call_id"], s["version"], s["writes"]) for s in after["summaries"]} >= {
            ("cll-one", 1, 0)
        }

    def test_world_file_with_keys(self, tmp_path: Path) -> None:
        """A world file declares calls with 0–2 templates, SMS ids, and keys."""
        path = tmp_path / "world.json"
        path.write_text(
            json.dumps(
                {
                    "calls": [
                        {"id": "cll-a", "templates": ["MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"]},
                        {"id": "cll-b", "templates": []},
                    ],
                    "sms": ["msg-1"],
                    "keys": [
                        {"key": "ak_r", "scopes": ["CONVERSATIONS_READ"], "write_per_second": 2}
                    ],
                }
            )
        )
        world = load_world_file(path)
        assert set(world.calls["cll-a"]) == {"MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"}
        assert world.calls["cll-b"] == {}
        assert world.sms == {"msg-1"}
        assert world.keys["ak_r"].scopes == ("CONVERSATIONS_READ",)
        assert world.keys["ak_r"].write_per_second == 2
        path.write_text(json.dumps({"calls": [{"id": "msg-x"}]}))
        with pytest.raises(WorldError, match="cll-"):
            load_world_file(path)
        # Wrong shapes are named too (they were a TypeError: exit 70, "a bug").
        for shape, said in (
            ({"calls": 5}, "'calls' must be a list, not int"),
            ({"keys": {"key": "k"}}, "'keys' must be a list, not dict"),
            ({"calls": [{"id": "cll-a", "templates": "MARKDOWN"}]}, "must be a list of names"),
        ):
            path.write_text(json.dumps(shape))
            with pytest.raises(WorldError, match=said):
                load_world_file(path)

    def test_seeded_from_an_input_file(self, tmp_path: Path) -> None:
        """Every cll- id of the input exists with the templates its rows name; others do not."""
        path = tmp_path / "in.csv"
        path.write_text(
            "call_id,template_key,content\n"
            "cll-1,,a\ncll-2,MARKDOWN_SHORT_CALL,b\ncll-3,MARKDOWN_CLASSIC,c\n"
            "cll-3,MARKDOWN_SHORT_CALL,d\nmsg-9,,e\ncll-4,WEIRD,f\n"
        )
        world = build_world(seed_pairs=pairs_from_file(path))
        assert {call: sorted(t) for call, t in world.calls.items()} == {
            "cll-1": ["MARKDOWN_CLASSIC"],
            "cll-2": ["MARKDOWN_SHORT_CALL"],
            "cll-3": ["MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"],
            "cll-4": ["MARKDOWN_CLASSIC"],
        }

    def test_plain_asgi_app_works_with_asgi_transport(self) -> None:
        """The app is a plain ASGI callable usable in-process via httpx.ASGITransport."""
        import anyio

        world = make_world()

        async def go() -> int:
            transport = httpx.ASGITransport(app=SandboxApp(world))
            async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as c:
                response = await c.get("/v2/api/me", headers=auth())
                return response.status_code

        assert anyio.run(go) == 200


def raw_request(base_url: str, request_line: str, headers: dict[str, str], body: bytes) -> bytes:
    """Send bytes exactly as written, so no client library normalises the path."""
    host, port = base_url.removeprefix("http://").split(":")
    lines = [request_line, f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        chunks = []
        while chunk := sock.recv(65536):  # bounded: the server closes after one answer
            chunks.append(chunk)
    return b"".join(chunks)


class TestPaths:
    def test_an_encoded_id_is_one_segment_never_another_route(
        self, sandbox_factory: SandboxFactory
    ) -> None:
        """%2F inside an id is part of the id: a traversal-looking id is just an unknown call."""
        hostile = quote("cll-x/../../v2/api/webhooks/wh-1", safe="")
        with sandbox_factory(make_world(), api_key=KEY) as sandbox:
            answer = raw_request(
                sandbox.base_url,
                f"PATCH /v2/api/conversations/items/{hostile}/summary HTTP/1.1",
                {**auth(), "Content-Type": "application/json"},
                b'{"content": "x"}',
            )
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404")
            error = json.loads(body)["error"]
            assert (error["code"], error["param"]) == ("CONVERSATION_ITEM_NOT_FOUND", "id")
            assert "cll-x/../../v2/api/webhooks/wh-1" in error["message"]
            counters = sandbox.state()["counters"]
        assert (counters["patch"], counters.get("unknown_route", 0)) == (1, 0)

    def test_an_id_with_a_slash_addresses_that_call(self, sandbox_factory: SandboxFactory) -> None:
        """Segments are decoded after splitting, so an id holding '/' is reachable, encoded."""
        world = make_world()
        world.add_call("cll-a/b", ["MARKDOWN_CLASSIC"])
        with (
            sandbox_factory(world, api_key=KEY) as sandbox,
            httpx.Client(base_url=sandbox.base_url) as c,
        ):
            written = patch(c, quote("cll-a/b", safe=""), {"content": "slash"})
            read = c.get(f"/v2/api/conversations/items/{quote('cll-a/b', safe='')}", headers=auth())
            unencoded = patch(c, "cll-a/b", {"content": "x"})
        assert (written.status_code, written.json()["data"]["id"]) == (200, "cll-a/b")
        assert read.json()["data"]["summary"] == "slash"
        assert error_of(unencoded)["code"] == "ENDPOINT_NOT_FOUND"

    def test_without_raw_path_the_decoded_path_is_routed(self) -> None:
        """An ASGI server that gives no raw_path still reaches every route through path."""
        import anyio

        app = SandboxApp(make_world())
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/v2/api/conversations/items/cll-one",
            "headers": [(b"authorization", f"Api-Key {KEY}".encode())],
        }
        anyio.run(app, scope, receive, send)
        assert sent[0]["status"] == 200
        assert json.loads(sent[1]["body"])["data"]["id"] == "cll-one"


class TestCountersAndOutage:
    def test_counters_per_route_and_per_auth_form(self, client: httpx.Client) -> None:
        """The state counts requests per route and per Authorization form, refused or not."""
        client.get("/v2/api/me", headers={"Authorization": KEY})
        client.get("/v2/api/me", headers=auth())
        patch(client, "cll-one", {"content": "x"})
        client.get("/v2/api/conversations/items/cll-one", headers=auth())
        client.post("/v2/api/conversations/items/batch", json={"ids": []}, headers=auth())
        client.get("/v2/api/nothing")
        state = client.sandbox.state()  # type: ignore[attr-defined]
        counts = {k: v for k, v in state["counters"].items() if not k.startswith("status_")}
        assert counts == {
            "requests": 6,
            "me": 2,
            "patch": 1,
            "get_item": 1,
            "batch": 1,
            "unknown_route": 1,
            "auth_bare": 1,
            "auth_prefixed": 4,
            "auth_missing": 1,
            "unauthorized": 2,
            "writes_applied": 1,
        }
        assert state["persona"] == "documented"

    def test_an_outage_refuses_connections_then_serves_the_same_state(
        self, sandbox_factory: SandboxFactory
    ) -> None:
        """During an outage the port refuses connections; after it, earlier writes are there."""
        with sandbox_factory(make_world(), api_key=KEY) as sandbox:
            me = f"{sandbox.base_url}/v2/api/me"
            with httpx.Client(base_url=sandbox.base_url) as c:
                assert patch(c, "cll-one", {"content": "kept"}).status_code == 200
            with sandbox.down(), pytest.raises(httpx.ConnectError):
                httpx.get(me, headers=auth(), timeout=2)
            outage = threading.Thread(target=sandbox.outage, args=(1.0,))
            outage.start()
            refused = False
            deadline = time.monotonic() + 5
            while outage.is_alive() and not refused and time.monotonic() < deadline:
                try:
                    httpx.get(me, headers=auth(), timeout=2)
                except httpx.ConnectError:
                    refused = True
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    pass  # accepted just as the server went down, then cut: not refused yet
                time.sleep(0.02)
            outage.join(10)
            assert refused
            assert httpx.get(me, headers=auth(), timeout=5).status_code == 200
            state = sandbox.state(written_only=True)
        assert [(s["call_id"], s["writes"]) for s in state["summaries"]] == [("cll-one", 1)]
        assert state["counters"]["patch"] == 1
        assert state["counters"]["me"] >= 1


def test_sandbox_command_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """`allo-batch sandbox --port 0` prints its URL and key, serves, and exits 0 on SIGINT."""
    with subprocess.Popen(
        [sys.executable, "-m", "allo_batch", "sandbox", "--port", "0", "--api-key", "ak_cli"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stdout is not None
            # The banner ends with the line naming the state endpoint; at most a few lines.
            banner = [proc.stdout.readline()]
            while "/_sandbox/state" not in banner[-1] and len(banner) < 8 and banner[-1]:
                banner.append(proc.stdout.readline())
            match = re.search(r"http://127\.0\.0\.1:\d+", banner[0])
            assert match, banner
            assert "ak_cli" in "".join(banner)
            response = httpx.get(f"{match.group(0)}/v2/api/me", headers=auth("ak_cli"), timeout=5)
            assert response.status_code == 200
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=10)
            rest = proc.stdout.read()
            assert code == 0, rest
            assert "stopped" in rest
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("option", ["--write-rate", "--read-rate"])
def test_the_sandbox_refuses_a_key_limit_of_zero(option: str) -> None:
    """A limit of 0 was accepted, and a run against it waited for a permit for ever."""
    from tests.helpers import invoke

    refused = invoke(["sandbox", option, "0"])
    assert refused.exit_code == 2
    assert f"Invalid value for '{option}': 0 is not in the range x>=1" in refused.stderr
