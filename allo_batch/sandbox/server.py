"""Serving the sandbox app with uvicorn: in the foreground (the CLI) or in a background thread.

The background form is an async context manager that yields a :class:`RunningSandbox` with the
base URL, so tests and ``run --sandbox`` talk to it over a real loopback socket. uvicorn runs on
its own event loop in its own thread, so the client's pacing never waits on the server's work.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from allo_batch.sandbox.app import SandboxApp

_STARTUP_TIMEOUT = 10.0
_SHUTDOWN_TIMEOUT = 10.0


class _QuietDrops(logging.Filter):
    """Injected connection drops are expected; keep uvicorn from logging them as errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (0 = a free port) before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def base_url_of(sock: socket.socket) -> str:
    """``http://host:port`` for a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(app: SandboxApp, *, log_level: str = "warning") -> Any:
    """A uvicorn server for ``app`` with the fastest parts that are installed."""
    import uvicorn  # the sandbox extra; imported only when a sandbox is served

    logging.getLogger("uvicorn.error").addFilter(_QuietDrops())
    config = uvicorn.Config(
        app,
        loop="auto",
        http="auto",
        lifespan="off",
        log_level=log_level,
        access_log=False,
        server_header=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=1,
    )
    return uvicorn.Server(config)


@dataclass(frozen=True, slots=True)
class RunningSandbox:
    """A sandbox served in the background: where it is and how to reach its state."""

    base_url: str
    api_key: str
    app: SandboxApp

    def state(self, *, written_only: bool = False) -> dict[str, Any]:
        """The inspection endpoint's answer, fetched over HTTP like any client would."""
        query = "?written=1" if written_only else ""
        with urllib.request.urlopen(f"{self.base_url}/_sandbox/state{query}", timeout=10) as r:
            result: dict[str, Any] = json.load(r)
        return result


@asynccontextmanager
async def serve_in_thread(
    app: SandboxApp, *, api_key: str, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSandbox]:
    """Serve ``app`` on ``host:port`` from a daemon thread for the duration of the block."""
    sock = bind_socket(host, port)
    server = make_server(app)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name="allo-sandbox", daemon=True)
    thread.start()
    try:
        with anyio.fail_after(_STARTUP_TIMEOUT):
            while not server.started:
                if failure or not thread.is_alive():
                    msg = f"the sandbox failed to start: {failure[0] if failure else 'no reason'}"
                    raise RuntimeError(msg)
                await anyio.sleep(0.01)
        yield RunningSandbox(base_url=base_url_of(sock), api_key=api_key, app=app)
    finally:
        server.should_exit = True
        await anyio.to_thread.run_sync(thread.join, _SHUTDOWN_TIMEOUT)
        sock.close()
