"""The sandbox's world: which calls exist, their completed summaries, and the API keys.

A world comes from a JSON file (``--world``), from a corrections file (``--from-input``: every
``cll-`` id exists with the templates its rows name), or both. JSON shape::

    {
      "calls": [{"id": "cll-1", "templates": ["MARKDOWN_CLASSIC"]},
                {"id": "cll-2", "templates": []}],
      "sms": ["msg-1"],
      "keys": [{"key": "ak_test_read", "scopes": ["CONVERSATIONS_READ"],
                "write_per_second": 5, "read_per_second": 20}]
    }

``templates`` lists the *completed* summaries of the call (zero, one or two). Each starts at
version 1 with generated content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allo_batch.config import literal_path
from allo_batch.constants import (
    CALL_PREFIX,
    DEFAULT_READ_PER_SECOND,
    DEFAULT_WRITE_PER_SECOND,
    READ_SCOPE,
    SMS_PREFIX,
    TEMPLATE_KEYS,
    WRITE_SCOPE,
)

DEFAULT_SANDBOX_KEY = "ak_sandbox_full_access"
FULL_SCOPES = (READ_SCOPE, WRITE_SCOPE)
DEFAULT_TEMPLATE = TEMPLATE_KEYS[0]


class WorldError(ValueError):
    """A world file or seed input is malformed."""


@dataclass(slots=True)
class Summary:
    """One completed summary of one call, as the sandbox holds it."""

    content: str
    version: int = 1
    updated_at: str = "2026-01-01T00:00:00"
    writes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKey:
    """A key the sandbox accepts, with its scopes and its per-second budgets."""

    key: str
    scopes: tuple[str, ...] = FULL_SCOPES
    write_per_second: int = DEFAULT_WRITE_PER_SECOND
    read_per_second: int = DEFAULT_READ_PER_SECOND
    key_id: str = ""


@dataclass(slots=True)
class World:
    """Mutable state of the simulated account."""

    calls: dict[str, dict[str, Summary]] = field(default_factory=dict)
    sms: set[str] = field(default_factory=set)
    keys: dict[str, ApiKey] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)

    def add_call(self, call_id: str, templates: tuple[str, ...] | list[str]) -> None:
        """Add a call (or extend its completed templates) with generated initial content."""
        summaries = self.calls.setdefault(call_id, {})
        for template in templates:
            if template not in TEMPLATE_KEYS:
                msg = f"call {call_id}: unknown template {template!r}"
                raise WorldError(msg)
            summaries.setdefault(template, Summary(content=f"# AI summary of {call_id}\n"))

    def add_key(self, key: ApiKey) -> None:
        """Register an API key (its id is derived when not given)."""
        key_id = key.key_id or f"api-{len(self.keys) + 1:012d}"
        self.keys[key.key] = ApiKey(
            key=key.key,
            scopes=key.scopes,
            write_per_second=key.write_per_second,
            read_per_second=key.read_per_second,
            key_id=key_id,
        )


def load_world_file(path: Path) -> World:
    """Read a world JSON file (shape in the module docstring)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are both
        msg = f"{path}: cannot read the world file: {exc}"
        raise WorldError(msg) from exc
    world = World()
    _apply_world_json(world, raw, source=str(path))
    return world


def _apply_world_json(world: World, raw: Any, *, source: str) -> None:
    if not isinstance(raw, dict):
        msg = f"{source}: the world must be a JSON object"
        raise WorldError(msg)
    for call in _listed(raw, "calls", source):
        if not isinstance(call, dict) or not str(call.get("id", "")).startswith(CALL_PREFIX):
            msg = f"{source}: each call needs an id starting with {CALL_PREFIX!r}: {call!r}"
            raise WorldError(msg)
        templates = call.get("templates", [DEFAULT_TEMPLATE])
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            msg = f"{source}: the templates of {call['id']!r} must be a list of names"
            raise WorldError(msg)
        world.add_call(str(call["id"]), templates)
    for sms_id in _listed(raw, "sms", source):
        if not str(sms_id).startswith(SMS_PREFIX):
            msg = f"{source}: SMS ids start with {SMS_PREFIX!r}: {sms_id!r}"
            raise WorldError(msg)
        world.sms.add(str(sms_id))
    for key in _listed(raw, "keys", source):
        try:
            world.add_key(
                ApiKey(
                    key=str(key["key"]),
                    scopes=tuple(key.get("scopes", FULL_SCOPES)),
                    write_per_second=int(key.get("write_per_second", DEFAULT_WRITE_PER_SECOND)),
                    read_per_second=int(key.get("read_per_second", DEFAULT_READ_PER_SECOND)),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"{source}: bad key entry {key!r}: {exc}"
            raise WorldError(msg) from exc


def _listed(raw: dict[str, Any], name: str, source: str) -> list[Any]:
    """The world file's list ``name`` (none: empty), or a WorldError naming the file."""
    found = raw.get(name, [])
    if not isinstance(found, list):
        msg = f"{source}: {name!r} must be a list, not {type(found).__name__}"
        raise WorldError(msg)
    return found


def seed_from_pairs(world: World, pairs: list[tuple[str, str | None]]) -> None:
    """Make every ``cll-`` id of ``(call_id, template_key)`` pairs exist with the named templates.

    A row without a template key makes the call exist with one completed default template, unless
    another row names templates for it. Template names outside the enum and non-call ids are left
    out: they are what the client must reject.
    """
    named: dict[str, set[str]] = {}
    for call_id, template in pairs:
        if not call_id.startswith(CALL_PREFIX) or call_id in world.calls:
            continue
        templates = named.setdefault(call_id, set())
        if template in TEMPLATE_KEYS:
            templates.add(template)
    for call_id, templates in named.items():
        world.add_call(call_id, sorted(templates) or [DEFAULT_TEMPLATE])


def pairs_from_file(path: Path) -> list[tuple[str, str | None]]:
    """``(call_id, template_key)`` pairs of a corrections file (CSV, Parquet or NDJSON).

    The sandbox reads only these two columns, with its own few lines of polars, so that it
    shares no reading code with the client it is meant to check.
    """
    import polars as pl

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pl.scan_parquet(path, glob=False)
        elif suffix in (".ndjson", ".jsonl"):
            frame = pl.scan_ndjson(literal_path(path), infer_schema_length=None)
        else:
            frame = pl.scan_csv(path, infer_schema=False, glob=False)
        names = frame.collect_schema().names()
        if "call_id" not in names:
            msg = f"{path}: no call_id column (found: {', '.join(names)})"
            raise WorldError(msg)
        template = (
            pl.col("template_key").cast(pl.String)
            if "template_key" in names
            else pl.lit(None, pl.String)
        )
        rows = frame.select(pl.col("call_id").cast(pl.String), template).collect()
    except (OSError, pl.exceptions.PolarsError) as exc:
        msg = f"{path}: cannot read it to seed the sandbox: {exc}"
        raise WorldError(msg) from exc
    return [(c, t) for c, t in rows.iter_rows() if c is not None]
