"""Recording: the result file round-trips in every format, empty jobs included; sidecars never
follow symbolic links; the Recorder keeps journal, results and counters in step."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, get_args

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allo_batch.errors import UsageError
from allo_batch.lock import OutputLock, lock_path
from allo_batch.models import (
    DONE_KEYS,
    RESULT_COLUMNS,
    STATUSES,
    PlannedRequest,
    Reason,
    RowResult,
    RunSummary,
    done_keys,
)
from allo_batch.preview import preview_schema
from allo_batch.record import (
    Journal,
    OrderedResults,
    Recorder,
    journal_path,
    load_earlier,
    read_journal,
    read_results,
    result_schema,
    sidecar_path,
)
from allo_batch.report import summarize_file

FORMATS = ("parquet", "csv", "ndjson")
text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
maybe_text = st.none() | text.filter(bool)  # CSV cannot tell "" from null


@st.composite
def results(draw: st.DrawFn) -> list[RowResult]:
    count = draw(st.integers(min_value=0, max_value=25))
    return [
        RowResult(
            row=row,
            call_id=draw(maybe_text),
            template_key=draw(maybe_text),
            status=draw(st.sampled_from(STATUSES)),
            content_sha256=draw(st.text("0123456789abcdef", min_size=64, max_size=64)),
            error_code=draw(maybe_text),
            retryable=draw(st.booleans()),
            http_status=draw(st.none() | st.integers(100, 599)),
            version=draw(st.none() | st.integers(0, 2**62)),
            updated_at=draw(maybe_text),
            attempts=draw(st.integers(0, 100)),
            request_id=draw(maybe_text),
            message=draw(maybe_text),
            reason=draw(st.none() | st.sampled_from(get_args(Reason))),
        )
        for row in range(count)
    ]


@pytest.mark.parametrize("fmt", FORMATS)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=results(), snapshots=st.sets(st.integers(0, 25)), data=st.data())
def test_any_result_file_round_trips_in_every_format(
    fmt: str, rows: list[RowResult], snapshots: set[int], data: st.DataObject, tmp_path: Path
) -> None:
    """What the writer writes, in any order, the reader reads back in input order, exactly;
    also when checkpoints took snapshots along the way (a Parquet file then has parts)."""
    output = tmp_path / f"results.{fmt}"
    writer = OrderedResults(output)
    for index, result in enumerate(data.draw(st.permutations(rows))):
        writer.add(result)
        if index in snapshots:
            assert writer.snapshot().rows == index + 1
    writer.finish()
    frame = read_results(output)
    assert frame.columns == list(RESULT_COLUMNS)
    assert frame.rows() == [r.as_tuple() for r in rows]
    if fmt == "parquet":  # the types any Arrow reader knows, not polars' string views
        assert pq.read_schema(output).remove_metadata() == result_arrow_schema
    output.unlink()


def plain_arrow_schema(schema: dict[str, Any]) -> pa.Schema:
    """The Arrow types a Parquet file of ``schema`` should read back as in any reader: plain
    strings (not polars' string views, nor large strings), 64-bit integers and floats."""
    arrow = {pl.String: pa.string(), pl.Int64: pa.int64(), pl.Boolean: pa.bool_()}
    arrow[pl.Float64] = pa.float64()
    return pa.schema([(name, arrow[dtype]) for name, dtype in schema.items()])


result_arrow_schema = plain_arrow_schema(result_schema())


def test_a_preview_file_in_parquet_has_the_types_any_arrow_reader_knows(tmp_path: Path) -> None:
    """Preview files go through the same writer: their floats, booleans and nulls too."""
    output = tmp_path / "first.preview.parquet"
    writer = OrderedResults(output, preview_schema())
    writer.add_row(1, (1, "cll-2", None, "unchanged", 4, 4, None, False))
    writer.add_row(0, (0, "cll-1", "MARKDOWN_CLASSIC", "changed", 10, 12, 0.5, True))
    writer.finish()
    assert pq.read_schema(output).remove_metadata() == plain_arrow_schema(preview_schema())
    assert pl.read_parquet(output).rows() == [
        (0, "cll-1", "MARKDOWN_CLASSIC", "changed", 10, 12, 0.5, True),
        (1, "cll-2", None, "unchanged", 4, 4, None, False),
    ]


def test_parquet_columns_are_encoded_for_what_they_hold(tmp_path: Path) -> None:
    """Few distinct values: a dictionary; ids and times that share prefixes: delta strings;
    hashes, which share none: only their lengths delta-encoded (the cheapest to write, and
    no larger). Written in row groups, read back exactly."""
    output = tmp_path / "results.parquet"
    writer = OrderedResults(output)
    rows = [
        RowResult(
            row=row,
            call_id=f"cll-{row:09d}",
            template_key="MARKDOWN_CLASSIC",
            status="updated",
            content_sha256=f"{row:064x}",
        )
        for row in range(50)
    ]
    for result in rows:
        writer.add(result)
    writer.finish()
    meta = pq.ParquetFile(output).metadata.row_group(0)
    encodings = {
        meta.column(i).path_in_schema: set(meta.column(i).encodings)
        for i in range(meta.num_columns)
    }
    assert "DELTA_LENGTH_BYTE_ARRAY" in encodings["content_sha256"]
    assert "DELTA_BYTE_ARRAY" in encodings["call_id"]
    assert "RLE_DICTIONARY" in encodings["status"]
    assert read_results(output).rows() == [r.as_tuple() for r in rows]


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_job_writes_a_result_file_every_command_reads(fmt: str, tmp_path: Path) -> None:
    """Zero rows is a valid job: the file is readable by rerun and report."""
    output = tmp_path / f"empty.{fmt}"
    recorder = Recorder(output, {"rows": 0}, journaled=True)
    recorder.close(RunSummary(rows=0))
    assert read_results(output).height == 0
    assert summarize_file(output).rows == 0
    assert not journal_path(output).exists()


def test_an_older_result_file_without_the_reason_column_still_reads(tmp_path: Path) -> None:
    """An upgrade in the middle of a job loses nothing: missing columns come back null."""
    output = tmp_path / "old.csv"
    old = [c for c in RESULT_COLUMNS if c != "reason"]
    pl.DataFrame({c: ["1"] if c in ("row", "attempts") else [None] for c in old}).with_columns(
        pl.lit("updated").alias("status"), pl.lit("true").alias("retryable")
    ).write_csv(output)
    frame = read_results(output)
    assert frame["reason"].to_list() == [None]
    assert frame["retryable"].to_list() == [True]


def test_the_recorder_journals_sent_and_lasting_outcomes_and_counts_them(tmp_path: Path) -> None:
    """Requests are journaled before they go; updated and failed rows after; planned rows are
    counted and written but not journaled (a rerun plans them again)."""
    output = tmp_path / "out.ndjson"
    recorder = Recorder(output, {"rows": 3}, journaled=True)
    request = PlannedRequest(1, "cll-1", None, "a" * 64, b"{}")
    recorder.planned(
        RowResult(
            row=0,
            call_id="x",
            template_key=None,
            status="invalid",
            content_sha256="b" * 64,
            error_code="INVALID_ITEM_ID",
        )
    )
    recorder.sending(request, "req_000000000001")
    recorder.finished(
        RowResult(
            row=1,
            call_id="cll-1",
            template_key=None,
            status="updated",
            content_sha256="a" * 64,
            version=2,
        )
    )
    recorder.planned(
        RowResult(
            row=2,
            call_id="cll-2",
            template_key=None,
            status="not_sent",
            content_sha256="c" * 64,
            reason="limit",
        )
    )
    facts = read_journal(journal_path(output))
    assert [u["row"] for u in facts.updated] == [1]
    assert facts.in_doubt == []
    assert dict(recorder.counts) == {"invalid": 1, "updated": 1, "not_sent": 1}
    assert recorder.deferred == 1
    assert dict(recorder.codes) == {"INVALID_ITEM_ID": 1}
    recorder.close(RunSummary(rows=3))
    assert read_results(output)["status"].to_list() == ["invalid", "updated", "not_sent"]
    assert sidecar_path(output).exists()


class _Store:
    """A store in memory, as :class:`~allo_batch.record.Mirror` sees one; ``refuse`` names an
    object whose uploads fail (as when the run is killed before it goes up)."""

    def __init__(self, folder: Path, refuse: str | None = None) -> None:
        self.folder = folder
        self.refuse = refuse
        self.objects: dict[str, bytes] = {}
        self.puts: list[str] = []

    def put(self, local: Path, target: Path | None = None) -> None:
        name = (target or local).relative_to(self.folder).as_posix()
        if name == self.refuse:
            raise UsageError(f"{name}: refused")
        self.puts.append(name)
        self.objects[name] = local.read_bytes()

    def delete(self, local: Path) -> None:
        self.objects.pop(local.relative_to(self.folder).as_posix(), None)

    def names(self, local_folder: Path) -> list[str]:
        return []

    def problem(self) -> None:
        return None


def _checkpointed(store: _Store, output: Path, rows: int) -> Recorder:
    """A recorder for a store output that settled ``rows`` rows and took one checkpoint."""
    recorder = Recorder(output, {"rows": rows}, journaled=False, mirror=store, checkpoint_every=0)
    for row in range(rows):
        recorder.planned(
            RowResult(
                row=row,
                call_id=f"cll-{row}",
                template_key=None,
                status="not_sent",
                content_sha256="c" * 64,
                reason="limit",
            )
        )
    recorder.sync()
    deadline = time.monotonic() + 10  # the checkpoint goes up in a thread of its own
    while len(store.puts) < 2 and store.refuse is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return recorder


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_sidecar_goes_up_before_its_result_file_and_names_it(fmt: str, tmp_path: Path) -> None:
    """At a checkpoint and at the end alike: the sidecar first, naming the result file by
    hash, so the store never holds a result file newer than its sidecar."""
    output = tmp_path / f"out.{fmt}"
    store = _Store(tmp_path)
    recorder = _checkpointed(store, output, 3)
    sidecar = sidecar_path(output).name
    checkpoint = json.loads(store.objects[sidecar])
    assert checkpoint["checkpoint"]["rows"] == 3
    assert checkpoint["result_sha256"] == hashlib.sha256(store.objects[output.name]).hexdigest()
    recorder.close(RunSummary(rows=3))
    assert store.puts == [sidecar, output.name, sidecar, output.name]
    final = json.loads(store.objects[sidecar])
    assert final["summary"]["rows"] == 3
    assert final["result_sha256"] == hashlib.sha256(store.objects[output.name]).hexdigest()
    assert store.objects[output.name] == output.read_bytes()


def test_a_kill_between_the_two_uploads_leaves_a_sidecar_that_names_another_file(
    tmp_path: Path,
) -> None:
    """The result file's upload fails (the run is killed then): the store's sidecar already
    describes the checkpoint that never arrived, and its hash says so."""
    output = tmp_path / "out.csv"
    store = _Store(tmp_path)
    store.objects[output.name] = b"an earlier checkpoint"
    store.refuse = output.name
    _checkpointed(store, output, 2).abandon()
    facts = json.loads(store.objects[sidecar_path(output).name])
    assert facts["checkpoint"]["rows"] == 2
    assert facts["result_sha256"] != hashlib.sha256(store.objects[output.name]).hexdigest()
    assert store.objects[output.name] == b"an earlier checkpoint"


@pytest.mark.parametrize("which", ["journal", "lock", "sidecar"])
def test_sidecars_never_write_through_a_symbolic_link(which: str, tmp_path: Path) -> None:
    """A planted link at <output>.journal/.lock must not get its target appended or truncated."""
    output = tmp_path / "out.csv"
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    link = {"journal": journal_path(output), "lock": lock_path(output)}.get(which)
    if which == "sidecar":
        link = output.with_name(f".{sidecar_path(output).name}.tmp")
    assert link is not None
    os.symlink(target, link)
    with pytest.raises(UsageError, match="symbolic link"):
        if which == "journal":
            Journal(journal_path(output))
        elif which == "lock":
            OutputLock(output).acquire()
        else:
            Recorder(output, {}, journaled=False).close(RunSummary())
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_done_index_keeps_each_targets_latest_landed_content(fmt: str, tmp_path: Path) -> None:
    """A rerun skips a row only if its exact content is the latest that landed on its target:
    the journal of a killed run is newer than the result file, and a request cut off in flight
    is in doubt only until a later one of the same content lands."""
    output = tmp_path / f"out.{fmt}"
    rows = [
        ("cll-A", None, "updated", "x" * 64, 1, 1),
        ("cll-B", None, "not_sent", "z" * 64, None, 1),  # cut off in flight by a clean stop
        ("cll-C", "MARKDOWN_CLASSIC", "updated", "w" * 64, 4, 1),
        ("cll-D", None, "not_sent", "v" * 64, None, 1),  # cut off, then landed (journal below)
        ("cll-E", None, "failed", "u" * 64, None, 3),
    ]
    names = ["call_id", "template_key", "status", "content_sha256", "version", "attempts"]
    earlier = pl.DataFrame([dict(zip(names, r, strict=True)) for r in rows]).with_row_index("row")
    schema = result_schema()
    earlier = earlier.select(
        pl.col(name).cast(dtype) if name in earlier.columns else pl.lit(None, dtype).alias(name)
        for name, dtype in schema.items()
    )
    if fmt == "parquet":
        earlier.write_parquet(output)
    elif fmt == "csv":
        earlier.write_csv(output)
    else:
        earlier.write_ndjson(output)
    journal = Journal(journal_path(output))
    for row, sha, version in ((0, "y" * 64, 2), (3, "v" * 64, 7)):
        call_id = rows[row][0]
        journal.sent(row, call_id, None, sha, f"req_{row}")
        journal.result(
            RowResult(
                row=row,
                call_id=call_id,
                template_key=None,
                status="updated",
                content_sha256=sha,
                version=version,
            )
        )
    journal.close()

    found = load_earlier(output)
    assert found.in_doubt == 1  # cll-B; cll-D's content landed since
    probes = pl.DataFrame(
        {
            "call_id": ["cll-A", "cll-A", "cll-C", "cll-D", "cll-E"],
            "template_key": [None, None, "MARKDOWN_CLASSIC", None, None],
            "content_sha256": ["x" * 64, "y" * 64, "w" * 64, "v" * 64, "u" * 64],
        },
        schema={"call_id": pl.String, "template_key": pl.String, "content_sha256": pl.String},
    ).with_columns(done_keys())
    landed = probes.join(found.done, on=list(DONE_KEYS), how="left")
    # cll-A's first content was replaced by a later write: a row asking for it is sent again.
    assert landed["version"].to_list() == [None, 2, 4, 7, None]
    assert found.done.height == 3


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_an_earlier_result_file_with_wrong_types_is_a_usage_error(fmt: str, tmp_path: Path) -> None:
    """The rerun reads its earlier result file lazily, so a column of the wrong type surfaces
    only when the done index is built: it must still be a usage error naming the file and the
    column (exit 2), never a crash (exit 70)."""
    output = tmp_path / f"out.{fmt}"
    row = {"row": "x", "call_id": "cll-1", "status": "updated", "version": "abc"}
    if fmt == "csv":
        output.write_text(",".join(row) + "\n" + ",".join(row.values()) + "\n")
    else:
        output.write_text(json.dumps(row) + "\n")
    with pytest.raises(
        UsageError, match=r"out\.\w+: cannot read the earlier result file: .*version"
    ):
        load_earlier(output)
