"""A local simulator of the Allo v2 API for tests, benchmarks and rehearsals.

Three ways to start it: ``allo-batch sandbox`` (foreground, prints URL and key),
:func:`serve_sandbox` (an async context manager yielding the base URL), and :func:`create_app`
(a plain ASGI app, for ``httpx.ASGITransport``). Each takes a ``persona``: a name from
:data:`PERSONAS` or a :class:`Behaviour`, choosing every behaviour the API docs leave unknown.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from allo_batch.sandbox.app import SandboxApp
from allo_batch.sandbox.faults import FaultSpec, FaultSpecError, parse_fault_spec
from allo_batch.sandbox.personas import (
    PERSONAS,
    Behaviour,
    UnknownPersonaError,
    describe_personas,
    persona,
    resolve_persona,
)
from allo_batch.sandbox.server import RunningSandbox, serve_in_thread
from allo_batch.sandbox.world import (
    DEFAULT_SANDBOX_KEY,
    ApiKey,
    World,
    WorldError,
    load_world_file,
    seed_from_pairs,
)

__all__ = [
    "DEFAULT_SANDBOX_KEY",
    "PERSONAS",
    "ApiKey",
    "Behaviour",
    "FaultSpec",
    "FaultSpecError",
    "RunningSandbox",
    "SandboxApp",
    "UnknownPersonaError",
    "World",
    "WorldError",
    "build_world",
    "create_app",
    "describe_personas",
    "parse_fault_spec",
    "persona",
    "serve_sandbox",
]


def build_world(
    *,
    world_file: Path | None = None,
    seed_pairs: list[tuple[str, str | None]] | None = None,
    api_key: str = DEFAULT_SANDBOX_KEY,
    write_rate: int = 5,
    read_rate: int = 20,
) -> World:
    """A world from a JSON file and/or seed pairs, with ``api_key`` as the full-scope key."""
    world = load_world_file(world_file) if world_file else World()
    if seed_pairs:
        seed_from_pairs(world, seed_pairs)
    if api_key not in world.keys:
        world.add_key(ApiKey(key=api_key, write_per_second=write_rate, read_per_second=read_rate))
    return world


def create_app(
    world: World | None = None,
    *,
    faults: FaultSpec | str | None = None,
    seed: int = 0,
    persona: str | Behaviour = "documented",
    batch_bucket: Literal["read", "write"] | None = None,
    clock: Callable[[], float] = time.time,
) -> SandboxApp:
    """The sandbox as a plain ASGI app (``clock`` is injectable for window tests).

    ``persona`` is a name from :data:`PERSONAS` (:class:`UnknownPersonaError` otherwise) or a
    :class:`Behaviour`; ``batch_bucket``, when given, overrides the persona's choice.
    """
    spec = parse_fault_spec(faults) if isinstance(faults, str) or faults is None else faults
    return SandboxApp(
        world if world is not None else build_world(),
        faults=spec,
        seed=seed,
        behaviour=resolve_persona(persona),
        batch_bucket=batch_bucket,
        clock=clock,
    )


@asynccontextmanager
async def serve_sandbox(
    world: World | None = None,
    *,
    faults: FaultSpec | str | None = None,
    seed: int = 0,
    persona: str | Behaviour = "documented",
    api_key: str = DEFAULT_SANDBOX_KEY,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[RunningSandbox]:
    """Serve a sandbox on loopback for the duration of the ``async with`` block."""
    app = create_app(
        world if world is not None else build_world(api_key=api_key),
        faults=faults,
        seed=seed,
        persona=persona,
    )
    async with serve_in_thread(app, api_key=api_key, host=host, port=port) as running:
        yield running
