"""What the tests share: their keys, a sandbox served on 127.0.0.1, the command line run in
process with a key in its environment, and worlds seeded from corrections.

Test modules import from here, never from each other or from ``conftest`` (which only turns
:func:`running_sandbox` into the ``sandbox_factory`` fixture).
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from anyio.from_thread import start_blocking_portal
from click.testing import CliRunner, Result

from allo_batch.cli import cli
from allo_batch.constants import AUTH_SCHEME, DEFAULT_READ_PER_SECOND
from allo_batch.sandbox import PERSONAS, ApiKey, RunningSandbox, World, build_world, create_app
from allo_batch.sandbox.server import serve_in_thread

# -- keys ----------------------------------------------------------------------------------

SANDBOX_KEY = "ak_test_full"
"""The full-scope key of a sandbox started without one (``running_sandbox``'s default)."""
KEY = "ak_test_secret_9f8e7d6c5b4a"
"""The key the end-to-end tests run with; unusual enough to be searched for in every output."""
SPARE_KEY = "ak_test_spare_93d2aa"
"""A second valid key of the same world, for a run after :data:`KEY` was revoked."""
WRONG_KEY = "ak_wrong_key_123"
"""A key no world knows."""

TEMPLATES = ("MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL")
PERSONA_NAMES = sorted(PERSONAS)
"""Every sandbox persona, for ``pytest.mark.parametrize("persona", PERSONA_NAMES)``."""

# -- the sandbox ---------------------------------------------------------------------------

SandboxFactory = Callable[..., AbstractContextManager[RunningSandbox]]


@contextmanager
def running_sandbox(
    world: World | None = None, *, api_key: str = SANDBOX_KEY, **app_options: Any
) -> Iterator[RunningSandbox]:
    """Serve a sandbox app on a free loopback port from a blocking (synchronous) context;
    ``app_options`` go to ``create_app`` (``faults``, ``seed``, ``persona``, ...)."""
    world = world if world is not None else build_world(api_key=api_key)
    app = create_app(world, **app_options)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve_in_thread(app, api_key=api_key)) as sandbox,
    ):
        yield sandbox


def authorization(key: str, persona: str = "documented") -> dict[str, str]:
    """The ``Authorization`` header a persona accepts for ``key`` (for requests a test makes
    itself, as another user of the API would)."""
    bare = PERSONAS[persona].auth == "bare"
    return {"Authorization": key if bare else f"{AUTH_SCHEME} {key}"}


# -- the command line ----------------------------------------------------------------------


def invoke(
    args: Sequence[str], *, key: str | None = KEY, env: Mapping[str, str | None] | None = None
) -> Result:
    """``allo-batch ARGS`` in process with ``key`` in ``ALLO_API_KEY`` (None: no key at all);
    ``env`` adds or overrides variables. Exceptions propagate, so a crash fails the test."""
    environment: dict[str, str | None] = {"ALLO_API_KEY": key, **(env or {})}
    return CliRunner().invoke(cli, list(args), env=environment, catch_exceptions=False)


# -- data ----------------------------------------------------------------------------------


def sha(text: str) -> str:
    """The hash of a content, as result files and the sandbox's state show it."""
    return hashlib.sha256(text.encode()).hexdigest()


def corrections(rows: int, start: int = 0, *, prefix: str = "corrected") -> pl.DataFrame:
    """``rows`` corrections of calls ``cll-<start>``..., alternating the two templates."""
    return pl.DataFrame(
        {
            "call_id": [f"cll-{start + i:06d}" for i in range(rows)],
            "template_key": [TEMPLATES[i % 2] for i in range(rows)],
            "content": [f"## {prefix} summary {start + i}\nFollow-up booked." for i in range(rows)],
        }
    )


def world_for(
    *frames: pl.DataFrame,
    keys: Sequence[str] = (KEY,),
    write_rate: int = 50,
    read_rate: int = DEFAULT_READ_PER_SECOND,
) -> World:
    """A world whose calls are the frames' targets (``call_id``, with ``template_key`` when the
    frame has that column), and ``keys`` full-scope at these per-second limits."""
    pairs: list[tuple[str, str | None]] = []
    for frame in frames:
        templates = frame["template_key"] if "template_key" in frame.columns else None
        for index, call_id in enumerate(frame["call_id"]):
            pairs.append((call_id, templates[index] if templates is not None else None))
    world = build_world(seed_pairs=pairs)
    for key in keys:
        world.add_key(ApiKey(key=key, write_per_second=write_rate, read_per_second=read_rate))
    return world


def written(sandbox: RunningSandbox) -> dict[tuple[str, str], dict[str, Any]]:
    """The sandbox's own record of every summary written at least once, by target."""
    state = sandbox.state(written_only=True)
    return {(s["call_id"], s["template_key"]): s for s in state["summaries"]}


def check_landed_once(sandbox: RunningSandbox, frame: pl.DataFrame) -> None:
    """Every row of ``frame`` (call_id, template_key, content) landed exactly once, and
    nothing else was written."""
    landed = written(sandbox)
    assert len(landed) == frame.height
    for call_id, template, content in frame.select(
        "call_id", "template_key", "content"
    ).iter_rows():
        summary = landed[(call_id, template)]
        assert summary["writes"] == 1
        assert summary["content_sha256"] == sha(content)


CHROMIUM = Path("/usr/bin/chromium")


def screenshot(page: Path, png: Path, profile: Path, size: tuple[int, int] = (1200, 1600)) -> None:
    """Open ``page`` in headless Chromium (no network) and save a screenshot; skip the test
    when Debian's chromium is not installed."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install chromium)")
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={size[0]},{size[1]}",
            page.as_uri(),
        ],
        check=False,
        capture_output=True,
        timeout=120,
    )
    assert png.exists(), "chromium wrote no screenshot"


def png_facts(data: bytes) -> tuple[int, int, int]:
    """Width, height and the number of distinct byte values of the decoded pixel rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    position, idat = 8, b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            idat += data[position + 8 : position + 8 + length]
        position += 12 + length
    return width, height, len(set(zlib.decompress(idat)))
