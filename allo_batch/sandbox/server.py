"""Serving the sandbox app with uvicorn: in the foreground (the CLI) or in a background thread.

The background form is an async context manager that yields a :class:`RunningSandbox` with the
base URL, so tests and ``run --sandbox`` talk to it over a real loopback socket. uvicorn runs on
its own event loop in its own thread, so the client's pacing never waits on the server's work.
:meth:`RunningSandbox.outage` and :meth:`RunningSandbox.down` make the same port refuse
connections for a while, then serve the same app (world and counters intact) again.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
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

    errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDrops) for f in errors.filters):  # one per restart would pile up
        errors.addFilter(_QuietDrops())
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


class _Serving:
    """One app served on one host:port from a daemon thread; it can stop and serve again.

    Stopping closes the listening socket, so connections are refused; serving again binds the
    same port and serves the same app object, so the world, the counters and the rate windows
    carry over. The lock keeps an outage and the final shutdown from interleaving.
    """

    def __init__(self, app: SandboxApp, host: str, port: int) -> None:
        self.app = app
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._closed = False
        self._running: tuple[socket.socket, Any, threading.Thread] | None = None
        self.base_url = ""

    def start(self) -> None:
        """Bind (the same port after the first time) and serve; returns once serving."""
        with self._lock:
            if self._closed or self._running is not None:
                return
            sock = bind_socket(self._host, self._port)
            self._port = sock.getsockname()[1]  # port 0 becomes the port every restart reuses
            self.base_url = base_url_of(sock)
            self._running = _start_server(self.app, sock)

    def stop(self, *, close: bool = False) -> None:
        """Stop serving and close the listening socket; ``close`` forbids serving again."""
        with self._lock:
            self._closed = self._closed or close
            if self._running is None:
                return
            sock, server, thread = self._running
            self._running = None
            server.should_exit = True
            thread.join(_SHUTDOWN_TIMEOUT)
            sock.close()


def _start_server(
    app: SandboxApp, sock: socket.socket
) -> tuple[socket.socket, Any, threading.Thread]:
    server = make_server(app)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name="allo-sandbox", daemon=True)
    thread.start()
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while not server.started:
        late = time.monotonic() > deadline
        if failure or late or not thread.is_alive():
            server.should_exit = True
            thread.join(_SHUTDOWN_TIMEOUT)
            sock.close()
            reason = failure[0] if failure else f"not serving after {_STARTUP_TIMEOUT:g} s"
            msg = f"the sandbox failed to start: {reason if failure or late else 'no reason'}"
            raise RuntimeError(msg)
        time.sleep(0.01)
    return sock, server, thread


@dataclass(frozen=True, slots=True)
class RunningSandbox:
    """A sandbox served in the background: where it is and how to reach its state."""

    base_url: str
    api_key: str
    app: SandboxApp
    _serving: _Serving | None = field(default=None, repr=False, compare=False)

    def state(self, *, written_only: bool = False) -> dict[str, Any]:
        """The inspection endpoint's answer, fetched over HTTP like any client would."""
        query = "?written=1" if written_only else ""
        with urllib.request.urlopen(f"{self.base_url}/_sandbox/state{query}", timeout=10) as r:
            result: dict[str, Any] = json.load(r)
        return result

    @contextmanager
    def down(self) -> Iterator[None]:
        """Inside the block, connections to this host:port are refused; after it, served again.

        Blocking: call it from a test's own thread, not from the event loop of an async client.
        """
        if self._serving is None:
            msg = "this sandbox was not started by serve_in_thread; it cannot be taken down"
            raise RuntimeError(msg)
        self._serving.stop()
        try:
            yield
        finally:
            self._serving.start()

    def outage(self, seconds: float) -> None:
        """Refuse connections for ``seconds``, then serve the same app on the same port again.

        Blocks for the whole outage; run it in a thread to have a client meet it mid-run.
        """
        with self.down():
            time.sleep(seconds)


@asynccontextmanager
async def serve_in_thread(
    app: SandboxApp, *, api_key: str, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSandbox]:
    """Serve ``app`` on ``host:port`` from a daemon thread for the duration of the block."""
    serving = _Serving(app, host, port)
    try:
        # Starting blocks while polling for readiness, so it runs off the event loop.
        await anyio.to_thread.run_sync(serving.start)
        yield RunningSandbox(base_url=serving.base_url, api_key=api_key, app=app, _serving=serving)
    finally:
        await anyio.to_thread.run_sync(partial(serving.stop, close=True))
