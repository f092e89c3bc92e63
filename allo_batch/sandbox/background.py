"""Starting a sandbox from the command line: embedded in a run, or in the foreground.

``allo-batch run --sandbox`` starts a simulator here, then hands the pipeline an ordinary base URL
and key, so nothing of the sandbox sits in the production path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from allo_batch.sandbox.app import SandboxApp
from allo_batch.sandbox.server import (
    RunningSandbox,
    base_url_of,
    bind_socket,
    make_server,
    serve_in_thread,
)
from allo_batch.sandbox.world import DEFAULT_SANDBOX_KEY, World, pairs_from_file


@contextlib.contextmanager
def serve_in_background(
    app: SandboxApp, *, api_key: str, host: str = "127.0.0.1", port: int = 0
) -> Iterator[RunningSandbox]:
    """Serve ``app`` on a free loopback port (by default) until the block ends."""
    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal() as portal:
        served: Any = serve_in_thread(app, api_key=api_key, host=host, port=port)
        with portal.wrap_async_context_manager(served) as running:
            yield running


@contextlib.contextmanager
def embedded(
    inputs: list[Path],
    *,
    world_file: Path | None = None,
    write_rate: int = 5,
    faults: str | None = None,
    seed: int = 0,
    persona: str = "documented",
) -> Iterator[RunningSandbox]:
    """``run --sandbox``: a simulator whose world holds every call the inputs name (read with
    the sandbox's own few lines, sharing no reading code with the client), or ``world_file``."""
    from allo_batch.sandbox import build_world, create_app

    seeds = [path for path in inputs if path.is_file()]
    pairs = None if world_file else [pair for path in seeds for pair in pairs_from_file(path)]
    world = build_world(
        world_file=world_file, seed_pairs=pairs, api_key=DEFAULT_SANDBOX_KEY, write_rate=write_rate
    )
    app = create_app(world, faults=faults, seed=seed, persona=persona)
    with serve_in_background(app, api_key=DEFAULT_SANDBOX_KEY) as running:
        yield running


def serve_forever(
    world: World, api_key: str, *, host: str, port: int, say: Callable[[str], None], **app: Any
) -> None:
    """``allo-batch sandbox``: serve until Ctrl-C, after saying how to point a run at it."""
    from allo_batch.sandbox import create_app

    served = create_app(world, **app)
    sock = bind_socket(host, port)
    url = base_url_of(sock)
    say(f"allo-batch sandbox serving {url}")
    say(f"  calls: {len(world.calls)}, SMS: {len(world.sms)}, keys: {len(world.keys)}")
    say("  point allo-batch at it from another terminal with:")
    say(f"    export ALLO_BASE_URL={url} ALLO_API_KEY={api_key}")
    say(f"  state: curl {url}/_sandbox/state    stop: Ctrl-C")
    # uvicorn re-raises the Ctrl-C it already handled gracefully.
    with contextlib.suppress(KeyboardInterrupt):
        make_server(served, log_level="info").run(sockets=[sock])
    say("allo-batch sandbox stopped")
