"""Pure planning: a validated batch and the done index become inert values, in input order.

Each row becomes either a final :class:`RowResult` (invalid, skipped) or a
:class:`PlannedRequest` whose body is serialised here, once. ``--dry-run`` stops at this stage.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Final

from allo_batch.models import (
    CODE,
    DONE_KEYS,
    MESSAGE,
    REPEAT_OF,
    PlannedRequest,
    RowResult,
    content_sha256_column,
    done_keys,
    done_rows_for,
    unless_not_a_key,
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
    """Add the content hash (unless :func:`with_content_hashes` did already) and, where this
    exact content already landed, its version.

    ``done`` is keyed by ``DONE_KEYS`` (``record.done_keys`` of the landed rows), so a batch
    computes the same key for its rows and joins on it.
    """
    import polars as pl

    hashed = batch if "content_sha256" in batch.columns else with_content_hashes(batch)
    if done.height == 0:
        return hashed.with_columns(
            pl.lit(False).alias("done"),
            pl.lit(None, pl.Int64).alias("done_version"),
            pl.lit(None, pl.String).alias("done_updated_at"),
            pl.lit(None, pl.String).alias("done_request_id"),
        )
    keys = list(DONE_KEYS)
    keyed = hashed.with_columns(done_keys())
    return (
        keyed.join(
            done_rows_for(done, keyed).select(
                *keys,
                pl.col("version").alias("done_version"),
                pl.col("updated_at").alias("done_updated_at"),
                pl.col("request_id").alias("done_request_id"),
                pl.lit(True).alias("done"),
            ),
            on=keys,
            how="left",
            maintain_order="left",
        )
        .drop(keys)
        .with_columns(pl.col("done").fill_null(False))
    )


def with_content_hashes(batch: pl.DataFrame) -> pl.DataFrame:
    """A batch of read rows with the ``content_sha256`` of each row's content."""
    return batch.with_columns(content_sha256_column(batch.get_column("content")))


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """One input batch, planned: the rows settled here as one frame in the result file's
    columns (no Python object per row), and the requests to send, in input order."""

    first_row: int
    end_row: int  # one past the batch's last row
    settled: pl.DataFrame
    requests: list[PlannedRequest]


_DONE_MESSAGE: Final = "already updated with this content by an earlier run"


def plan_frame(batch: pl.DataFrame, *, limit: int | None, dry_run: bool = False) -> PlannedBatch:
    """Plan a validated batch (with :func:`attach_done` columns) with polars expressions.

    Rows are settled in this order: landed earlier (so no later run, a ``--limit`` canary or a
    dry run, turns a landed row back into one to send, and none forgets its version: not even
    when rows added to the input since make it a duplicate), beyond ``--limit``, invalid, a
    repeat of an earlier row, and with ``dry_run`` what would be sent. The rest become
    requests, the only rows that need Python objects (their bodies are serialised here, once).
    """
    import polars as pl

    valid = pl.col(CODE).is_null()
    landed = pl.col("done")
    beyond = pl.lit(False) if limit is None else pl.col("row") >= limit
    repeat = pl.col(REPEAT_OF).is_not_null()
    reason = (
        pl.when(landed).then(pl.lit("landed_earlier"))
        .when(beyond).then(pl.lit("limit"))
        .when(~valid).then(pl.lit(None, pl.String))
        .when(repeat).then(pl.lit("repeat"))
        .when(pl.lit(dry_run)).then(pl.lit("dry_run"))
        .otherwise(pl.lit("send"))
    )  # fmt: skip
    marked = batch.with_columns(
        reason.alias("reason"),
        (landed | beyond | ~valid | repeat | pl.lit(dry_run)).alias("_settled"),
    )
    to_send = marked.filter(~pl.col("_settled"))
    settled = marked.filter(pl.col("_settled")).select(_settled_columns(limit))
    rows = batch["row"]
    first = int(rows[0]) if len(rows) else 0
    return PlannedBatch(first, first + len(rows), settled, list(_requests(to_send)))


def _settled_columns(limit: int | None) -> list[pl.Expr]:
    """The result file's columns for settled rows (DESIGN §3)."""
    import polars as pl

    reason = pl.col("reason")
    status = (
        pl.when(reason.is_in(["landed_earlier", "repeat"])).then(pl.lit("skipped"))
        .when(reason.is_in(["limit", "dry_run"])).then(pl.lit("not_sent"))
        .otherwise(pl.lit("invalid"))
    )  # fmt: skip
    message = (
        pl.when(reason == "landed_earlier").then(pl.lit(_DONE_MESSAGE))
        .when(reason == "limit").then(pl.lit(f"beyond --limit {limit}"))
        .when(reason == "repeat")
        .then(pl.format("same call, template and content as row {}", pl.col(REPEAT_OF)))
        .when(reason == "dry_run").then(pl.lit("dry run: would be sent"))
        .otherwise(pl.col(MESSAGE))
    )  # fmt: skip
    landed = reason == "landed_earlier"
    return [
        pl.col("row"),
        unless_not_a_key("call_id"),
        unless_not_a_key("template_key"),
        status.alias("status"),
        pl.when(reason.is_null()).then(pl.col(CODE)).alias("error_code"),
        reason.is_in(["limit", "dry_run"]).fill_null(False).alias("retryable"),
        pl.lit(None, pl.Int64).alias("http_status"),
        pl.when(landed).then(pl.col("done_version")).alias("version"),
        pl.when(landed).then(pl.col("done_updated_at")).alias("updated_at"),
        pl.lit(0, pl.Int64).alias("attempts"),
        pl.when(landed).then(pl.col("done_request_id")).alias("request_id"),
        pl.col("content_sha256"),
        message.alias("message"),
        reason.alias("reason"),
    ]


def _requests(to_send: pl.DataFrame) -> Iterator[PlannedRequest]:
    columns = ("row", "call_id", "template_key", "content", "expected_sha256", "content_sha256")
    for row, call_id, template_key, content, expected, sha in to_send.select(columns).iter_rows():
        body = request_body(content, template_key)
        yield PlannedRequest(row, call_id, template_key, sha, body, expected or None)


def plan_batch(batch: pl.DataFrame, *, limit: int | None) -> Iterator[Planned]:
    """:func:`plan_frame`, one value per row in input order (for callers that look at each)."""
    planned = plan_frame(batch, limit=limit)
    settled: Iterator[Planned] = (RowResult(**row) for row in planned.settled.iter_rows(named=True))
    requests: Iterator[Planned] = iter(planned.requests)
    yield from heapq.merge(settled, requests, key=attrgetter("row"))
