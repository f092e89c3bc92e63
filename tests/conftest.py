"""Shared fixtures: a sandbox served on 127.0.0.1 for the duration of a test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from allo_batch.sandbox import RunningSandbox, World, build_world, create_app
from allo_batch.sandbox.server import serve_in_thread

SandboxFactory = Callable[..., AbstractContextManager[RunningSandbox]]


@contextmanager
def running_sandbox(
    world: World | None = None, *, api_key: str = "ak_test_full", **app_options: Any
) -> Iterator[RunningSandbox]:
    """Serve a sandbox app on a free loopback port from a blocking (synchronous) context."""
    world = world if world is not None else build_world(api_key=api_key)
    app = create_app(world, **app_options)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve_in_thread(app, api_key=api_key)) as sandbox,
    ):
        yield sandbox


@pytest.fixture
def sandbox_factory() -> SandboxFactory:
    """Start sandboxes with custom worlds and faults inside a ``with`` block."""
    return running_sandbox
