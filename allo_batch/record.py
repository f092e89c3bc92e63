"""Recording outcomes: the journal (crash-safe, as they arrive) and the result file (at the end).

:class:`Recorder` is their one owner during a run: the planner and the sender report each row to
it, and it keeps the journal, the ordered result file, the counters and the sidecar in step.

- The **journal** (``<output>.journal``) is append-only NDJSON, one ``os.write`` per line, so
  everything written survives ``kill -9`` (the OS holds it); it is fsynced about once a second
  against machine loss. A ``sent`` line precedes every request; a ``result`` line follows every
  answered row. A torn last line is ignored when read.
- The **result file** is assembled in input order while the run goes (a small reorder buffer
  bounded by the rows in flight) into a temporary file of the output's own format beside it
  (Parquet as row groups of an open part; several parts, merged at the end, only where
  checkpoints read them), then renamed into place: it appears whole or not at all.
- The **done index** is what earlier runs of this output landed: for each ``(call_id,
  template_key)`` the latest content hash that was ``updated``, with its version.
- For an output in a store (``storage.py``) all of this happens in the output's local state
  folder, and a :class:`Mirror` uploads it: before-images within a second of being written, the
  result file whole as a **checkpoint** every ``checkpoint_every`` seconds or
  ``_CHECKPOINT_ROWS`` rows (the rows settled so far and, for rows not reached yet, what the
  earlier result file said), and the final result file and sidecar at the end. The journal is
  removed only once they are uploaded.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from allo_batch.config import literal_path
from allo_batch.errors import AlloBatchError, UsageError
from allo_batch.models import (
    DEFERRED_REASONS,
    DONE_KEYS,
    NO_TEMPLATE,
    PlannedRequest,
    RowResult,
    RunSummary,
    done_keys,
    done_rows_for,
)

if TYPE_CHECKING:
    import polars as pl

    from allo_batch.storage import ObjectUri

OutputFormat = Literal["parquet", "csv", "ndjson"]
_FSYNC_EVERY: Final = 1.0
_CHUNK_ROWS: Final = 10_000
_ENCODE: Final = json.JSONEncoder(separators=(",", ":")).encode
_CHECKPOINT_ROWS: Final = 50_000
_COPY_BLOCK: Final = 8 << 20
log = logging.getLogger("allo_batch")


def output_format(path: Path | ObjectUri, option: str = "--output ") -> OutputFormat:
    """The result format from the output's extension (``option`` leads a refusal: the one
    that named the file, or nothing for a file read)."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    if suffix in (".ndjson", ".jsonl"):
        return "ndjson"
    msg = f"{option}{path}: a result file is named .parquet, .csv or .ndjson"
    raise UsageError(msg)


def journal_path(output: Path) -> Path:
    """Where the journal of ``output`` lives."""
    return output.with_name(output.name + ".journal")


def result_schema() -> dict[str, Any]:
    """The result file's polars schema (DESIGN §3)."""
    import polars as pl

    return {
        "row": pl.Int64,
        "call_id": pl.String,
        "template_key": pl.String,
        "status": pl.String,
        "error_code": pl.String,
        "retryable": pl.Boolean,
        "http_status": pl.Int64,
        "version": pl.Int64,
        "updated_at": pl.String,
        "attempts": pl.Int64,
        "request_id": pl.String,
        "content_sha256": pl.String,
        "message": pl.String,
        "reason": pl.String,
    }


def open_private(path: Path, flags: int) -> int:
    """Open with owner-only permissions (the files name calls of customers), never through a
    symbolic link: a planted ``<output>.journal`` link must not get its target appended to."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if path.is_symlink():
            msg = f"{path}: is a symbolic link; allo-batch does not write through links"
            raise UsageError(msg) from None
        msg = f"{path}: cannot open ({exc.strerror})"
        raise UsageError(msg) from None
    os.fchmod(fd, 0o600)
    return fd


class Journal:
    """Append-only NDJSON of requests sent and rows answered, safe against ``kill -9``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._last_sync = time.monotonic()
        self._dirty = False
        # A torn line left by a killed run must not glue itself to the next one.
        if path.stat().st_size and not _ends_with_newline(path):
            os.write(self._fd, b"\n")

    def sent(self, row: int, call_id: str, template_key: str | None, sha: str, rid: str) -> None:
        """Record that a request for ``row`` is about to go out."""
        self._write(
            {
                "e": "sent",
                "row": row,
                "call_id": call_id,
                "template_key": template_key,
                "content_sha256": sha,
                "request_id": rid,
            }
        )

    def start(self, input_facts: dict[str, object]) -> None:
        """Record that a run began, and on which input (checked by the next run)."""
        self._write({"e": "start", "pid": os.getpid(), "input": input_facts})
        self.sync()

    def result(self, result: RowResult) -> None:
        """Record a row's final outcome for this run."""
        self._write({"e": "result", **result.as_dict()})

    def _write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, _ENCODE(record).encode() + b"\n")
        self._dirty = True
        now = time.monotonic()
        if now - self._last_sync >= _FSYNC_EVERY:
            self.sync()

    @property
    def unsynced(self) -> bool:
        """Whether lines were written since the last fsync."""
        return self._dirty

    def sync(self) -> None:
        """Push the journal to disk (against machine loss; kill -9 loses nothing anyway)."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Sync and close."""
        with contextlib.suppress(OSError):
            self.sync()
        os.close(self._fd)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


_Key = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class JournalFacts:
    """What a journal left by earlier runs says."""

    updated: list[dict[str, Any]]
    in_doubt: list[_Key]  # sent, never answered: (call_id, template_key or "", content_sha256)
    inputs: list[dict[str, Any]]  # the input fingerprint of each run that wrote it
    torn_lines: int


def read_journal(path: Path) -> JournalFacts:
    """Outcomes and sent-but-unanswered requests of a journal; torn lines are skipped."""
    updated: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    pending: dict[_Key, None] = {}
    torn = 0
    if not path.exists():
        return JournalFacts(updated, [], inputs, 0)
    with path.open("rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw)
            except ValueError:
                torn += 1
                continue
            if not isinstance(record, dict):
                torn += 1
                continue
            event = record.get("e")
            if event == "start":
                if isinstance(record.get("input"), dict):
                    inputs.append(record["input"])
                continue
            key = (
                str(record.get("call_id")),
                record.get("template_key") or NO_TEMPLATE,
                str(record.get("content_sha256")),
            )
            if event == "sent":
                pending[key] = None
            elif event == "result":
                pending.pop(key, None)
                if record.get("status") == "updated":
                    updated.append(record)
    return JournalFacts(updated, list(pending), inputs, torn)


@dataclass(frozen=True, slots=True)
class Earlier:
    """What earlier runs with this output left: landed rows, rows in doubt, their inputs."""

    done: pl.DataFrame
    in_doubt: int
    inputs: list[dict[str, Any]]
    torn_lines: int
    two_templates: set[str]  # calls an earlier answer said have two completed summaries


def load_earlier(output: Path) -> Earlier:
    """Read the result file, its sidecar and the journal left beside ``output``.

    The result file is scanned, never held whole: a rerun of a million-row job keeps only the
    compact done index (see :func:`done_keys`), not the earlier rows.
    """
    import polars as pl

    facts = read_journal(journal_path(output))
    previous = scan_results(output) if output.exists() else None
    key_columns = ["call_id", "template_key", "content_sha256"]
    doubtful = [
        pl.DataFrame(facts.in_doubt, schema={c: pl.String for c in key_columns}, orient="row")
    ]
    two: set[str] = set()
    # The scan is read here, lazily: a column of the wrong type surfaces only now.
    with _reading_earlier(output):
        if previous is not None:
            # A clean stop records requests cut off in flight as not_sent with attempts > 0.
            cut_off = previous.filter((pl.col("status") == "not_sent") & (pl.col("attempts") > 0))
            doubtful.append(cut_off.select(key_columns).collect())
            refused = previous.filter(pl.col("error_code") == "SUMMARY_TEMPLATE_KEY_REQUIRED")
            two = set(refused.select("call_id").collect()["call_id"].drop_nulls().to_list())
        done = _done_index(previous, facts)
    # In doubt: sent without an answer, and not landed by any later request.
    sent_unanswered = pl.concat(doubtful).unique().select(done_keys())
    landed = done_rows_for(done, sent_unanswered).select(DONE_KEYS)
    in_doubt = sent_unanswered.join(landed, on=list(DONE_KEYS), how="anti").height
    inputs = list(facts.inputs)
    sidecar = read_sidecar(output) if previous is not None else {}
    if isinstance(sidecar.get("input"), dict):
        inputs.insert(0, sidecar["input"])
    return Earlier(done, in_doubt, inputs, facts.torn_lines, two)


def _target_key() -> pl.Expr:
    import polars as pl

    target = pl.concat_str(
        pl.col("call_id").fill_null(""),
        pl.col("template_key").fill_null(NO_TEMPLATE),
        separator="\x1f",
    )
    return target.hash(seed=7).alias("_target")


def _done_index(previous: pl.LazyFrame | None, journal: JournalFacts) -> pl.DataFrame:
    """Latest landed content per ``(call_id, template_key)`` from the result file and journal:
    its key (:data:`DONE_KEYS`), ``version``, ``updated_at`` and ``request_id``.

    Per target only the latest landed content counts: a row asking for content that landed
    before another edit did must be sent again. (A 64-bit collision of two targets would only
    make a row be resent, never skipped.)
    """
    import polars as pl

    columns = ["call_id", "template_key", "content_sha256", "version", "updated_at", "request_id"]
    schema = {k: v for k, v in result_schema().items() if k in columns}
    parts: list[pl.LazyFrame] = []
    if previous is not None:
        # Landed: written, found already right, or carried over from a run that did either.
        carried = pl.col("version").is_not_null() | (pl.col("reason") == "landed_earlier")
        landed = pl.col("status").is_in(["updated", "unchanged"]) | (
            (pl.col("status") == "skipped") & carried.fill_null(False)
        )
        parts.append(previous.filter(landed).select(columns))
    if journal.updated:
        parts.append(pl.DataFrame(journal.updated, schema=schema).select(columns).lazy())
    kept = [*DONE_KEYS, "version", "updated_at", "request_id"]
    if not parts:
        empty = {k: pl.UInt64 for k in DONE_KEYS} | {
            "version": pl.Int64,
            "updated_at": pl.String,
            "request_id": pl.String,
        }
        return pl.DataFrame(schema=empty)
    # The keys are computed batch by batch (streaming), so the earlier rows' strings are never
    # all held at once; only the compact columns are.
    compact = (
        pl.concat(parts)
        .select(_target_key(), *done_keys(), "version", "updated_at", "request_id")
        .collect(engine="streaming")
    )
    # Later parts and later lines win: the journal is newer than the result file. A mask of
    # each target's last row, where unique(keep="last") built a second copy of the frame (the
    # 1M-row rerun's peak).
    return compact.filter(pl.col("_target").is_last_distinct()).select(kept)


def read_sidecar(output: Path) -> dict[str, Any]:
    """The sidecar of ``output`` as a dict; empty when missing or unreadable."""
    try:
        value = json.loads(sidecar_path(output).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_results(path: Path) -> pl.DataFrame:
    """Read a result file of any supported format with the result schema.

    Columns that an older allo-batch did not write yet (``reason``) come back null, so an upgrade
    in the middle of a job loses nothing; an empty file is an empty result.
    """
    import polars as pl

    fmt = output_format(path, "")
    schema = result_schema()
    with _reading_earlier(path):
        if path.stat().st_size == 0:
            return pl.DataFrame(schema=schema)
        if fmt == "parquet":
            frame = pl.read_parquet(path, glob=False)
        elif fmt == "csv":
            frame = pl.read_csv(path, infer_schema=False, raise_if_empty=False, glob=False)
        else:
            frame = pl.read_ndjson(literal_path(path), infer_schema_length=None)
        return _conform(frame, schema)


def scan_results(path: Path) -> pl.LazyFrame:
    """A result file as a lazy frame with the result schema (for scans that keep only a few
    columns or rows); see :func:`read_results`."""
    import polars as pl

    fmt = output_format(path, "")
    with _reading_earlier(path):
        if path.stat().st_size == 0:
            return pl.LazyFrame(schema=result_schema())
        if fmt == "parquet":
            frame = pl.scan_parquet(path, glob=False)
        elif fmt == "csv":
            frame = pl.scan_csv(path, infer_schema=False, raise_if_empty=False, glob=False)
        else:
            frame = pl.scan_ndjson(literal_path(path), infer_schema_length=None)
        names = frame.collect_schema()
    if "status" not in names:
        msg = f"{path}: cannot read the earlier result file: not a result file"
        raise UsageError(msg)
    return frame.select(_conformed(name, dtype, names) for name, dtype in result_schema().items())


@contextlib.contextmanager
def _reading_earlier(path: Path) -> Iterator[None]:
    """An earlier result file that cannot be read (or whose columns have the wrong types) is
    a usage error naming it, not a crash."""
    import polars as pl

    try:
        yield
    except (OSError, pl.exceptions.PolarsError) as exc:
        msg = f"{path}: cannot read the earlier result file: {str(exc).splitlines()[0][:200]}"
        raise UsageError(msg) from exc


def _conformed(name: str, dtype: Any, found: Any) -> pl.Expr:
    """One result column from whatever the file gave (absent in older files: null)."""
    import polars as pl

    if name not in found:
        return pl.lit(None, dtype).alias(name)
    if dtype == pl.Boolean and found[name] == pl.String:
        return (pl.col(name).str.to_lowercase() == "true").alias(name)
    return pl.col(name).cast(dtype).alias(name)


def _conform(frame: pl.DataFrame, schema: dict[str, Any]) -> pl.DataFrame:
    """The result schema's columns, in order, from whatever types the file gave."""
    import polars as pl

    if "status" not in frame.columns:
        msg = f"not a result file (columns: {', '.join(frame.columns[:10])})"
        raise pl.exceptions.ComputeError(msg)
    found = frame.schema
    return frame.select(_conformed(name, dtype, found) for name, dtype in schema.items())


@dataclass(slots=True)
class _Batch:
    """An input batch whose settled rows wait for its ``pending`` sent rows."""

    first: int
    end: int
    settled: pl.DataFrame
    pending: int
    rows: list[tuple[Any, ...]] = field(default_factory=list)


class OrderedResults:
    """Collects results in any order and writes them in input order, a chunk at a time.

    Chunks go straight into a temporary file of the output's own format (CSV and NDJSON are
    appended to; Parquet is written as row groups into a part file that stays open until a
    checkpoint needs to read it), so memory stays at one chunk plus the reorder buffer whatever
    the number of rows. Without checkpoints the one part becomes the result file as it is.
    """

    def __init__(self, output: Path, schema: dict[str, Any] | None = None) -> None:
        self.output = output
        self.schema = schema or result_schema()
        self.format = output_format(output)
        self.temp = output.with_name(f".{output.name}.partial")
        self._parts = output.with_name(f".{output.name}.parts")
        self._discard_leftovers()
        if self.format == "parquet":
            self._parts.mkdir(mode=0o700)
        else:
            os.close(open_private(self.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        self._waiting: dict[int, tuple[Any, ...]] = {}
        self._batches: list[_Batch] = []
        self._began = False
        self._header_due = True
        self._starts: list[int] = []
        self._next = 0
        self._chunk: list[tuple[Any, ...]] = []
        self._part: _PartWriter | None = None
        self._part_count = 0
        self.written = 0

    def add(self, result: RowResult) -> None:
        """Accept one row's result; rows are written as soon as all before them are in."""
        self.add_row(result.row, result.as_tuple())

    def add_row(self, row: int, values: tuple[Any, ...]) -> None:
        """Accept row ``row``'s values (in the schema's order), in any order."""
        if self._batches and self._add_to_batch(row, values):
            return
        self._waiting[row] = values
        while self._next in self._waiting:
            self._chunk.append(self._waiting.pop(self._next))
            self._next += 1
            if len(self._chunk) >= _CHUNK_ROWS:
                self._flush()

    def add_batch(self, first: int, end: int, settled: pl.DataFrame, pending: int) -> None:
        """Accept a whole input batch (rows ``first`` to ``end - 1``): the rows already settled
        as one frame, and ``pending`` rows still to come one by one through :meth:`add`.
        A batch is written, in row order, once all of its rows are in."""
        self._flush()  # rows added one by one before batches began keep their place
        self._batches.append(_Batch(first, end, settled, pending))
        self._starts.append(first)
        self._drain()

    def _add_to_batch(self, row: int, values: tuple[Any, ...]) -> bool:
        index = bisect.bisect_right(self._starts, row) - 1
        if index < 0 or row >= self._batches[index].end:
            return False
        batch = self._batches[index]
        batch.rows.append(values)
        batch.pending -= 1
        self._drain()
        return True

    def _drain(self) -> None:
        import polars as pl

        while self._batches and self._batches[0].pending <= 0:
            batch = self._batches.pop(0)
            self._starts.pop(0)
            frame = batch.settled
            if batch.rows:
                arrived = pl.DataFrame(batch.rows, schema=self.schema, orient="row")
                frame = pl.concat([frame, arrived]).sort("row")
            self._write(frame)
            self._next = batch.end

    def _flush(self) -> None:
        import polars as pl

        if not self._chunk and (self.written or self.format == "ndjson"):
            return
        self._write(pl.DataFrame(self._chunk, schema=self.schema, orient="row"))
        self._chunk.clear()

    def _write(self, frame: pl.DataFrame) -> None:
        # An empty frame is written once, at the start: a CSV's header, a Parquet schema.
        if not frame.height and (self._began or self.format == "ndjson"):
            return
        self._began = True
        if self.format == "parquet":
            if self._part is None:
                self._part = _PartWriter(
                    self._parts / f"{self._part_count:06d}.parquet", self.schema
                )
                self._part_count += 1
            self._part.write(frame)
        else:
            with self.temp.open("ab") as handle:
                if self.format == "csv":
                    frame.write_csv(handle, include_header=self._header_due)
                    self._header_due = False
                else:
                    frame.write_ndjson(handle)
        self.written += frame.height

    def snapshot(self) -> Snapshot:
        """What is settled so far, for a checkpoint taken in another thread: the rows written
        (the files only grow, or gain parts) and a copy of the rows held in memory."""
        import polars as pl

        if self._chunk:
            self._flush()
        self._close_part()  # a checkpoint reads whole parts; the next rows start another
        held = [pl.DataFrame(list(self._waiting.values()), schema=self.schema, orient="row")]
        for batch in self._batches:
            held.append(batch.settled.select(list(self.schema)))
            held.append(pl.DataFrame(batch.rows, schema=self.schema, orient="row"))
        parts = sorted(self._parts.glob("*.parquet")) if self.format == "parquet" else []
        return Snapshot(
            format=self.format,
            schema=self.schema,
            written=self.written,
            temp=self.temp,
            length=0 if self.format == "parquet" else self.temp.stat().st_size,
            header=not self._header_due,
            parts=parts,
            held=pl.concat(held).sort("row"),
        )

    def finish(self) -> None:
        """Write what is left and rename the whole file into place atomically."""

        if self._waiting or self._batches:
            left = sorted(self._waiting)[:5] or [b.first for b in self._batches[:5]]
            msg = f"internal error: rows {left} were never completed"
            raise RuntimeError(msg)
        self._flush()
        if self.format == "parquet":
            self._close_part()
            parts = sorted(self._parts.glob("*.parquet"))
            if len(parts) == 1:
                os.replace(parts[0], self.temp)
            else:
                _write_parquet(self.temp, self.schema, parts)
            self._remove_parts()
        os.chmod(self.temp, 0o600)
        os.replace(self.temp, self.output)

    def abandon(self) -> None:
        """Drop the temporary files (the journal keeps what landed). A part that cannot be
        closed (a full disk) is dropped all the same: the error that stopped the run is the
        one to tell."""
        with contextlib.suppress(Exception):
            self._close_part()
        self._discard_leftovers()

    def _close_part(self) -> None:
        part, self._part = self._part, None
        if part is not None:
            part.close()

    def _discard_leftovers(self) -> None:
        with contextlib.suppress(OSError):
            self.temp.unlink()
        self._remove_parts()

    def _remove_parts(self) -> None:
        if self._parts.is_dir():
            for part in self._parts.iterdir():
                part.unlink()
            self._parts.rmdir()


# Columns of few distinct values: dictionary-encoded. The others (ids, hashes, times) are
# mostly distinct, and trying a dictionary on them costs more than it saves; those that share
# prefixes row after row, or count up, are delta-encoded instead (a fifth less time to write
# than plain, and smaller; polars and pyarrow read both). Hashes share no prefixes: only
# their lengths are delta-encoded (a sixth less time than prefixes, and no larger).
_DICTIONARY_COLUMNS: Final = ("template_key", "status", "error_code", "message", "reason")
_DELTA_COLUMNS: Final = {
    "row": "DELTA_BINARY_PACKED",
    "call_id": "DELTA_BYTE_ARRAY",
    "content_sha256": "DELTA_LENGTH_BYTE_ARRAY",
    "updated_at": "DELTA_BYTE_ARRAY",
    "request_id": "DELTA_BYTE_ARRAY",
}
# Statistics for the columns a reader filters on; computing them for every column costs a
# third of the writing time.
_STATISTICS_COLUMNS: Final = ("row", "status", "error_code", "reason")


def _parquet_writer(sink: Any, schema: dict[str, Any]) -> Any:
    """A pyarrow writer of result files (the schema given as polars types).

    It takes polars' own string views (pyarrow 21 and later write them), so no batch is
    converted on the way: a sixth of a 10M-row dry run's writing time. The Arrow schema is
    not stored, so every reader sees plain Parquet strings, the types any Arrow reader knows,
    rather than views."""
    import polars as pl
    import pyarrow.parquet as pq

    target = pl.DataFrame(schema=schema).to_arrow(compat_level=_polars_views()).schema
    names = set(target.names)
    return pq.ParquetWriter(
        sink,
        target,
        compression="zstd",
        use_dictionary=[name for name in _DICTIONARY_COLUMNS if name in names],
        column_encoding={name: how for name, how in _DELTA_COLUMNS.items() if name in names},
        write_statistics=[name for name in _STATISTICS_COLUMNS if name in names],
        store_schema=False,
    )


class _PartWriter:
    """One part of a Parquet result file, a row group per write, owner-only."""

    def __init__(self, path: Path, schema: dict[str, Any]) -> None:
        self._file = os.fdopen(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")
        self._writer = _parquet_writer(self._file, schema)

    def write(self, frame: pl.DataFrame) -> None:
        if frame.height:  # (the schema is written at the close, rows or not)
            self._writer.write_table(_arrow(frame, self._writer.schema))

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            self._file.close()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """See :meth:`OrderedResults.snapshot`."""

    format: OutputFormat
    schema: dict[str, Any]
    written: int  # rows 0 to written - 1 are in the temporary file or the parts
    temp: Path
    length: int  # bytes of the temporary file that hold them (CSV, NDJSON)
    header: bool  # whether those bytes start with the CSV header
    parts: list[Path]  # Parquet: the part files that hold them
    held: pl.DataFrame  # rows settled after them, sorted

    @property
    def rows(self) -> int:
        """Rows settled in this run so far."""
        return self.written + self.held.height


def write_checkpoint(snapshot: Snapshot, earlier: Path | None, dest: Path) -> None:
    """A whole result file at ``dest``: the rows settled so far and, for the rows after them,
    what ``earlier`` (the result file this run started from) said, in row order. Every file is
    streamed a block at a time (pyarrow's readers, as for inputs): memory holds a block and the
    rows in flight, whatever the size of the result file."""
    import polars as pl

    later = _later_rows(snapshot, earlier)
    if snapshot.format == "parquet":
        _write_parquet(dest, snapshot.schema, snapshot.parts, later)
        return
    fd = open_private(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as sink:
        with snapshot.temp.open("rb") as prefix:
            left = snapshot.length
            while left > 0 and (block := prefix.read(min(_COPY_BLOCK, left))):
                sink.write(block)
                left -= len(block)
        header = snapshot.format == "csv" and not snapshot.header
        for frame in later:
            if snapshot.format == "csv":
                frame.write_csv(sink, include_header=header)
                header = False
            else:
                frame.write_ndjson(sink)
        if header:
            pl.DataFrame(schema=snapshot.schema).write_csv(sink)


def _later_rows(snapshot: Snapshot, earlier: Path | None) -> Iterator[pl.DataFrame]:
    """The rows after the written ones: held rows, else what ``earlier`` said, in row order
    (both are sorted; the held rows are few)."""
    import polars as pl

    held = snapshot.held
    if earlier is None or not earlier.exists() or earlier.stat().st_size == 0:
        if held.height:
            yield held
        return
    skip = held["row"].to_list()
    taken = 0
    for frame in _result_batches(earlier, snapshot.schema):
        frame = frame.filter((pl.col("row") >= snapshot.written) & ~pl.col("row").is_in(skip))
        if not frame.height:
            continue
        upto = int(held["row"].search_sorted(frame["row"][-1], side="right"))
        if upto > taken:
            frame = pl.concat([frame, held.slice(taken, upto - taken)]).sort("row")
            taken = upto
        yield frame
    if taken < held.height:
        yield held.slice(taken)


def _result_batches(path: Path, schema: dict[str, Any]) -> Iterator[pl.DataFrame]:
    """A result file of any format, a block at a time, with the result schema."""
    import polars as pl
    import pyarrow as pa

    fmt = output_format(path, "")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as handle:
            for batch in handle.iter_batches(batch_size=_CHUNK_ROWS):
                yield _conform(_frame(pa.Table.from_batches([batch])), schema)
        return
    reader: Any
    if fmt == "csv":
        import csv

        import pyarrow.csv as pcsv

        with path.open(newline="", encoding="utf-8") as text:
            names = next(csv.reader(text), [])
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=1 << 20, use_threads=False),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.large_string()),
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
    else:
        import pyarrow.json as pjson

        arrow = {pl.Int64: pa.int64(), pl.Boolean: pa.bool_()}
        fields = [(name, arrow.get(dtype, pa.large_string())) for name, dtype in schema.items()]
        reader = pjson.open_json(
            path,
            read_options=pjson.ReadOptions(block_size=1 << 20, use_threads=False),
            parse_options=pjson.ParseOptions(
                explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore"
            ),
        )
    try:
        for batch in reader:
            yield _conform(_frame(pa.Table.from_batches([batch])), schema)
    finally:
        reader.close()  # its reading threads stop before the interpreter exits


def _frame(table: Any) -> pl.DataFrame:
    import polars as pl

    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _arrow(frame: pl.DataFrame, schema: Any) -> Any:
    """``frame`` as a pyarrow table of ``schema`` (a writer's: polars' string views). Polars
    hands its columns over without a copy; a frame of other types (a column of nulls only,
    say) is cast. (A Categorical column would not cast; neither schema written here has
    one.)"""
    table = frame.to_arrow(compat_level=_polars_views())
    return table if table.schema.equals(schema) else table.cast(schema)


@functools.cache
def _polars_views() -> Any:
    import polars as pl

    with warnings.catch_warnings():
        # Polars calls its newest level unstable: whatever it becomes, the writers' schemas
        # are made of it too, the file stores Parquet's types, and the round-trip tests pin
        # the types a reader sees.
        warnings.simplefilter("ignore")
        return pl.CompatLevel.newest()


def _write_parquet(
    dest: Path, schema: dict[str, Any], parts: list[Path], later: Iterable[pl.DataFrame] = ()
) -> None:
    """Parquet ``parts`` in order, then the frames ``later``, as one owner-only result file,
    a block at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fd = open_private(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as sink, _parquet_writer(sink, schema) as writer:
        target = writer.schema
        for part in parts:
            with pq.ParquetFile(part) as handle:
                for batch in handle.iter_batches(batch_size=_CHUNK_ROWS):
                    writer.write_table(pa.Table.from_batches([batch]).cast(target))
        for frame in later:
            writer.write_table(_arrow(frame, target))


def sidecar_path(output: Path) -> Path:
    """Where the run's own facts (input fingerprint, summary) live beside the output."""
    return output.with_name(output.name + ".run.json")


def write_sidecar(output: Path, facts: dict[str, Any]) -> None:
    """Write the sidecar atomically, owner-only."""
    path = sidecar_path(output)
    temp = path.with_name(f".{path.name}.tmp")
    fd = open_private(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, json.dumps(facts, indent=2, sort_keys=True).encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(temp, path)


class Recorder:
    """The one owner of what a run records: the journal, the ordered result file, the counters
    and the sidecar. The planner reports rows it settles (:meth:`planned`); the sender reports
    through the narrow :class:`~allo_batch.send.Outcomes` interface (:meth:`sending`,
    :meth:`finished`)."""

    def __init__(
        self,
        output: Path,
        input_facts: dict[str, object],
        *,
        journaled: bool,
        mirror: Mirror | None = None,
        checkpoint_every: float = 60.0,
    ) -> None:
        self.output = output
        self.counts: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.deferred = 0
        self._input_facts = input_facts
        self._results = OrderedResults(output)
        self._journal = Journal(journal_path(output)) if journaled else None
        if self._journal is not None:
            self._journal.start(input_facts)
        self._remote = (
            None
            if mirror is None
            else _Checkpoints(output, self._results, mirror, input_facts, checkpoint_every)
        )

    def before_images(self, run: str) -> BeforeImages:
        """The before-images of this run, beside the result file (and mirrored with it)."""
        hook = self._remote.before_written if self._remote is not None else None
        return BeforeImages(self.output, run, on_chunk=hook)

    def problem(self) -> AlloBatchError | None:
        """Why the run must stop for the output's sake (its lock in a store was lost)."""
        return self._remote.mirror.problem() if self._remote is not None else None

    @property
    def rows(self) -> int:
        """Rows accounted for so far."""
        return sum(self.counts.values())

    def planned(self, result: RowResult) -> None:
        """A row settled before sending (invalid, skipped, deferred): nothing to journal, since
        a rerun plans it again the same way."""
        self._count(result)
        self._results.add(result)

    def batch(self, first: int, end: int, settled: pl.DataFrame, pending: int) -> None:
        """An input batch, planned: its settled rows as one frame (counted without a Python
        object per row), and how many of its rows will come one by one."""
        self._results.add_batch(first, end, settled, pending)
        tally = settled.group_by("status", "reason", "error_code").len()
        for status, reason, code, count in tally.iter_rows():
            self.counts[status] += count
            if reason is not None:
                self.reasons[reason] += count
                self.deferred += count if reason in DEFERRED_REASONS else 0
            if code is not None:
                self.codes[code] += count

    def sending(self, request: PlannedRequest, request_id: str) -> None:
        """Journal a request before it goes out."""
        if self._journal is not None:
            self._journal.sent(
                request.row,
                request.call_id,
                request.template_key,
                request.content_sha256,
                request_id,
            )

    def finished(self, result: RowResult) -> None:
        """A sent row's outcome: journaled as it arrives when it says something lasting."""
        self._count(result)
        if self._journal is not None and result.status in ("updated", "failed"):
            self._journal.result(result)
        self._results.add(result)

    @property
    def unsynced(self) -> bool:
        """Whether journal lines were written since the last fsync."""
        return self._journal is not None and self._journal.unsynced

    def sync(self) -> None:
        """Push the journal to disk, and for an output in a store start the uploads that are
        due (the progress tick calls this)."""
        if self._journal is not None:
            self._journal.sync()
        if self._remote is not None:
            self._remote.tick()

    def close(self, summary: RunSummary, **facts: Any) -> None:
        """Write the result file and the sidecar (the input's fingerprint, the summary and any
        other ``facts`` of the run), upload them for an output in a store; the journal is then
        redundant and removed."""
        if self._remote is not None:
            self._remote.wait()  # a checkpoint under way reads the parts that finish() merges
        self._results.finish()
        sidecar = {"input": self._input_facts, "summary": summary.as_dict(), **facts}
        if self._remote is not None:  # uploaded before the result file, which it names
            from allo_batch.storage import file_sha256

            sidecar["result_sha256"] = file_sha256(self.output)
        write_sidecar(self.output, sidecar)
        if self._remote is not None:
            try:
                self._remote.finish()
            except AlloBatchError as error:
                if self._journal is not None:
                    self._journal.close()  # kept: it holds what landed
                raise self._remote.upload_failed(error, summary) from None
        if self._journal is not None:
            self._journal.close()
            journal_path(self.output).unlink(missing_ok=True)

    def abandon(self) -> None:
        """A run that failed to finish: drop the partial result file, keep the journal (and
        for an output in a store, checkpoint what is settled, as far as the store lets)."""
        if self._remote is not None:
            self._remote.last_checkpoint()
        self._results.abandon()
        if self._journal is not None:
            self._journal.close()

    def _count(self, result: RowResult) -> None:
        self.counts[result.status] += 1
        if result.reason is not None:
            self.reasons[result.reason] += 1
        if result.deferred:
            self.deferred += 1
        if result.error_code:
            self.codes[result.error_code] += 1


def before_dir(output: Path) -> Path:
    """Where the before-images of ``output``'s runs live (owner-only: customer content)."""
    return output.with_name(output.name + ".before")


def before_schema() -> dict[str, Any]:
    """The before-images' polars schema: one row per row about to be written."""
    import polars as pl

    return {
        "row": pl.Int64,
        "call_id": pl.String,
        "template_key": pl.String,
        "found": pl.String,  # summary, no_summary or not_found
        "content": pl.String,  # what the target held just before this run changed it
        "content_sha256": pl.String,  # of that content (null without one)
        "written_sha256": pl.String,  # what the row was about to write
        "certain": pl.Boolean,  # the read surely showed this row's target (look.py)
        "run": pl.String,  # the run that read it, ``<UTC time>-<pid>``: they sort in time
        "seq": pl.Int64,  # order within the run
    }


class BeforeImages:
    """Chunks of before-images, each durable on disk before its rows' PATCHes go out.

    A chunk is a Parquet file written whole (temporary name, fsync, rename, fsync of the
    folder), so ``kill -9`` at any moment leaves complete chunks only, and a row is handed to
    the sender only after its chunk is on disk. At the end of a run (and by the next run, after
    a crash) a run's chunks are merged into one file. ``polars.scan_parquet(<dir>/*.parquet)``
    reads them all.
    """

    def __init__(
        self, output: Path, run: str, *, on_chunk: Callable[[Path], None] | None = None
    ) -> None:
        self.folder = before_dir(output)
        self.run = run
        self._on_chunk = on_chunk
        self._seq = 0
        self._chunks: list[Path] = []
        if self.folder.is_symlink():
            msg = f"{self.folder}: is a symbolic link; allo-batch does not write through links"
            raise UsageError(msg)
        self.folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.folder, 0o700)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Make ``rows`` durable (one chunk) before the caller lets them be sent."""
        import polars as pl

        if not rows:
            return
        for row in rows:
            row["run"] = self.run
            row["seq"] = self._seq
            self._seq += 1
        frame = pl.DataFrame(rows, schema=before_schema())
        final = self.folder / f"{self.run}.{len(self._chunks):08d}.chunk.parquet"
        _write_durably(frame, final)
        self._chunks.append(final)
        if self._on_chunk is not None:
            self._on_chunk(final)

    def compact(self) -> None:
        """Merge every run's chunks into one file per run (few files, same content)."""
        import polars as pl

        runs = sorted({p.name.split(".", 1)[0] for p in self.folder.glob("*.chunk.parquet")})
        for run in runs:
            chunks = sorted(self.folder.glob(f"{run}.*.chunk.parquet"))
            merged = self.folder / f"{run}.parquet"
            if merged.exists():  # a merge was cut short after its rename: chunks are copies
                chunks = [c for c in chunks if c != merged]
            else:
                temp = self.folder / f".{run}.merge.tmp"
                pl.scan_parquet(chunks, glob=False).sink_parquet(temp)
                _fsync_path(temp)
                os.chmod(temp, 0o600)
                os.replace(temp, merged)
                _fsync_path(self.folder)
            for chunk in chunks:
                chunk.unlink()
        self._chunks.clear()


def read_before_images(output: Path) -> pl.DataFrame:
    """Every before-image of ``output``'s runs, oldest run first (empty when none)."""
    import polars as pl

    folder = before_dir(output)
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        return pl.DataFrame(schema=before_schema())
    return pl.read_parquet(files, glob=False).sort("run", "seq")


def _write_durably(frame: pl.DataFrame, final: Path) -> None:
    """``frame`` as the Parquet file ``final``, on disk before this returns; or nothing.

    Encoded in memory first (a chunk of before-images: a few hundred rows), so that a full
    disk is the OSError the run stops on (exit 3), not a polars error naming it."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    temp = final.with_name(f".{final.name}.tmp")
    fd = open_private(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_path(final.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- outputs in a store ------------------------------------------------------------------------


class Mirror(Protocol):
    """The store's side of an output (``storage.RemoteOutput``): files of its local state
    folder uploaded whole to the objects that mirror them."""

    def put(self, local: Path, target: Path | None = None) -> None:
        """Upload ``local`` to the object that mirrors ``target`` (default: ``local``)."""

    def delete(self, local: Path) -> None:
        """Remove the object that mirrors ``local``."""

    def names(self, local_folder: Path) -> list[str]:
        """The objects in the folder that mirrors ``local_folder``."""

    def problem(self) -> AlloBatchError | None:
        """Why the run must stop (its lock was lost), or None."""


@dataclass(slots=True)
class _Checkpoints:
    """Uploads for an output in a store, off the event loop: one worker thread at a time,
    started by :meth:`tick` (every half second) when before-images wait or a checkpoint is
    due. A failed upload is retried at the next tick; only the final one stops the run."""

    output: Path
    results: OrderedResults
    mirror: Mirror
    input_facts: dict[str, object]
    every: float
    _pending: list[Path] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _worker: threading.Thread | None = None
    _last: float = field(default_factory=time.monotonic)
    _last_rows: int = 0
    _took: float = 0.0  # how long the last checkpoint took
    _warned: bool = False

    def before_written(self, path: Path) -> None:
        """A before-image chunk is durable here: upload it soon."""
        with self._lock:
            self._pending.append(path)

    def tick(self) -> None:
        """Start the uploads that are due, unless some are still going."""
        if self._worker is not None and self._worker.is_alive():
            return
        snapshot = None
        settled = self.results.written
        since = time.monotonic() - self._last
        # A large result file takes long to write: no more than a tenth of the time on it.
        if since >= 10 * self._took and (
            since >= self.every or settled - self._last_rows >= _CHECKPOINT_ROWS
        ):
            self._last, self._last_rows = time.monotonic(), settled
            try:
                snapshot = self.results.snapshot()
            except Exception as exc:  # a bug: said; the run and its final upload go on
                log.warning("cannot checkpoint (%s: %s)", type(exc).__name__, str(exc)[:200])
        with self._lock:
            waiting = bool(self._pending)
        if snapshot is None and not waiting:
            return
        self._worker = threading.Thread(
            target=self._work, args=(snapshot,), name="allo-batch-checkpoint", daemon=True
        )
        self._worker.start()

    def _work(self, snapshot: Snapshot | None) -> None:
        if self.mirror.problem() is not None:
            return  # another run holds the output now: write nothing more to it
        try:
            self._upload_pending()
            if snapshot is not None:
                self._checkpoint(snapshot)
        except AlloBatchError as error:
            if not self._warned:
                log.warning("could not upload to the store (retrying): %s", error)
                self._warned = True
        except Exception as exc:  # a bug: said, and the final upload still decides
            log.warning("checkpoint failed (%s: %s)", type(exc).__name__, str(exc)[:200])

    def _upload_pending(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                path = self._pending[0]
            if path.exists():
                self.mirror.put(path)
            with self._lock:
                self._pending.remove(path)

    def _checkpoint(self, snapshot: Snapshot) -> None:
        """The result file so far and a sidecar that describes it, in two uploads.

        The sidecar goes first, naming the result file by its hash (as at the end): the store
        never holds a result object newer than its sidecar, whenever the run is killed. Killed
        between the two uploads, the sidecar names a result file that never arrived; the next
        run says so (``storage.RemoteOutput``) and resumes from the earlier one and the reads.
        """
        from allo_batch.storage import file_sha256

        dest = self.output.with_name(f".{self.output.name}.checkpoint")
        sidecar = sidecar_path(dest)
        started = time.monotonic()
        try:
            write_checkpoint(snapshot, self.output, dest)
            facts = {
                "input": self.input_facts,
                "checkpoint": {"rows": snapshot.rows, "at": _utc_now()},
                "result_sha256": file_sha256(dest),
            }
            write_sidecar(dest, facts)
            self.mirror.put(sidecar, sidecar_path(self.output))
            self.mirror.put(dest, self.output)
            self._took = time.monotonic() - started
        finally:
            dest.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)

    def wait(self) -> None:
        """Let the uploads under way end."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    def finish(self) -> None:
        """The final uploads: before-images, the result file, its sidecar; then the chunk
        objects that the merged before-images replace. Nothing once the lock was lost."""
        self.wait()
        problem = self.mirror.problem()
        if problem is not None:
            raise problem
        self._upload_pending()
        folder = before_dir(self.output)
        if folder.is_dir():
            present = set(self.mirror.names(folder))
            for merged in sorted(folder.glob("*.parquet")):
                if not merged.name.endswith(".chunk.parquet") and merged.name not in present:
                    self.mirror.put(merged)
                    present.add(merged.name)
            runs = {name.removesuffix(".parquet") for name in present}
            for name in sorted(present):
                if name.endswith(".chunk.parquet") and name.split(".", 1)[0] in runs:
                    self.mirror.delete(folder / name)
        self.mirror.put(sidecar_path(self.output))  # first, naming the result file: see above
        self.mirror.put(self.output)
        if folder.is_dir():  # customer content: kept in the bucket, not left on this disk
            for merged in folder.glob("*.parquet"):
                if not merged.name.endswith(".chunk.parquet"):
                    merged.unlink()

    def last_checkpoint(self) -> None:
        """At a run that failed to finish: what is settled, if the store takes it."""
        try:
            self.wait()
            if self.mirror.problem() is not None:
                return
            self._upload_pending()
            self._checkpoint(self.results.snapshot())
        except Exception as exc:  # the journal keeps what landed; say why, and go on failing
            log.warning("could not checkpoint to the store: %s", str(exc)[:300])

    def upload_failed(self, error: AlloBatchError, summary: RunSummary) -> AlloBatchError:
        """The stop for a final upload that failed: exit 3, the local copies named."""
        from allo_batch.storage import UploadError

        stop = UploadError(
            f"{error}; the result file is kept in {self.output} and the journal beside it: "
            "a rerun uploads it"
        )
        # The summary printed (and a scheduler's record of it) says so too, not exit 0 with the
        # store's address, where nothing is.
        stop.summary = dataclasses.replace(
            summary,
            exit_code=int(stop.exit_code),
            stopped_reason=stop.message,
            output=str(self.output),
        )
        return stop


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
