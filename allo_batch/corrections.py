"""The run's input read again after the run: checked to be that input, numbered by line, and
its rows that need a human written out whole, as a corrections file to edit and run again.

Every use starts with :func:`open_checked`: the file's fingerprint (the ordered ``call_id`` and
``template_key`` of every row, :class:`~allo_batch.read.Fingerprinter`) must be the one the
run recorded in its sidecar. Rows are matched to results by position, so another file (or this
one with rows added, removed or reordered) would pair results with the wrong rows; content
corrected in place keeps the fingerprint, and exporting it is what a fix needs. Each row taken
is checked once more by its ``call_id`` against the result file.

The project's reader hands on only the three fields it sends, so the export reads every column
itself, numbering rows the way the reader does: CSV through pyarrow's streaming reader with the
reader's options (blank lines skipped, every value text, an empty field null, ``""`` empty),
Parquet and NDJSON through a polars scan (their rows cannot be counted two ways). Only the rows
asked for are kept, a batch at a time.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from allo_batch.config import FORMATS, InputFormat, literal_path
from allo_batch.errors import InputError, UsageError
from allo_batch.read import Fingerprinter, InputSource, key_batches, open_input

if TYPE_CHECKING:
    import polars as pl

_BATCH: Final = 50_000
_CSV_BLOCK: Final = 16 << 20  # a CSV row must fit in one block (valid rows are < 1 MB)
_INDEX: Final = "__allo_batch_row"  # the row number while selecting; no input may use it

#: ``{row: call_id}`` of the rows wanted, from the result file (``None``: no call id).
Wanted = Mapping[int, str | None]


def input_format(path: Path, given: str | None) -> InputFormat:
    """The input's format: ``--format``, else from the extension, as ``run`` decides it."""
    if given:
        return given  # type: ignore[return-value]  # click.Choice gave one of the three
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        msg = f"{path}: cannot tell the format from the extension; use --format csv|parquet|ndjson"
        raise UsageError(msg)
    return found


def open_checked(
    path: Path,
    fmt: InputFormat,
    mapping: dict[str, str],
    recorded: Mapping[str, Any] | None,
    results: Path,
) -> InputSource:
    """Open ``path`` and refuse it (exit 2) unless it is the input ``results`` was made from."""
    if not recorded or not isinstance(recorded.get("keys_sha256"), str):
        msg = (
            f"{results}: its sidecar ({results.name}.run.json) records no input fingerprint, "
            f"so {path} cannot be checked to be the run's input; nothing was written"
        )
        raise UsageError(msg)
    source = open_input(path, fmt, mapping)
    prints = Fingerprinter(path)
    for frame in key_batches(source, _BATCH):
        prints.add(frame)
    found = prints.result()
    if found.keys_sha256 != recorded["keys_sha256"] or found.rows != recorded.get("rows"):
        msg = (
            f"{path} is not the input of {results}: that run read {recorded.get('path', '?')} "
            f"({recorded.get('rows', '?')} rows); this file has {found.rows} rows and other "
            "rows (call_id and template_key, in order), so its rows would be paired with the "
            "wrong results. Give the run's input (same rows, same order; corrected content is "
            "fine), with the same --column options"
        )
        raise InputError(msg)
    return source


# -- line numbers --------------------------------------------------------------------------------


def line_numbers(source: InputSource, wanted: Wanted) -> dict[int, int]:
    """The 1-based line where each wanted row starts in a CSV or NDJSON input, read up to the
    last one (Parquet has no lines). Empty when a row there does not have the call id the
    result file gives it: then the caller says ``record N`` rather than a wrong line."""
    if not wanted or source.format == "parquet" or source.columns.get("call_id") is None:
        return {}
    column = str(source.columns["call_id"])
    found = _csv_lines(source, column, wanted) if source.format == "csv" else None
    if source.format == "ndjson":
        found = _ndjson_lines(source.path, column, wanted)
    return found or {}


def _csv_lines(source: InputSource, column: str, wanted: Wanted) -> dict[int, int] | None:
    """Lines by Python's CSV reader, which counts them (pyarrow's does not); blank lines are
    skipped as the project's reader skips them."""
    last = max(wanted)
    lines: dict[int, int] = {}
    with _csv_field_limit(), source.path.open(encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        start, row, position = 1, -1, None
        try:
            for fields in reader:
                if fields and position is None:
                    position = fields.index(column) if column in fields else -1
                elif fields:
                    row += 1
                    if row in wanted and not _same_id(fields, position, wanted[row]):
                        return None
                    if row in wanted:
                        lines[row] = start
                    if row >= last:
                        break
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError):
            return None
    return lines


def _same_id(fields: list[str], position: int | None, call_id: str | None) -> bool:
    if position is None or not 0 <= position < len(fields):
        return False
    return (fields[position] or None) == (call_id or None)


@contextlib.contextmanager
def _csv_field_limit() -> Iterator[None]:
    """Python's CSV reader refuses fields over 128 KiB; a row too long to send is one a
    person must find, so the limit is raised while counting (and put back)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def _ndjson_lines(path: Path, column: str, wanted: Wanted) -> dict[int, int] | None:
    """Each non-blank line is a row (blank ones are skipped by the readers)."""
    last = max(wanted)
    lines: dict[int, int] = {}
    row = -1
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            row += 1
            if row in wanted:
                try:
                    value = json.loads(raw)
                except ValueError:
                    return None
                if not isinstance(value, dict) or value.get(column) != wanted[row]:
                    return None
                lines[row] = number
            if row >= last:
                break
    return lines


# -- export --------------------------------------------------------------------------------------


def export_rows(source: InputSource, wanted: Wanted, dest: Path, keep_off: list[Path]) -> int:
    """Write the wanted rows of ``source``, every column, to ``dest`` in the format of its
    extension; return how many. ``keep_off``: files that must not be overwritten (the result
    file and its sidecar; the input itself always is)."""
    fmt = _export_format(dest)
    if _INDEX in source.found:
        raise InputError(f"{source.path}: a column is named {_INDEX}; rename it to export")
    protected = {p.resolve() for p in (source.path, *keep_off)}
    if dest.resolve() in protected:
        msg = f"--export-failed {dest}: that is the input or the result file; name a new file"
        raise UsageError(msg)
    frame = _selected(source, wanted)
    _check_ids(source, frame, wanted)
    _write_private(frame.drop(_INDEX), dest, fmt)
    return frame.height


def _export_format(dest: Path) -> InputFormat:
    found = FORMATS.get(dest.suffix.lower())
    if found is None:
        msg = f"--export-failed {dest}: use a .csv, .parquet or .ndjson file name"
        raise UsageError(msg)
    return found


def _selected(source: InputSource, wanted: Wanted) -> pl.DataFrame:
    """The wanted rows with every column and their row number in ``_INDEX``, in row order."""
    import polars as pl

    rows = pl.Series(_INDEX, sorted(wanted), dtype=pl.Int64)
    if source.format == "csv":
        parts = list(_csv_selected(source, rows))
        return pl.concat(parts) if parts else pl.DataFrame(schema={_INDEX: pl.Int64})
    scan = (
        pl.scan_parquet(source.path, glob=False)
        if source.format == "parquet"
        else pl.scan_ndjson(literal_path(source.path), infer_schema_length=None)
    )
    try:
        return (
            scan.with_row_index(_INDEX)
            .with_columns(pl.col(_INDEX).cast(pl.Int64))
            .filter(pl.col(_INDEX).is_in(rows.implode()))
            .collect(engine="streaming")
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(_unreadable(source, exc)) from None


def _csv_selected(source: InputSource, rows: pl.Series) -> Iterator[pl.DataFrame]:
    """The wanted CSV rows, a block at a time, reading no further than the last one."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.csv as pcsv

    last = int(rows.max())  # type: ignore[arg-type]
    offset = 0
    options = pcsv.ConvertOptions(
        column_types=dict.fromkeys(source.found, pa.large_string()),
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    try:
        reader = pcsv.open_csv(
            source.path,
            read_options=pcsv.ReadOptions(block_size=_CSV_BLOCK, use_threads=False),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=options,
        )
        with contextlib.closing(reader):
            for batch in reader:
                frame = pl.DataFrame(pl.from_arrow(batch)).with_row_index(_INDEX, offset=offset)
                offset += frame.height
                yield frame.with_columns(pl.col(_INDEX).cast(pl.Int64)).filter(
                    pl.col(_INDEX).is_in(rows.implode())
                )
                if offset > last:
                    return
    except (pa.ArrowException, OSError) as exc:
        raise InputError(_unreadable(source, exc)) from None


def _unreadable(source: InputSource, exc: BaseException) -> str:
    # Library errors may quote the file's bytes: say only what kind of error it was.
    return f"{source.path}: cannot read it again as {source.format} ({type(exc).__name__})"


def _check_ids(source: InputSource, frame: pl.DataFrame, wanted: Wanted) -> None:
    """Every row taken has the call id the result file gives it, and none is missing."""
    import polars as pl

    column = source.columns.get("call_id")
    got = dict(
        zip(
            frame[_INDEX].to_list(),
            frame[column].cast(pl.String).to_list() if column else [None] * frame.height,
            strict=True,
        )
    )
    for row, call_id in wanted.items():
        if row not in got or (got[row] or None) != (call_id or None):
            msg = (
                f"{source.path}: row {row} is not the row the result file describes (call id "
                "differs or the row is missing); nothing was written"
            )
            raise InputError(msg)


def _write_private(frame: pl.DataFrame, dest: Path, fmt: InputFormat) -> None:
    """Write owner-only (the rows hold customer text), whole or not at all."""
    import polars as pl

    temp = dest.with_name(f".{dest.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        msg = f"--export-failed {dest}: cannot write it ({exc.strerror})"
        raise UsageError(msg) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            if fmt == "csv":
                frame.write_csv(handle)
            elif fmt == "parquet":
                frame.write_parquet(handle)
            else:
                frame.write_ndjson(handle)
        os.replace(temp, dest)
    except (pl.exceptions.PolarsError, OSError) as exc:
        temp.unlink(missing_ok=True)
        msg = f"--export-failed {dest}: cannot write these columns as {fmt} ({type(exc).__name__})"
        raise UsageError(msg) from None
