"""Pure planning: a validated batch and the done index become inert values, in input order.

Each row becomes either a final :class:`RowResult` (invalid, skipped) or a
:class:`PlannedRequest` whose body is serialised here, once. ``--dry-run`` stops at this stage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from allo_batch.models import (
    CODE,
    MESSAGE,
    NO_TEMPLATE,
    REPEAT_OF,
    PlannedRequest,
    RowResult,
    content_sha256,
)

if TYPE_CHECKING:
    import polars as pl

Planned = RowResult | PlannedRequest


def request_body(content: str, template_key: str | None) -> bytes:
    """The PATCH body; ``template_key`` is left out when the row has none."""
    body: dict[str, str] = {"content": content}
    if template_key is not None:
        body["template_key"] = template_key
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def attach_done(batch: pl.DataFrame, done: pl.DataFrame) -> pl.DataFrame:
    """Add the content hash and, where this exact content already landed, its version."""
    import polars as pl

    hashed = batch.with_columns(
        pl.Series("content_sha256", [content_sha256(c) for c in batch["content"]], pl.String)
    )
    if done.height == 0:
        return hashed.with_columns(
            pl.lit(False).alias("done"),
            pl.lit(None, pl.Int64).alias("done_version"),
            pl.lit(None, pl.String).alias("done_updated_at"),
            pl.lit(None, pl.String).alias("done_request_id"),
        )
    return (
        hashed.with_columns(pl.col("template_key").fill_null(NO_TEMPLATE).alias("_target"))
        .join(
            done.select(
                pl.col("call_id"),
                pl.col("template_key").alias("_target"),
                pl.col("content_sha256"),
                pl.col("version").alias("done_version"),
                pl.col("updated_at").alias("done_updated_at"),
                pl.col("request_id").alias("done_request_id"),
                pl.lit(True).alias("done"),
            ),
            on=["call_id", "_target", "content_sha256"],
            how="left",
            maintain_order="left",
        )
        .drop("_target")
        .with_columns(pl.col("done").fill_null(False))
    )


def plan_batch(batch: pl.DataFrame, *, limit: int | None) -> Iterator[Planned]:
    """Turn a validated batch (with :func:`attach_done` columns) into results and requests."""
    for (
        row,
        call_id,
        template_key,
        content,
        expected,
        code,
        message,
        repeat_of,
        sha,
        done,
        done_version,
        done_at,
        done_rid,
    ) in batch.select(
        "row",
        "call_id",
        "template_key",
        "content",
        "expected_sha256",
        CODE,
        MESSAGE,
        REPEAT_OF,
        "content_sha256",
        "done",
        "done_version",
        "done_updated_at",
        "done_request_id",
    ).iter_rows():
        common = {"row": row, "call_id": call_id, "template_key": template_key}
        # What landed earlier comes first: no later run (a --limit canary, a dry run) may
        # turn a landed row back into one that would be sent again.
        if done and code is None:
            yield RowResult(
                **common,
                status="skipped",
                content_sha256=sha,
                version=done_version,
                updated_at=done_at,
                request_id=done_rid,
                message="already updated with this content by an earlier run",
                reason="landed_earlier",
            )
        elif limit is not None and row >= limit:
            yield RowResult(
                **common,
                status="not_sent",
                content_sha256=sha,
                retryable=True,
                message=f"beyond --limit {limit}",
                reason="limit",
            )
        elif code is not None:
            yield RowResult(
                **common, status="invalid", content_sha256=sha, error_code=code, message=message
            )
        elif repeat_of is not None:
            yield RowResult(
                **common,
                status="skipped",
                content_sha256=sha,
                message=f"same call, template and content as row {repeat_of}",
                reason="repeat",
            )
        else:
            body = request_body(content, template_key)
            yield PlannedRequest(row, call_id, template_key, sha, body, expected or None)
