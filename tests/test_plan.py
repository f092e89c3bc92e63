"""Planning on its own: what each validated row becomes, in input order, and why."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allo_batch import models
from allo_batch.models import (
    PlannedRequest,
    RowResult,
    content_sha256,
    content_sha256_column,
    done_keys,
)
from allo_batch.plan import attach_done, plan_batch, request_body
from allo_batch.validate import duplicates_in, validate_batch

DONE_SCHEMA = {
    "call_id": pl.String,
    "template_key": pl.String,
    "content_sha256": pl.String,
    "version": pl.Int64,
    "updated_at": pl.String,
    "request_id": pl.String,
}


def batch(*rows: tuple[str | None, str | None, str | None]) -> pl.DataFrame:
    schema = dict.fromkeys(("call_id", "template_key", "content"), pl.String)
    frame = pl.DataFrame(rows, schema=schema, orient="row").with_row_index("row")
    frame = frame.with_columns(pl.lit(None, pl.String).alias("expected_sha256"))
    return frame.with_columns(pl.col("row").cast(pl.Int64))


def planned(
    frame: pl.DataFrame,
    done: pl.DataFrame | None = None,
    *,
    limit: int | None = None,
) -> list[RowResult | PlannedRequest]:
    checked = validate_batch(frame, duplicates_in(frame))
    landed = (done if done is not None else pl.DataFrame(schema=DONE_SCHEMA)).select(
        *done_keys(), "version", "updated_at", "request_id"
    )
    return list(plan_batch(attach_done(checked, landed), limit=limit))


def test_each_row_becomes_a_request_or_a_final_result_in_order() -> None:
    """Valid rows become requests with their body serialised once; others get their code."""
    rows = planned(
        batch(
            ("cll-1", None, "fixed"),
            ("msg-2", None, "sms"),
            ("cll-3", "MARKDOWN_SHORT_CALL", "short"),
            ("cll-1", None, "fixed"),
        )
    )
    first, sms, short, repeat = rows
    assert isinstance(first, PlannedRequest)
    assert json.loads(first.body) == {"content": "fixed"}
    assert first.content_sha256 == content_sha256("fixed")
    assert isinstance(sms, RowResult)
    assert (sms.status, sms.error_code) == ("invalid", "INVALID_ITEM_ID")
    assert isinstance(short, PlannedRequest)
    assert json.loads(short.body) == {"content": "short", "template_key": "MARKDOWN_SHORT_CALL"}
    assert isinstance(repeat, RowResult)
    assert (repeat.status, repeat.reason) == ("skipped", "repeat")


def test_content_that_landed_earlier_is_skipped_with_its_version() -> None:
    """The done index matches on call, template and the exact content; edited rows go again."""
    done = pl.DataFrame(
        [("cll-1", "", content_sha256("fixed"), 4, "2026-11-24T00:00:00", "req_a")],
        schema=DONE_SCHEMA,
        orient="row",
    )
    same, edited = planned(batch(("cll-1", None, "fixed"), ("cll-1x", None, "edited")), done)
    assert isinstance(same, RowResult)
    assert (same.status, same.version, same.reason) == ("skipped", 4, "landed_earlier")
    assert isinstance(edited, PlannedRequest)


def test_a_limit_never_turns_a_landed_row_back_into_one_to_send() -> None:
    """A --limit canary after a full run keeps every landed row skipped with its version, and
    rows beyond the limit are deferred with a reason (not failures)."""
    done = pl.DataFrame(
        [(f"cll-{i}", "", content_sha256(f"fix {i}"), 2, None, None) for i in range(4)],
        schema=DONE_SCHEMA,
        orient="row",
    )
    frame = batch(*[(f"cll-{i}", None, f"fix {i}") for i in range(6)])
    rows = planned(frame, done, limit=1)
    assert [getattr(r, "status", "request") for r in rows] == [
        "skipped",
        "skipped",
        "skipped",
        "skipped",
        "not_sent",
        "not_sent",
    ]
    assert all(r.version == 2 for r in rows[:4] if isinstance(r, RowResult))
    assert {r.reason for r in rows[4:] if isinstance(r, RowResult)} == {"limit"}


def test_a_landed_row_keeps_its_version_when_a_later_row_conflicts_with_it() -> None:
    """A canary landed row 0; the whole input also gives its target another content (row 2).
    Row 0 stays skipped with its version (it landed: the result file must not forget it, nor
    undo lose it); row 2, which never landed, is the invalid one."""
    done = pl.DataFrame(
        [("cll-1", "", content_sha256("one"), 2, "2026-11-26T09:00:00", "req-1")],
        schema=DONE_SCHEMA,
        orient="row",
    )
    rows = planned(
        batch(("cll-1", None, "one"), ("cll-2", None, "two"), ("cll-1", None, "uno")), done
    )
    first, _second, third = rows
    assert isinstance(first, RowResult) and isinstance(third, RowResult)
    assert (first.status, first.reason, first.version, first.request_id) == (
        "skipped",
        "landed_earlier",
        2,
        "req-1",
    )
    assert (third.status, third.error_code) == ("invalid", "DUPLICATE_ROW")


def test_the_body_leaves_out_an_empty_template_and_keeps_unicode() -> None:
    """One serialisation, compact, UTF-8 as is."""
    assert request_body("é ✓", None) == '{"content":"é ✓"}'.encode()


@pytest.mark.parametrize("native", [True, False], ids=["polars-hash", "hashlib"])
def test_a_batch_hashes_each_content_as_one_row_would(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The column of hashes a batch gets is the hash each row's content gets alone: non-ASCII
    text as its UTF-8 bytes, a missing content as the empty string; with the plugin and
    without it (as where it is missing, or broken by a polars release)."""
    if native:
        assert models._sha256_plugin() is not None, "polars-hash is installed and agrees"
    else:
        monkeypatch.setattr(models, "_sha256_plugin", lambda: None)
    contents = ["Résumé 📞", "", None, "x" * 5000, "line\nbreak", "\x00nul", "tab\t\r\n"]
    column = content_sha256_column(pl.Series("content", contents, pl.String))
    assert column.name == "content_sha256"
    assert column.dtype == pl.String
    assert column.to_list() == [content_sha256(c) for c in contents]
    assert column[0] == hashlib.sha256("Résumé 📞".encode()).hexdigest()


@given(st.lists(st.none() | st.text(st.characters(exclude_categories=["Cs"])), max_size=40))
@settings(max_examples=60, deadline=None)
def test_the_plugin_hashes_any_text_as_hashlib_does(contents: list[str | None]) -> None:
    column = content_sha256_column(pl.Series("content", contents, pl.String))
    assert column.to_list() == [content_sha256(c) for c in contents]


def test_a_plugin_that_fails_leaves_the_hashing_to_hashlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin that imports but raises (a polars release it was not built for) is not used."""

    class Broken:
        @staticmethod
        def col(name: str) -> Any:
            raise pl.exceptions.ComputeError("plugin ABI mismatch")

    monkeypatch.setattr(models, "_sha256_plugin", lambda: Broken)
    column = content_sha256_column(pl.Series("content", ["a", None], pl.String))
    assert column.to_list() == [content_sha256("a"), content_sha256("")]


def test_a_plugin_that_hashes_otherwise_than_hashlib_is_never_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The once-a-process check: a plugin whose hashes differ from hashlib's is turned off,
    and that is said (the run is slower for it)."""
    models._sha256_plugin.cache_clear()
    monkeypatch.setattr(
        models, "_plugin_sha256", lambda plugin, values: pl.Series(["0" * 64] * len(values))
    )
    try:
        assert models._sha256_plugin() is None
        assert "hashing with hashlib" in caplog.text
        column = content_sha256_column(pl.Series("content", ["a"], pl.String))
        assert column.to_list() == [content_sha256("a")]
    finally:
        models._sha256_plugin.cache_clear()
