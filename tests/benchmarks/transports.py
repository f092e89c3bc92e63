"""Client CPU per request of the HTTP transports behind httpx, against a bare aiohttp loop.

``python -m tests.benchmarks.transports [--requests N] [--rounds R] [--workers W] [--only NAME]``

A raw asyncio HTTP/1.1 server (this module with ``--serve``) answers every request with a 200
and a small JSON summary; it runs in its own process on the server core. Each client variant
runs in a fresh child process on the client core, sends ``--warmup`` PATCHes of ~2 KB, then
``--requests`` more from ``--workers`` tasks, and reports the CPU seconds of its own process
(``time.process_time``) over those requests only: imports, client set-up and warm-up are left
out. The variants run interleaved, ``--rounds`` times; the table gives the median per variant
and its ratio to the bare aiohttp loop's median from the same run.

Variants:

- ``aiohttp``: a bare aiohttp loop (one ClientSession, a pool of W connections): the floor.
- ``httpx``: a bare httpx loop (one AsyncClient, a pool of W), as ``bare_httpx.py`` sends.
- ``allo-httpcore``: AlloClient over ``http_lanes`` with httpx's own transport (httpcore).
- ``allo-httpx-aiohttp``: AlloClient over lanes carried by the ``httpx-aiohttp`` package's
  ``AiohttpTransport`` (one connection each). Skipped when the package is not installed.
- ``allo-aiohttp``: AlloClient over ``http_lanes(transport="aiohttp")`` (allo_batch's own
  adapter, :class:`allo_batch.client.AiohttpTransport`).
- ``allo-mock``: AlloClient over an in-memory httpx.MockTransport: the cost of AlloClient and
  httpx's client layer with no transport at all (not a real request; for the split).

The machine is usually shared: other processes steal cycles and caches, so single figures move
by ±10 % or more between runs; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from tests.benchmarks.common import SERVER_CORE, pin, run_child

KEY = "ak_bench_transports"
PATH = "/v2/api/conversations/items/{}/summary"
ANSWER = json.dumps(
    {"data": {"id": "cll-1", "version": 2, "updated_at": "2026-11-23T10:00:00Z"}}
).encode()
VARIANTS = (
    "aiohttp",
    "httpx",
    "allo-httpcore",
    "allo-httpx-aiohttp",
    "allo-aiohttp",
    "allo-mock",
)


# -- the server ------------------------------------------------------------------------------


class _Answering(asyncio.Protocol):
    """Reads HTTP/1.1 requests with a Content-Length body; answers each with a canned 200."""

    RESPONSE = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"date: Mon, 23 Nov 2026 10:00:00 GMT\r\n\r\n" % len(ANSWER)
    ) + ANSWER

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(
                    head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None]
                )
            if len(self.buffer) < end + 4 + length:
                break
            self.buffer = self.buffer[end + 4 + length :]
            out.append(self.RESPONSE)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Answering, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}", flush=True)
    async with server:
        await asyncio.sleep(3600)  # bounded: the parent terminates it long before


# -- the clients -----------------------------------------------------------------------------


def _bodies(count: int) -> list[tuple[str, bytes]]:
    """~2 KB PATCH bodies for ``cll-000000000`` on, templates alternating as the benchmark
    corrections files name them (so a sandbox seeded from such a file answers each with 200)."""
    filler = ("corrected summary text " * 100)[:2000]
    templates = ("MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL")
    return [
        (
            f"cll-{i:09d}",
            json.dumps(
                {"content": f"## {i} {filler}", "template_key": templates[i % 2]},
                separators=(",", ":"),
            ).encode(),
        )
        for i in range(count)
    ]


Send = Callable[[int, str, bytes], Awaitable[bool]]


async def _drive(send: Send, bodies: list[tuple[str, bytes]], workers: int) -> int:
    position = iter(bodies)
    done = [0]

    async def worker(lane: int) -> None:
        for call_id, body in position:
            if await send(lane, call_id, body):
                done[0] += 1

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return done[0]


async def _measure(send: Send, warmup: int, requests: int, workers: int) -> dict[str, Any]:
    await _drive(send, _bodies(warmup), workers)
    bodies = _bodies(requests)
    cpu, wall = time.process_time(), time.perf_counter()
    ok = await _drive(send, bodies, workers)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu": cpu, "wall": wall, "ok": ok, "requests": requests}


async def _client(variant: str, url: str, warmup: int, requests: int, workers: int) -> Any:
    key = os.environ.get("ALLO_API_KEY", KEY)  # make bench drives the aiohttp loop at a sandbox
    headers = {"Authorization": f"Api-Key {key}", "Content-Type": "application/json"}
    if variant == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=workers)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def send(lane: int, call_id: str, body: bytes) -> bool:
                async with session.patch(
                    url + PATH.format(call_id), data=body, headers=headers
                ) as answer:
                    await answer.read()
                    return answer.status == 200

            return await _measure(send, warmup, requests, workers)

    import httpx

    if variant == "httpx":
        limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:

            async def send(lane: int, call_id: str, body: bytes) -> bool:
                answer = await client.patch(
                    url + PATH.format(call_id), content=body, headers=headers
                )
                return answer.status_code == 200

            return await _measure(send, warmup, requests, workers)

    from contextlib import AsyncExitStack

    from allo_batch.client import AlloClient, http_lanes, make_http_client
    from allo_batch.config import Secret

    async with AsyncExitStack() as stack:
        if variant == "allo-httpcore":
            lanes = await stack.enter_async_context(
                http_lanes(workers=workers, timeout=30, transport="httpcore")
            )
        elif variant == "allo-aiohttp":
            lanes = await stack.enter_async_context(
                http_lanes(workers=workers, timeout=30, transport="aiohttp")
            )
        elif variant == "allo-httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport

            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            lanes = [
                await stack.enter_async_context(
                    make_http_client(timeout=30, transport=AiohttpTransport(limits=limits))
                )
                for _ in range(workers)
            ]
        elif variant == "allo-mock":

            def canned(request: httpx.Request) -> httpx.Response:
                return httpx.Response(
                    200, content=ANSWER, headers={"content-type": "application/json"}
                )

            lanes = [
                await stack.enter_async_context(
                    make_http_client(timeout=30, transport=httpx.MockTransport(canned))
                )
                for _ in range(workers)
            ]
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        allo = AlloClient(lanes, url, Secret(key), auth="prefixed")

        async def send(lane: int, call_id: str, body: bytes) -> bool:
            answer = await allo.update_summary(call_id, body, lane=lane)
            return answer.kind == "ok"

        return await _measure(send, warmup, requests, workers)


# -- the run ---------------------------------------------------------------------------------


def _available(variant: str) -> bool:
    if variant == "allo-httpx-aiohttp":
        try:
            import httpx_aiohttp  # noqa: F401
        except ImportError:
            return False
    return True


def _start_server() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.transports", "--serve"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: pin(SERVER_CORE),
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        process.kill()
        raise RuntimeError("the server did not start")
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--only", action="append", choices=VARIANTS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=2, metavar=("VARIANT", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve())
        return
    if args.client:
        variant, url = args.client
        result = asyncio.run(_client(variant, url, args.warmup, args.requests, args.workers))
        print(json.dumps(result))
        return

    variants = [v for v in (args.only or VARIANTS) if _available(v)]
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    rate: dict[str, list[float]] = {v: [] for v in variants}
    server, url = _start_server()
    try:
        for _ in range(max(1, args.rounds)):
            for variant in variants:
                child = run_child(
                    [
                        sys.executable,
                        "-m",
                        "tests.benchmarks.transports",
                        "--client",
                        variant,
                        url,
                        "--requests",
                        str(args.requests),
                        "--warmup",
                        str(args.warmup),
                        "--workers",
                        str(args.workers),
                    ],
                    timeout=args.requests / 200 + 60,
                )
                if child.code != 0:
                    raise RuntimeError(f"{variant} failed: {child.stderr[-2000:]}")
                result = json.loads(child.stdout)
                if result["ok"] != args.requests:
                    raise RuntimeError(f"{variant}: {result['ok']}/{args.requests} answered 200")
                cpu[variant].append(result["cpu"] / args.requests)
                rate[variant].append(args.requests / result["wall"])
    finally:
        server.terminate()
        server.wait(timeout=30)

    floor = statistics.median(cpu["aiohttp"]) if "aiohttp" in cpu else None
    versions = _versions()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {versions}"
    )
    print(
        f"{args.requests} PATCHes of ~2 KB per run, {args.workers} workers, "
        f"{args.rounds} rounds interleaved; client and server pinned to their own cores."
    )
    print("The machine is shared and noisy: allow ±10 % or more; compare ratios within a run.")
    print()
    print("| variant | CPU-µs/request (median) | all rounds | req/s (median) | × aiohttp |")
    print("|---|---|---|---|---|")
    for variant in variants:
        median = statistics.median(cpu[variant])
        rounds = " ".join(f"{c * 1e6:.0f}" for c in cpu[variant])
        ratio = f"{median / floor:.2f}" if floor else "-"
        print(
            f"| {variant} | {median * 1e6:.0f} | {rounds} | "
            f"{statistics.median(rate[variant]):.0f} | {ratio} |"
        )


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("httpx", "httpcore", "aiohttp", "httpx-aiohttp", "anyio"):
        with suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


if __name__ == "__main__":
    main()
