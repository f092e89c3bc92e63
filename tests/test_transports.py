"""Each HTTP transport behind httpx, over real sockets on 127.0.0.1.

Every test that builds a real client runs once per transport (the ``transport`` fixture), so
the error mapping, timeouts, redirects, TLS verification and the bytes on the wire are the same
whichever one carries the requests. The MockTransport tests in test_client*.py replace the
transport and need no second run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from allo_batch.client import (
    DEFAULT_TRANSPORT,
    TRANSPORT_ENV,
    TRANSPORTS,
    AiohttpTransport,
    AlloClient,
    Answer,
    TransportName,
    chosen_transport,
    http_lanes,
    make_http_client,
)
from allo_batch.config import Secret
from allo_batch.errors import UsageError
from allo_batch.sandbox import build_world
from tests.helpers import SANDBOX_KEY, running_sandbox

OK_BODY = json.dumps({"data": {"id": "cll-1", "version": 2, "updated_at": "2026-11-23"}}).encode()
SUMMARY = json.dumps({"content": "## fixed", "template_key": "MARKDOWN_CLASSIC"}).encode()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> TransportName:
    name: TransportName = request.param
    return name


# -- a raw HTTP/1.1 server: every byte the client sends, every answer we want -----------------


def answer(status: int = 200, body: bytes = OK_BODY, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        status,
        len(body),
    )
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


Respond = Callable[[int, bytes, bytes], bytes | None]


class RawServer:
    """Answers request N (from 0) with ``respond(N, head, body)``; None closes the connection.
    Keeps every request's head and body and counts connections."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(100):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                reply = self.respond(len(self.requests) - 1, head, body)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def head(self, index: int) -> list[bytes]:
        return self.requests[index][0].split(b"\r\n")

    def header(self, index: int, name: bytes) -> list[bytes]:
        lines = self.head(index)[1:]
        return [
            line.partition(b":")[2].strip()
            for line in lines
            if line.partition(b":")[0].lower() == name.lower()
        ]


def serve_raw(
    respond: Respond,
    go: Callable[[str, RawServer], Awaitable[Any]],
    *,
    tls: ssl.SSLContext | None = None,
) -> tuple[Any, RawServer]:
    """``go(base_url, server)`` against a RawServer on a free loopback port: its result and the
    server (with what it saw)."""

    async def main() -> tuple[Any, RawServer]:
        raw = RawServer(respond)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0, ssl=tls)
        port = server.sockets[0].getsockname()[1]
        scheme = "https" if tls else "http"
        async with server:
            with anyio.fail_after(20):
                return await go(f"{scheme}://127.0.0.1:{port}", raw), raw

    return anyio.run(main)


async def patch_once(
    base_url: str,
    transport: TransportName,
    call_id: str = "cll-1",
    *,
    timeout: float = 5,  # noqa: ASYNC109 (the client's timeout per request)
) -> Answer:
    async with http_lanes(workers=1, timeout=timeout, transport=transport) as lanes:
        client = AlloClient(lanes, base_url, Secret(SANDBOX_KEY), auth="prefixed")
        return await client.update_summary(call_id, SUMMARY)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- choosing a transport ----------------------------------------------------------------------


def test_the_default_is_aiohttp_and_the_environment_can_choose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    assert chosen_transport() == DEFAULT_TRANSPORT == "aiohttp"
    monkeypatch.setenv(TRANSPORT_ENV, "httpcore")
    assert chosen_transport() == "httpcore"
    assert chosen_transport("aiohttp") == "aiohttp"  # an explicit choice wins
    monkeypatch.setenv(TRANSPORT_ENV, "curl")
    with pytest.raises(ValueError, match="unknown HTTP transport 'curl'"):
        chosen_transport()


def test_each_lane_has_one_connection_and_all_share_one_verifying_tls_context(
    transport: TransportName,
) -> None:
    async def go() -> None:
        async with http_lanes(workers=5, timeout=1, transport=transport) as lanes:
            assert len({id(lane) for lane in lanes}) == 5
            carriers: list[Any] = [lane._transport for lane in lanes]
            if transport == "aiohttp":
                assert all(isinstance(c, AiohttpTransport) for c in carriers)
                contexts = {id(c._ssl) for c in carriers}
            else:
                assert all(c._pool._max_connections == 1 for c in carriers)
                contexts = {id(c._pool._ssl_context) for c in carriers}
            assert len(contexts) == 1
            context = carriers[0]._ssl if transport == "aiohttp" else carriers[0]._pool._ssl_context
            assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname

    anyio.run(go)


def test_requests_on_one_lane_share_its_one_connection(transport: TransportName) -> None:
    """Four requests at once on one lane: they queue for its connection, none opens another."""

    async def go(base_url: str, raw: RawServer) -> list[Answer]:
        async with http_lanes(workers=1, timeout=5, transport=transport) as lanes:
            client = AlloClient(lanes, base_url, Secret(SANDBOX_KEY), auth="prefixed")
            answers: list[Answer] = []

            async def one() -> None:
                answers.append(await client.update_summary("cll-1", SUMMARY))

            async with anyio.create_task_group() as group:
                for _ in range(4):
                    group.start_soon(one)
            return answers

    answers, raw = serve_raw(lambda *_: answer(), go)
    assert [a.kind for a in answers] == ["ok"] * 4
    assert (len(raw.requests), raw.connections) == (4, 1)


def test_a_transport_instance_is_used_as_given() -> None:
    """Tests hand in a MockTransport; no name is looked up then."""
    mock = httpx.MockTransport(lambda _: httpx.Response(200, json={"data": {}}))
    client = make_http_client(timeout=1, transport=mock)
    assert client._transport is mock


# -- against the sandbox -----------------------------------------------------------------------


def sandbox_world() -> Any:
    world = build_world(api_key=SANDBOX_KEY, write_rate=10_000)
    world.add_call("cll-1", ["MARKDOWN_CLASSIC"])
    return world


def test_a_patch_succeeds(transport: TransportName) -> None:
    with running_sandbox(sandbox_world(), api_key=SANDBOX_KEY) as sandbox:
        result = anyio.run(patch_once, sandbox.base_url, transport)
        written = sandbox.state(written_only=True)["summaries"]
    assert (result.kind, result.http_status, result.version) == ("ok", 200, 2)
    assert result.limit is not None and result.date is not None
    assert [(s["call_id"], s["writes"]) for s in written] == [("cll-1", 1)]


def test_a_refused_connection_is_a_connection_error(transport: TransportName) -> None:
    result = anyio.run(patch_once, f"http://127.0.0.1:{free_port()}", transport)
    assert (result.kind, result.error_code, result.retryable) == (
        "transport",
        "CONNECTION_ERROR",
        True,
    )
    assert (result.message or "").startswith("ConnectError")


def test_a_connection_dropped_mid_answer_is_a_connection_error(transport: TransportName) -> None:
    with running_sandbox(sandbox_world(), api_key=SANDBOX_KEY, faults="drop=1") as sandbox:
        result = anyio.run(patch_once, sandbox.base_url, transport)
    assert (result.kind, result.error_code, result.retryable) == (
        "transport",
        "CONNECTION_ERROR",
        True,
    )
    assert (result.message or "").startswith("RemoteProtocolError")


def test_an_answer_later_than_the_timeout_is_a_timeout(transport: TransportName) -> None:
    world = sandbox_world()
    with running_sandbox(world, api_key=SANDBOX_KEY, faults="stall=1,stall-time=30s") as sandbox:

        async def go() -> tuple[Answer, float]:
            started = anyio.current_time()
            result = await patch_once(sandbox.base_url, transport, timeout=0.5)
            return result, anyio.current_time() - started

        result, took = anyio.run(go)
    assert (result.kind, result.error_code, result.retryable) == ("transport", "TIMEOUT", True)
    assert result.message == "no answer in time (ReadTimeout)"
    assert 0.4 < took < 15  # the 0.5 s timeout, long before the 30 s stall ends


# -- against a raw server: the bytes on the wire -----------------------------------------------


@pytest.mark.parametrize(
    ("call_id", "segment"),
    [
        pytest.param(
            "cll-x/../../v2/api/webhooks/wh-1#",
            b"cll-x%2F..%2F..%2Fv2%2Fapi%2Fwebhooks%2Fwh-1%23",
            id="traversal",
        ),
        pytest.param("..", b"%2E%2E", id="dot-dot"),
        pytest.param(".", b"%2E", id="dot"),
        pytest.param("cll-1?x=1&y", b"cll-1%3Fx%3D1%26y", id="query"),
        pytest.param("cll-%2F..%2F", b"cll-%252F..%252F", id="already-encoded"),
        pytest.param("cll-é", b"cll-%C3%A9", id="unicode"),
    ],
)
def test_the_request_goes_out_as_httpx_built_it(
    transport: TransportName, call_id: str, segment: bytes
) -> None:
    """The path keeps the id as one encoded segment (nothing decodes or normalises it again),
    each header is sent once, the body is the bytes given, and the connection is reused."""

    async def go(base_url: str, raw: RawServer) -> list[Answer]:
        async with http_lanes(workers=1, timeout=5, transport=transport) as lanes:
            client = AlloClient(lanes, base_url, Secret(SANDBOX_KEY), auth="prefixed")
            return [await client.update_summary(call_id, SUMMARY) for _ in range(3)]

    answers, raw = serve_raw(lambda *_: answer(), go)
    assert [a.kind for a in answers] == ["ok"] * 3
    assert raw.head(0)[0] == b"PATCH /v2/api/conversations/items/" + segment + b"/summary HTTP/1.1"
    assert raw.header(0, b"authorization") == [f"Api-Key {SANDBOX_KEY}".encode()]
    assert raw.header(0, b"content-type") == [b"application/json"]
    assert raw.header(0, b"content-length") == [str(len(SUMMARY)).encode()]
    assert raw.header(0, b"x-request-id") == [answers[0].request_id.encode()]
    assert len(raw.header(0, b"host")) == 1
    assert raw.header(0, b"cookie") == []
    assert [body for _, body in raw.requests] == [SUMMARY] * 3
    assert raw.connections == 1


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def test_an_environment_proxy_carries_requests_but_never_to_a_loopback_host(
    transport: TransportName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a proxy in the environment, a request for another host goes to the proxy (in
    absolute form), whichever transport is named; one for a loopback host goes straight to
    it, so a sandbox on 127.0.0.1 answers behind a corporate proxy too."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)

    async def through_the_proxy(proxy_url: str, proxy: RawServer) -> Answer:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        return await patch_once("http://api.allo.invalid", transport)

    result, proxy = serve_raw(lambda *_: answer(), through_the_proxy)
    assert result.kind == "ok"
    target = b"http://api.allo.invalid/v2/api/conversations/items/cll-1/summary"
    assert proxy.head(0)[0] == b"PATCH " + target + b" HTTP/1.1"

    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens
    result, direct = run_raw(lambda *_: answer(), transport)
    assert result.kind == "ok"
    assert direct.head(0)[0] == b"PATCH /v2/api/conversations/items/cll-1/summary HTTP/1.1"


@pytest.mark.parametrize(
    "proxy", ["ftp://user:s3cretpw@proxy:21", "http://user:s3cretpw@[::1", "socks5://proxy:1080"]
)
def test_a_proxy_that_cannot_be_used_is_a_usage_error_that_quotes_no_password(
    transport: TransportName, proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed or unsupported proxy is the user's environment, not a bug: exit 2 with
    the variables to look at, and never the value (it may hold a password)."""
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    with pytest.raises(UsageError, match="HTTPS_PROXY, HTTP_PROXY or ALL_PROXY") as raised:
        make_http_client(timeout=5, transport=transport)
    assert "s3cret" not in str(raised.value)
    assert raised.value.exit_code == 2


def run_raw(respond: Respond, transport: TransportName, **options: Any) -> tuple[Answer, RawServer]:
    """One PATCH through a lane of ``transport`` to a raw server answering with ``respond``."""

    async def go(base_url: str, raw: RawServer) -> Answer:
        return await patch_once(base_url, transport, **options)

    result, raw = serve_raw(respond, go)
    return result, raw


def test_a_redirect_is_not_followed(transport: TransportName) -> None:
    result, raw = run_raw(
        lambda *_: answer(302, b"", b"location: http://127.0.0.1:1/elsewhere"), transport
    )
    assert (result.kind, result.error_code, result.http_status) == ("unreadable", "HTTP_302", 302)
    assert len(raw.requests) == 1


def test_a_cookie_is_never_sent_back(transport: TransportName) -> None:
    async def go(base_url: str, raw: RawServer) -> list[Answer]:
        async with http_lanes(workers=1, timeout=5, transport=transport) as lanes:
            client = AlloClient(lanes, base_url, Secret(SANDBOX_KEY), auth="prefixed")
            return [await client.update_summary("cll-1", SUMMARY) for _ in range(2)]

    answers, raw = serve_raw(lambda *_: answer(200, OK_BODY, b"set-cookie: lb=abc; Path=/"), go)
    assert [a.kind for a in answers] == ["ok", "ok"]
    assert raw.header(1, b"cookie") == []


def test_a_chunked_answer_is_read_whole(transport: TransportName) -> None:
    half = len(OK_BODY) // 2
    chunked = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (half, OK_BODY[:half], len(OK_BODY) - half, OK_BODY[half:])
    )
    result, _ = run_raw(lambda *_: chunked, transport)
    assert (result.kind, result.version) == ("ok", 2)


def test_a_5xx_page_keeps_its_status_and_retry_after(transport: TransportName) -> None:
    page = answer(503, b"<html>busy</html>", b"retry-after: 7").replace(
        b"application/json", b"text/html"
    )
    result, _ = run_raw(lambda *_: page, transport)
    assert (result.kind, result.error_code, result.retryable, result.retry_after) == (
        "unreadable",
        "HTTP_503",
        True,
        7.0,
    )


@pytest.mark.parametrize(
    ("respond", "code", "exception"),
    [
        pytest.param(lambda *_: None, "CONNECTION_ERROR", "RemoteProtocolError", id="closed"),
        pytest.param(
            lambda *_: b"SPDY/9 what\r\n\r\n",
            "CONNECTION_ERROR",
            "RemoteProtocolError",
            id="garbage",
        ),
        pytest.param(
            lambda *_: answer()[:-10], "TIMEOUT", "ReadTimeout", id="short-body-then-silence"
        ),
    ],
)
def test_a_broken_answer_maps_as_with_httpcore(
    transport: TransportName, respond: Respond, code: str, exception: str
) -> None:
    """A connection closed without an answer, an answer that is not HTTP, a body that stops
    coming: the same httpx exception, so the same local code, on every transport."""
    result, _ = run_raw(respond, transport, timeout=0.5)
    assert (result.kind, result.error_code, result.retryable) == ("transport", code, True)
    assert (result.message or "").startswith(exception) or exception in (result.message or "")


# -- TLS ---------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_certificate_that_is_not_trusted_is_refused(
    transport: TransportName, tmp_path: Path
) -> None:
    """TLS verification is on: a self-signed certificate fails the connection."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def go(base_url: str, raw: RawServer) -> Answer:
        return await patch_once(base_url, transport)

    result, _ = serve_raw(lambda *_: answer(), go, tls=tls)
    assert (result.kind, result.error_code) == ("transport", "CONNECTION_ERROR")
    assert "ConnectError" in (result.message or "")
    assert "certificate" in (result.message or "").lower()
