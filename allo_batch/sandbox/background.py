"""A sandbox served for the duration of a plain (synchronous) ``with`` block.

``allo-batch run --sandbox`` uses it: the command line starts a simulator, then hands the
pipeline an ordinary base URL and key, so nothing of the sandbox sits in the production path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from allo_batch.sandbox.app import SandboxApp
from allo_batch.sandbox.server import RunningSandbox, serve_in_thread


@contextmanager
def serve_in_background(
    app: SandboxApp, *, api_key: str, host: str = "127.0.0.1", port: int = 0
) -> Iterator[RunningSandbox]:
    """Serve ``app`` on a free loopback port (by default) until the block ends."""
    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal() as portal:
        served: Any = serve_in_thread(app, api_key=api_key, host=host, port=port)
        with portal.wrap_async_context_manager(served) as running:
            yield running
