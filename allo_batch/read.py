"""Reading corrections: streaming polars batches of ``row, call_id, template_key, content``.

Nothing here judges a row; it only finds the columns, casts them to strings and numbers the rows
(0-based, in file order). Memory stays bounded: CSV and Parquet stream through pyarrow's readers
a few blocks or a row group slice at a time, NDJSON through polars' ``collect_batches``
(performance.md rules 8, L14–L16).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allo_batch.config import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, InputFormat
from allo_batch.errors import InputError
from allo_batch.models import FIELDS, KEY_FIELDS, ROW

if TYPE_CHECKING:
    import polars as pl

# pyarrow's CSV reader parses blocks of this many bytes (in parallel) and holds a few.
_CSV_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class InputSource:
    """An opened, checked input: the file, its format and which file column feeds each field."""

    path: Path
    format: InputFormat
    columns: dict[str, str | None]
    found: tuple[str, ...]

    def shape(
        self, frame: pl.DataFrame, offset: int = 0, fields: tuple[str, ...] = FIELDS
    ) -> pl.DataFrame:
        """Number the rows from ``offset`` and map the file's columns to ``fields`` (eagerly: a
        lazy plan per batch costs more than the work)."""
        import polars as pl

        def col(name: str) -> pl.Expr:
            source = self.columns[name]
            if source is None:
                return pl.lit(None, dtype=pl.String).alias(name)
            return pl.col(source).cast(pl.String).alias(name)

        return frame.with_row_index(ROW, offset=offset).select(
            pl.col(ROW).cast(pl.Int64), *(col(name) for name in fields)
        )

    def file_columns(self, fields: tuple[str, ...] = FIELDS) -> list[str]:
        """The file's columns that feed ``fields``, in file order."""
        wanted = {self.columns[name] for name in fields} - {None}
        return [name for name in self.found if name in wanted]


def open_input(path: Path, fmt: InputFormat, mapping: dict[str, str] | None = None) -> InputSource:
    """Check that ``path`` can be read and has the required columns; raise InputError if not."""
    import polars as pl

    if not path.exists():
        msg = f"{path}: no such file"
        raise InputError(msg)
    if not path.is_file():
        msg = f"{path}: not a file"
        raise InputError(msg)
    mapping = mapping or {}
    try:
        found = tuple(_scan(path, fmt).collect_schema().names())
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        if _is_empty(path):
            found = ()
        else:
            msg = f"{path}: cannot read it as {fmt}: {_first_line(exc)}"
            raise InputError(msg) from exc
    if not found and _is_empty(path):
        return InputSource(path, fmt, {n: None for n in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)}, ())
    columns: dict[str, str | None] = {}
    missing = []
    for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        source = mapping.get(name, name)
        if source in found:
            columns[name] = source
        elif name in REQUIRED_COLUMNS:
            missing.append(source if source == name else f"{source} (for {name})")
        else:
            columns[name] = None
    if missing:
        msg = (
            f"{path}: missing required column {', '.join(missing)}; "
            f"columns found: {', '.join(found) or '(none)'}"
        )
        raise InputError(msg)
    return InputSource(path, fmt, columns, found)


def iter_batches(
    source: InputSource, batch_size: int, limit: int | None = None
) -> Iterator[pl.DataFrame]:
    """Yield the input in order, ``batch_size`` rows at a time, never all of it at once."""
    if not source.found:
        return
    left = limit
    for batch in shaped_batches(source, batch_size):
        if left is not None:
            if left <= 0:
                return
            batch = batch.head(left)
            left -= batch.height
        yield batch


def shaped_batches(
    source: InputSource, batch_size: int, fields: tuple[str, ...] = FIELDS
) -> Iterator[pl.DataFrame]:
    """``row`` and ``fields``, ``batch_size`` rows at a time, in file order."""
    import polars as pl

    offset = 0
    try:
        for frame in _file_batches(source, batch_size, source.file_columns(fields)):
            yield source.shape(frame, offset, fields)
            offset += frame.height
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        msg = f"{source.path}: cannot read it as {source.format}: {_first_line(exc)}"
        raise InputError(msg) from exc


def _file_batches(
    source: InputSource, batch_size: int, columns: list[str]
) -> Iterator[pl.DataFrame]:
    """The file's ``columns`` as read, about ``batch_size`` rows at a time.

    CSV and Parquet go through pyarrow's streaming readers, which hold a few blocks of the file:
    polars' streaming CSV reader held 330-420 MB whatever the batch size, and its batched
    Parquet reads hold whole row groups, several at once (performance.md L16: 1.8 GB for 1M rows
    of 2 KB in 125k-row groups). NDJSON streams through polars.
    """
    if source.format == "parquet":
        yield from _parquet_batches(source, batch_size, columns)
    elif source.format == "csv":
        yield from _csv_batches(source, batch_size, columns)
    else:
        frame = _scan(source.path, source.format).select(columns)
        yield from frame.collect_batches(chunk_size=batch_size, maintain_order=True)


def _parquet_batches(
    source: InputSource, batch_size: int, columns: list[str]
) -> Iterator[pl.DataFrame]:
    import polars as pl
    import pyarrow.parquet as pq

    with pq.ParquetFile(source.path) as handle:
        for record_batch in handle.iter_batches(batch_size=batch_size, columns=columns):
            frame = pl.from_arrow(record_batch)
            assert isinstance(frame, pl.DataFrame)
            yield frame


def _csv_batches(
    source: InputSource, batch_size: int, columns: list[str]
) -> Iterator[pl.DataFrame]:
    """CSV as strings, like ``scan_csv(infer_schema=False)``: an empty field is null, a quoted
    empty field is ``""``; quoted fields may hold newlines; a UTF-8 BOM is skipped."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.csv as pcsv

    pending: list[Any] = []
    held = read = 0
    reader = None
    try:
        # Opening parses the first block already, so it belongs inside the try.
        reader = pcsv.open_csv(
            source.path,
            read_options=pcsv.ReadOptions(block_size=_CSV_BLOCK),
            # No invalid_row_handler: with one, pyarrow 26 sometimes aborts the process at exit.
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                include_columns=columns,
                column_types=dict.fromkeys(columns, pa.large_string()),
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
        for record_batch in reader:
            pending.append(record_batch)
            held += record_batch.num_rows
            while held >= batch_size:
                table = pa.Table.from_batches(pending)
                yield _polars(table.slice(0, batch_size))
                rest = table.slice(batch_size)
                pending, held, read = rest.to_batches(), rest.num_rows, read + batch_size
    except pa.ArrowInvalid as exc:
        msg = f"{_arrow_csv_reason(str(exc), columns)} (at or after row {read + held})"
        raise pl.exceptions.ComputeError(msg) from None
    finally:
        # Its reading threads must stop before the interpreter exits (else: abort, exit 134).
        if reader is not None:
            reader.close()
    if held:
        yield _polars(pa.Table.from_batches(pending))


def _arrow_csv_reason(message: str, columns: list[str]) -> str:
    """pyarrow's CSV error without the offending line (its parse errors end with
    ``: <the line>``), and with the column named instead of numbered."""
    first = message.splitlines()[0]
    if first.startswith("CSV parse error: "):
        first = "CSV parse error: " + first.removeprefix("CSV parse error: ").split(": ", 1)[0]
    number = re.match(r"In CSV column #(\d+): ", first)
    if number and int(number.group(1)) < len(columns):
        first = f"column {columns[int(number.group(1))]}: {first[number.end() :]}"
    return first


def _polars(table: Any) -> pl.DataFrame:
    import polars as pl

    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


@dataclass(frozen=True, slots=True)
class InputFingerprint:
    """What identifies an input to the result file built from it.

    ``keys_sha256`` hashes the ordered ``(call_id, template_key)`` of every row, so an input whose
    contents were corrected in place keeps its fingerprint, while another file (or rows added,
    removed, re-keyed or reordered) gets a new one, whatever its name or format.
    """

    path: str
    rows: int
    keys_sha256: str

    def as_dict(self) -> dict[str, object]:
        """The JSON form kept in the sidecar and the journal."""
        return {"path": self.path, "rows": self.rows, "keys_sha256": self.keys_sha256}


class Fingerprinter:
    """Counts rows and hashes their keys, fed one key-only batch at a time (:func:`key_batches`).

    Rows end with ``\x1e`` in the digest, so it does not depend on where batches split.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._digest = hashlib.sha256()
        self.rows = 0

    def add(self, frame: pl.DataFrame) -> None:
        """Take in one batch of ``call_id, template_key`` rows."""
        import polars as pl

        if not frame.height:
            return
        key = pl.concat_str(
            pl.col("call_id").fill_null("\x00"),
            pl.col("template_key").fill_null("\x00"),
            separator="\x1f",
        )
        joined = frame.select(key.str.join("\x1e")).item()
        self._digest.update(joined.encode())
        self._digest.update(b"\x1e")
        self.rows += frame.height

    def result(self) -> InputFingerprint:
        """The fingerprint of every row added so far."""
        return InputFingerprint(str(self._path.resolve()), self.rows, self._digest.hexdigest())


def key_batches(source: InputSource, batch_size: int) -> Iterator[pl.DataFrame]:
    """``row, call_id, template_key`` only: the cheap pass that fingerprints and finds repeats."""
    if source.found:
        yield from shaped_batches(source, batch_size, KEY_FIELDS)


def _scan(path: Path, fmt: InputFormat) -> pl.LazyFrame:
    import polars as pl

    if fmt == "parquet":
        return pl.scan_parquet(path)
    if fmt == "ndjson":
        return pl.scan_ndjson(path, infer_schema_length=None)
    # Every column as a string: ids like "00123" and free text must not be re-typed.
    return pl.scan_csv(
        path,
        infer_schema=False,
        encoding="utf8",
        raise_if_empty=False,
    )


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0 or not path.read_bytes()[:4096].strip(b"\xef\xbb\xbf \r\n")
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
