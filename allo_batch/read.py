"""Reading corrections: streaming polars batches of ``row, call_id, template_key, content``.

Nothing here judges a row; it only finds the columns, checks that they hold text, casts them to
strings and numbers the rows (0-based, in file order). Memory stays bounded: CSV and NDJSON
stream through pyarrow's readers and Parquet through its row-group batches, a few blocks at a
time (performance.md rules 8, L14–L16).

The file is untrusted. Every problem becomes one :class:`~allo_batch.errors.InputError` line
that names the file and, where there is one, the line (1-based, the header is line 1) and the
column. A message never quotes more than a short escaped prefix of what the file holds: an API
key file passed by mistake, or customer text, must not end up in a terminal or a log.

An input in a store (``s3://...``, ``https://...``) is first copied to a local spool file
(``storage.download_input``) and read from there by the same readers; its messages name the
object, never the copy.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from allo_batch.config import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, InputFormat, literal_path
from allo_batch.errors import InputError
from allo_batch.models import FIELDS, KEY_FIELDS, ROW, stripped_or_null

if TYPE_CHECKING:
    import polars as pl

    from allo_batch.storage import ObjectUri, StorageOptions

T = TypeVar("T")

# pyarrow's readers parse blocks of this many bytes (in parallel) and hold a few. A row larger
# than a block is read again with blocks twice as large, up to the largest.
_BLOCK: Final = 1 << 20
_MAX_BLOCK: Final = 64 << 20

# How much of a name or value from the file a message may quote, and how many names it lists.
_SHOWN_CHARS: Final = 40
_SHOWN_NAMES: Final = 10
_PARQUET_REASON_CHARS: Final = 160

# Appended to every CSV as one last row. pyarrow reads a quote left open on the last row as a
# field that runs to the end of the file; the mark then ends up inside that field instead of
# being a row of its own, which is how such a file is told apart (and refused).
_END_MARK: Final = "allo-batch-end-of-input-5f0c3a9e"
_BLANK: Final = b" \t\r\n\x0b\x0c"
_BOM: Final = codecs.BOM_UTF8
_NOT_UTF8: Final = re.compile("[\udc80-\udcff]")  # bytes kept by the surrogateescape handler


@dataclass(frozen=True, slots=True)
class InputSource:
    """An opened, checked input: the file, its format and which file column feeds each field."""

    path: Path
    format: InputFormat
    columns: dict[str, str | None]
    found: tuple[str, ...]
    origin: ObjectUri | None = None  # the object ``path`` is a local copy of

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


def open_input(
    path: Path | ObjectUri,
    fmt: InputFormat,
    mapping: dict[str, str] | None = None,
    *,
    storage: StorageOptions | None = None,
    spool: Path | None = None,
) -> InputSource:
    """Check that ``path`` can be read and has the required text columns; raise InputError if
    not. An empty file (nothing but white space or a byte order mark) is an input of no rows.
    An object in a store is copied into the folder ``spool`` first."""
    if isinstance(path, Path):
        return _open_local(path, fmt, mapping)
    from allo_batch.storage import StorageOptions, download_input

    if spool is None:
        msg = f"internal error: {path} is read from a local copy, and no folder was given for it"
        raise RuntimeError(msg)
    local = download_input(path, storage or StorageOptions(), spool)
    with _named_after(path, local):
        return dataclasses.replace(_open_local(local, fmt, mapping), origin=path)


@contextmanager
def _named_after(origin: ObjectUri, local: Path) -> Iterator[None]:
    """Messages about the local copy name the object instead."""
    try:
        yield
    except InputError as error:
        error.restate(error.message.replace(str(local), str(origin)))
        raise


def _open_local(path: Path, fmt: InputFormat, mapping: dict[str, str] | None) -> InputSource:
    if not path.exists():
        msg = f"{path}: no such file"
        raise InputError(msg)
    if not path.is_file():
        msg = f"{path}: not a file"
        raise InputError(msg)
    if _is_blank(path):
        return InputSource(path, fmt, dict.fromkeys((*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)), ())
    found, kinds = _columns_of(path, fmt)
    _refuse_duplicates(path, found)
    columns = _map_columns(path, found, mapping or {})
    for source in columns.values():
        if source is not None and kinds.get(source):
            raise InputError(_not_text(path, fmt, source, kinds[source], columns))
    return InputSource(path, fmt, columns, found)


def _not_text(
    path: Path, fmt: InputFormat, name: str, kind: str, columns: dict[str, str | None]
) -> str:
    """Why a column that must be text is refused. A Parquet column has one type for every
    row; an NDJSON one has a type per line, so the first line that is not text is named."""
    if fmt == "ndjson":
        problem = _ndjson_problem(path, [c for c in columns.values() if c is not None])
        if problem:
            return f"{path}: cannot read it as ndjson: {problem}"
    return f"{path}: column {_shown(name)} holds {kind}, not text"


def _map_columns(
    path: Path, found: tuple[str, ...], mapping: dict[str, str]
) -> dict[str, str | None]:
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
            f"columns found: {_shown_names(found)}"
        )
        raise InputError(msg)
    _refuse_shared_columns(path, columns)
    return columns


def _refuse_shared_columns(path: Path, columns: dict[str, str | None]) -> None:
    """Two fields read from one column (``--column content=call_id``): each call's id would be
    sent as its summary."""
    read_by: dict[str, str] = {}
    for name, source in columns.items():
        if source is None:
            continue
        if source in read_by:
            msg = (
                f"{path}: column {_shown(source)} would be read as both {read_by[source]} and "
                f"{name}; map each field to a column of its own (--column)"
            )
            raise InputError(msg)
        read_by[source] = name


def _refuse_duplicates(path: Path, found: tuple[str, ...]) -> None:
    """Two columns of one name: which one would be sent is a guess, so neither is."""
    seen: set[str] = set()
    for name in found:
        if name in seen:
            msg = f"{path}: column {_shown(name)} appears more than once; rename or drop one"
            raise InputError(msg)
        seen.add(name)


def _columns_of(path: Path, fmt: InputFormat) -> tuple[tuple[str, ...], dict[str, str]]:
    """The file's column names in order, and for each column that is not text, what it holds."""
    if fmt == "csv":
        return _csv_header(path), {}
    if fmt == "parquet":
        return _parquet_columns(path)
    return _ndjson_columns(path)


def iter_batches(
    source: InputSource, batch_size: int, limit: int | None = None
) -> Iterator[pl.DataFrame]:
    """Yield the input in order, ``batch_size`` rows at a time, never all of it at once."""
    left = limit
    for batch in shaped_batches(source, batch_size):
        if left is not None:
            if left <= 0:
                return
            batch = batch.head(left)
            left -= batch.height
        yield batch


_END: Final = object()


def read_ahead(batches: Iterator[T]) -> Iterator[T]:
    """``batches``, each made in a thread of its own while the caller works on the one before
    (pyarrow's readers let go of the GIL while they parse, as polars does while it checks,
    hashes and plans): one batch ahead, no more. An error comes out where it did."""
    with ThreadPoolExecutor(1, thread_name_prefix="allo-batch-ahead") as reader:
        ahead = reader.submit(next, batches, _END)
        while (batch := ahead.result()) is not _END:
            ahead = reader.submit(next, batches, _END)
            yield cast(T, batch)


def shaped_batches(
    source: InputSource, batch_size: int, fields: tuple[str, ...] = FIELDS
) -> Iterator[pl.DataFrame]:
    """``row`` and ``fields``, ``batch_size`` rows at a time, in file order."""
    if source.origin is None:
        yield from _shaped_batches(source, batch_size, fields)
        return
    with _named_after(source.origin, source.path):
        yield from _shaped_batches(source, batch_size, fields)


def _shaped_batches(
    source: InputSource, batch_size: int, fields: tuple[str, ...]
) -> Iterator[pl.DataFrame]:
    import polars as pl
    import pyarrow as pa

    if not source.found:
        return
    offset = 0
    try:
        for frame in _file_batches(source, batch_size, source.file_columns(fields)):
            yield source.shape(frame, offset, fields)
            offset += frame.height
    except (
        pa.ArrowException,
        pl.exceptions.PolarsError,
        pl.exceptions.PanicException,
        OSError,
        ValueError,
    ) as exc:
        # Whatever the format readers did not already put in words of their own.
        msg = f"{source.path}: cannot read it as {source.format}: {_reason(exc, source.format)}"
        raise InputError(msg) from None


def _file_batches(
    source: InputSource, batch_size: int, columns: list[str]
) -> Iterator[pl.DataFrame]:
    """The file's ``columns`` as read, about ``batch_size`` rows at a time.

    All three go through pyarrow's streaming readers, which hold a few blocks of the file:
    polars' streaming CSV reader held 330-420 MB whatever the batch size, and its batched
    Parquet reads hold whole row groups, several at once (performance.md L16: 1.8 GB for 1M rows
    of 2 KB in 125k-row groups). pyarrow's JSON reader is also strict where polars is not: it
    refuses a number or an object among strings instead of turning it into text.
    """
    if source.format == "parquet":
        yield from _parquet_batches(source, batch_size, columns)
    elif source.format == "csv":
        yield from _csv_batches(source, batch_size, columns)
    else:
        yield from _ndjson_batches(source, batch_size, columns)


def _rebatch(record_batches: Iterator[Any], batch_size: int) -> Iterator[pl.DataFrame]:
    """Cut pyarrow's batches (one per block) into frames of exactly ``batch_size`` rows."""
    import pyarrow as pa

    pending: list[Any] = []
    held = 0
    for record_batch in record_batches:
        pending.append(record_batch)
        held += record_batch.num_rows
        while held >= batch_size:
            table = pa.Table.from_batches(pending)
            yield _polars(table.slice(0, batch_size))
            rest = table.slice(batch_size)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield _polars(pa.Table.from_batches(pending))


class _Progress:
    """How many rows a reader has handed on, so that an error can say where it happened."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows = 0


def _growing_blocks(
    open_reader: Callable[[int], AbstractContextManager[Any]], progress: _Progress
) -> Iterator[Any]:
    """Record batches from ``open_reader(block_size)``; when a row does not fit in a block,
    the file is opened again with blocks twice as large, and the rows already handed on are
    skipped (rare: a field of megabytes). pyarrow would otherwise refuse the whole file."""
    import pyarrow as pa

    block = _BLOCK
    while True:
        seen = 0
        try:
            with open_reader(block) as reader:
                for record_batch in reader:
                    start = progress.rows - seen
                    seen += record_batch.num_rows
                    if seen > progress.rows:
                        progress.rows = seen
                        yield record_batch.slice(max(start, 0))
            return
        except pa.ArrowInvalid as exc:
            if not _row_exceeds_block(exc) or block >= _MAX_BLOCK:
                raise
            block *= 2


def _row_exceeds_block(exc: BaseException) -> bool:
    text = str(exc)
    # The second is what pyarrow says when not even the header fits in the first block.
    return "straddling object" in text or "Empty CSV file or block" in text


# -- CSV ---------------------------------------------------------------------------------------


def _csv_header(path: Path) -> tuple[str, ...]:
    """The header's names, parsed alone: a bad data row is the data pass's to report, with its
    line. Python's reader splits fields as pyarrow's does (quotes, ``""``, newlines in
    quotes); its field limit (128 KiB) bounds what an unclosed quote can pull in. Bytes that
    are not UTF-8 are kept as escapes while reading (it decodes ahead, past the header) and
    refused only when they are in the header."""
    names: tuple[str, ...] = ()
    try:
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as text:
            names = next((tuple(row) for row in csv.reader(text) if row), ())
    except csv.Error:
        msg = (
            f"{path}: cannot read it as csv: line 1: the header has a quote that is never "
            "closed, or a column name over 128 KiB"
        )
        raise InputError(msg) from None
    if any(_NOT_UTF8.search(name) for name in names):
        msg = f"{path}: cannot read it as csv: {_utf8_problem(path) or 'not UTF-8 text'}"
        raise InputError(msg)
    return names


def _csv_batches(
    source: InputSource, batch_size: int, columns: list[str]
) -> Iterator[pl.DataFrame]:
    """CSV as strings, like ``scan_csv(infer_schema=False)``: an empty field is null, a quoted
    empty field is ``""``; quoted fields may hold newlines; a UTF-8 BOM is skipped."""
    import pyarrow as pa

    progress = _Progress()
    suffix = _end_row(len(source.found))
    record_batches = _growing_blocks(
        lambda block: _csv_reader(source.path, columns, suffix, block), progress
    )
    try:
        yield from _rebatch(_without_end_row(record_batches, columns), batch_size)
    except _UnclosedQuoteError as exc:
        raise InputError(_unclosed_quote_message(source, exc.last_row, progress)) from None
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        # pyarrow's parse errors quote the offending line: translated, and not chained.
        raise InputError(_csv_error_message(source, exc, progress)) from None


@contextmanager
def _csv_reader(path: Path, columns: list[str], suffix: bytes, block: int) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    stream = _Suffixed(path, suffix)
    reader = None
    try:
        # Opening parses the first block already, so it belongs inside the try.
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(block_size=block),
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
        yield reader
    finally:
        # Its reading threads must stop before the interpreter exits (else: abort, exit 134).
        if reader is not None:
            reader.close()
        stream.close()


class _ReadByPyarrow(io.RawIOBase):
    """A file that pyarrow reads from its own threads, closed only between two reads.

    pyarrow's readahead can still be reading the previous stream when ``_growing_blocks``
    opens the file again with larger blocks. Closed under that read, its descriptor would be
    reused by the new open, and the old read would take the new file's first block (seen in
    CI: a line of 3 MB "does not start with '{'"). The lock makes ``close`` wait for it.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = path.open("rb", buffering=0)
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # pyarrow calls read(); RawIOBase's own would allocate, readinto and copy once more.
        with self._lock:  # after close, the file's own read raises ValueError
            return self._read(size)

    def _read(self, size: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            self._file.close()
        super().close()


class _Suffixed(_ReadByPyarrow):
    """A file read as if ``suffix`` followed its last byte.

    Reads are filled to the size asked: pyarrow parses whatever its first read returns as a
    block, so a header with the mark row after it must come in one read, not two.
    """

    def __init__(self, path: Path, suffix: bytes) -> None:
        super().__init__(path)
        self._suffix = suffix

    def _read(self, size: int) -> bytes:
        if size < 0:
            data, self._suffix = self._file.readall() + self._suffix, b""
            return data
        data = self._file.read(size)
        if len(data) < size:
            # A regular file returns less than asked only at its end: the suffix follows.
            take = size - len(data)
            data, self._suffix = data + self._suffix[:take], self._suffix[take:]
        return data


def _end_row(width: int) -> bytes:
    """The mark row for a file of ``width`` columns, after a line end of its own (an empty
    line, when the file already ends with one, is skipped)."""
    return ("\n" + ",".join([_END_MARK] * width) + "\n").encode()


class _UnclosedQuoteError(Exception):
    def __init__(self, last_row: dict[str, Any]) -> None:
        super().__init__("a quoted field is never closed")
        self.last_row = last_row


def _without_end_row(record_batches: Iterator[Any], columns: list[str]) -> Iterator[Any]:
    """The batches without the end mark row; the last batch is held back until the mark is
    seen, so that the row of a file cut inside a quote is never handed on."""
    last = None
    for record_batch in record_batches:
        if record_batch.num_rows:
            if last is not None:
                yield last
            last = record_batch
    row = last.slice(last.num_rows - 1).to_pylist()[0] if last is not None else {}
    if not row or any(row[name] != _END_MARK for name in columns):
        raise _UnclosedQuoteError(row)
    if last is not None and last.num_rows > 1:
        yield last.slice(0, last.num_rows - 1)


def _unclosed_quote_message(
    source: InputSource, last_row: dict[str, Any], progress: _Progress
) -> str:
    """Where the open quote is: the rest of the file, mark included, is the last row's last
    field. The newlines in it, taken from the file's, give the quote's line."""
    where = f"at or after line {progress.rows + 1}"
    suffix = _end_row(len(source.found)).decode()
    tail = last_row.get(source.found[-1])
    if tail is None:
        tail = _last_value(source, suffix)
    if tail is not None and tail.endswith(suffix):
        opened = _count_newlines(source.path) - tail[: -len(suffix)].count("\n") + 1
        where = f"line {opened}"
    return (
        f"{source.path}: cannot read it as csv: {where}: a quoted field opens and is never "
        "closed (the rest of the file would be read as its text)"
    )


def _last_value(source: InputSource, suffix: str) -> str | None:
    """The last field of the last row, read again on its own: the pass that found the open
    quote did not read that column."""
    import pyarrow as pa

    last = source.found[-1]
    value = None
    try:
        for record_batch in _growing_blocks(
            lambda block: _csv_reader(source.path, [last], suffix.encode(), block), _Progress()
        ):
            value = record_batch.column(0)[-1].as_py()
    except (pa.ArrowException, UnicodeDecodeError, OSError):
        return None
    return value if isinstance(value, str) else None


def _csv_error_message(source: InputSource, exc: BaseException, progress: _Progress) -> str:
    path, reason = source.path, str(exc)
    where = f"at or after line {progress.rows + 2}"
    if isinstance(exc, UnicodeDecodeError) or "invalid UTF8" in reason:
        return f"{path}: cannot read it as csv: {_utf8_problem(path) or where + ': not UTF-8'}"
    if _row_exceeds_block(exc):
        return f"{path}: cannot read it as csv: {where}: a row is over {_MAX_BLOCK >> 20} MB"
    counted = re.match(r"CSV parse error: Expected (\d+) columns, got (\d+)", reason)
    if counted:
        line = _csv_line_with_fields_not(path, int(counted.group(1)))
        return (
            f"{path}: cannot read it as csv: {f'line {line}' if line else where}: "
            f"{counted.group(1)} fields expected, {counted.group(2)} found"
        )
    return f"{path}: cannot read it as csv: {where}: {_arrow_csv_reason(reason)}"


def _csv_line_with_fields_not(path: Path, width: int) -> int | None:
    """The line where the first row of another width than the header starts (error path
    only: Python's reader is slower than pyarrow's, but it counts lines)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(_MAX_BLOCK)
    try:
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as text:
            reader = csv.reader(text)
            start = 1
            for fields in reader:
                if fields and len(fields) != width:
                    return start
                start = reader.line_num + 1
    except (csv.Error, UnicodeDecodeError, OSError):
        return None
    finally:
        csv.field_size_limit(limit)
    return None


def _arrow_csv_reason(message: str) -> str:
    """pyarrow's CSV error without the offending line (its parse errors end with
    ``: <the line>``), cut short like any library's."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    prefix = "CSV parse error: "
    if first.startswith(prefix):
        first = prefix + first.removeprefix(prefix).split(": ", 1)[0]
    return _escaped(first[: len(prefix) + _SHOWN_CHARS])


def _count_newlines(path: Path) -> int:
    count = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_BLOCK):
            count += chunk.count(b"\n")
    return count


# -- NDJSON ------------------------------------------------------------------------------------


def _ndjson_columns(path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """Every key of every line (polars infers over the whole file), and what each holds."""
    import polars as pl

    with path.open("rb") as handle:
        starts_with_bom = handle.read(len(_BOM)) == _BOM
    if starts_with_bom:
        # polars cannot read past it; pyarrow could, but the columns are found with polars.
        msg = f"{path}: cannot read it as ndjson: line 1 starts with a byte order mark; remove it"
        raise InputError(msg)
    try:
        schema = pl.scan_ndjson(literal_path(path), infer_schema_length=None).collect_schema()
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError) as exc:
        problem = _ndjson_problem(path, ())
        msg = f"{path}: cannot read it as ndjson: {problem or _reason(exc)}"
        raise InputError(msg) from None
    kinds = {name: kind for name, dtype in schema.items() if (kind := _polars_kind(dtype))}
    return tuple(schema.names()), kinds


def _ndjson_batches(
    source: InputSource, batch_size: int, columns: list[str]
) -> Iterator[pl.DataFrame]:
    import pyarrow as pa

    progress = _Progress()
    record_batches = _growing_blocks(
        lambda block: _json_reader(source.path, columns, block), progress
    )
    try:
        yield from _rebatch(record_batches, batch_size)
    except (pa.ArrowException, UnicodeDecodeError, _NotAnObjectError) as exc:
        if _row_exceeds_block(exc):
            problem = f"at or after line {progress.rows + 1}: a line is over {_MAX_BLOCK >> 20} MB"
        else:
            known = str(exc) if isinstance(exc, _NotAnObjectError) else _reason(exc)
            problem = _ndjson_problem(source.path, columns) or known
        raise InputError(f"{source.path}: cannot read it as ndjson: {problem}") from None


@contextmanager
def _json_reader(path: Path, columns: list[str], block: int) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.json as pjson

    stream = _ObjectLines(path)
    reader = None
    try:
        reader = pjson.open_json(
            stream,
            read_options=pjson.ReadOptions(block_size=block),
            parse_options=pjson.ParseOptions(
                explicit_schema=pa.schema([(name, pa.large_string()) for name in columns]),
                unexpected_field_behavior="ignore",
            ),
        )
        yield reader
    finally:
        if reader is not None:
            reader.close()
        stream.close()


class _NotAnObjectError(ValueError):
    """A line of an NDJSON file does not start with ``{``."""


class _ObjectLines(_ReadByPyarrow):
    """An NDJSON file, refused as it is read at the first line that does not start with ``{``.

    pyarrow 26's JSON reader crashes the process (SIGSEGV) when a block starts with a line
    like ``null``, ``nullx`` or ``null {}``; no such line is ever an object, so none is handed
    to it (the whole read is refused). One regex search per block (about 1.7 GB/s), run in
    pyarrow's reading thread.
    """

    # pyarrow starts a line after "\r" as well as after "\n". Two searches that each start
    # with a literal are 7 times faster than one that starts with [\r\n].
    _BAD_STARTS: Final = (
        re.compile(rb"\n[ \t]*[^{ \t\r\n]"),
        re.compile(rb"\r[ \t]*[^{ \t\r\n]"),
    )
    _BAD_FIRST: Final = re.compile(rb"[ \t]*[^{ \t\r\n]")
    _BLANKS: Final = re.compile(rb"[ \t]*")

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        # Whether what was read so far ends at the start of a line (or in its first blanks).
        self._line_start = True

    def _read(self, size: int) -> bytes:
        data = self._file.read(size) if size >= 0 else self._file.readall()
        bad_first = self._line_start and self._BAD_FIRST.match(data)
        if bad_first or any(pattern.search(data) for pattern in self._BAD_STARTS):
            msg = "a line does not start with '{': it is not a JSON object"
            raise _NotAnObjectError(msg)
        if data:
            last = max(data.rfind(b"\n"), data.rfind(b"\r"))
            blank_tail = self._BLANKS.fullmatch(data, last + 1) is not None
            self._line_start = (last >= 0 or self._line_start) and blank_tail
        return data


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKeyError(key)
        found[key] = value
    return found


def _ndjson_problem(path: Path, columns: tuple[str, ...] | list[str]) -> str | None:
    """The first line that is not a JSON object of text ``columns``, in words that quote none
    of it (error path only: it parses line by line in Python)."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(_MAX_BLOCK + 1), b""), 1):
            if len(raw) > _MAX_BLOCK:
                return f"line {number} is over {_MAX_BLOCK >> 20} MB"
            problem = _json_line_problem(raw, offset, columns)
            if problem:
                return f"line {number}{problem}"
            offset += len(raw)
    return None


def _json_line_problem(raw: bytes, offset: int, columns: tuple[str, ...] | list[str]) -> str:
    """What is wrong with one NDJSON line, as ``": ..."`` (or `` (byte offset N): ...``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f" (byte offset {offset + exc.start}): not UTF-8 text"
    if not text.strip():
        return ""
    try:
        # Without its line break: an object cut short at the end of the line was reported at
        # "column 1" of the line after.
        value = json.loads(text.rstrip("\r\n"), object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as exc:
        return f": key {_shown(exc.key)} appears twice"
    except (ValueError, RecursionError) as exc:
        detail = (
            f" ({exc.msg}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        )
        return f": not valid JSON{detail}"
    if not isinstance(value, dict):
        return f": not a JSON object but {_json_kind(value)}"
    for name in columns:
        if value.get(name) is not None and not isinstance(value[name], str):
            return f": column {_shown(name)} holds {_json_kind(value[name])}, not text"
    return ""


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "null"


def _polars_kind(dtype: Any) -> str | None:
    """What a column of ``dtype`` holds, in words, or None when it is text (or only nulls).
    Nested types are named without their fields: those names come from the file."""
    import polars as pl

    if dtype in (pl.String, pl.Null, pl.Categorical) or isinstance(dtype, pl.Enum):
        return None
    if dtype == pl.Boolean:
        return f"booleans ({dtype})"
    if dtype.is_numeric():
        return f"numbers ({dtype})"
    if isinstance(dtype, pl.List | pl.Array):
        return "lists (List)"
    if isinstance(dtype, pl.Struct):
        return "objects (Struct)"
    return f"values of type {dtype.base_type()}"


# -- Parquet -----------------------------------------------------------------------------------


def _parquet_columns(path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as handle:
            schema = handle.schema_arrow
            names = tuple(schema.names)
    except (pa.ArrowException, OSError, ValueError) as exc:
        msg = f"{path}: cannot read it as parquet: {_reason(exc, 'parquet')}"
        raise InputError(msg) from None
    kinds = {field.name: kind for field in schema if (kind := _arrow_kind(field.type))}
    return names, kinds


def _arrow_kind(arrow_type: Any) -> str | None:
    """What a column of ``arrow_type`` holds, in words, or None when it is text (or nulls).
    Nested types are named without their fields: those names come from the file."""
    import pyarrow.types as pt

    if pt.is_dictionary(arrow_type):
        return _arrow_kind(arrow_type.value_type)
    if pt.is_string(arrow_type) or pt.is_large_string(arrow_type) or pt.is_string_view(arrow_type):
        return None
    if pt.is_null(arrow_type):
        return None
    kinds = [
        (pt.is_boolean, "booleans"),
        (pt.is_integer, "numbers"),
        (pt.is_floating, "numbers"),
        (pt.is_decimal, "numbers"),
        (pt.is_binary, "binary data"),
        (pt.is_large_binary, "binary data"),
        (pt.is_fixed_size_binary, "binary data"),
    ]
    for test, kind in kinds:
        if test(arrow_type):
            return f"{kind} ({_escaped(str(arrow_type)[:_SHOWN_CHARS])})"
    if pt.is_list(arrow_type) or pt.is_large_list(arrow_type) or pt.is_fixed_size_list(arrow_type):
        return "lists (list)"
    if pt.is_struct(arrow_type) or pt.is_map(arrow_type):
        return "structs (struct)"
    return f"values of type {_escaped(str(arrow_type)[:_SHOWN_CHARS])}"


def _parquet_batches(
    source: InputSource, batch_size: int, columns: list[str]
) -> Iterator[pl.DataFrame]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    offset = 0
    with pq.ParquetFile(source.path) as handle:
        for record_batch in handle.iter_batches(batch_size=batch_size, columns=columns):
            _check_utf8(source.path, record_batch, offset)
            offset += record_batch.num_rows
            # Without the file's metadata: polars panics on keys that are not UTF-8.
            yield _polars(
                pa.RecordBatch.from_arrays(record_batch.columns, names=record_batch.schema.names)
            )


def _check_utf8(path: Path, record_batch: Any, offset: int) -> None:
    """Parquet strings are not checked when read, and polars takes them as they are: bytes
    that are not UTF-8 would fail far later, in the middle of a run (3 GB/s: cheap)."""
    import pyarrow as pa

    for name, column in zip(record_batch.schema.names, record_batch.columns, strict=True):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as exc:
            # A dictionary's index is a position in the dictionary, not a row.
            index = None if "Dictionary" in str(exc) else re.search(r"string index (\d+)", str(exc))
            where = f"row {offset + int(index.group(1))}" if index else f"at or after row {offset}"
            msg = f"{path}: cannot read it as parquet: {where}: column {_shown(name)}: not UTF-8"
            raise InputError(msg) from None


def _polars(table: Any) -> pl.DataFrame:
    import polars as pl

    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


# -- fingerprint -------------------------------------------------------------------------------


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

    def __init__(self, path: Path, origin: ObjectUri | None = None) -> None:
        self._path = path
        self._origin = origin
        self._digest = hashlib.sha256()
        self.rows = 0

    def add(self, frame: pl.DataFrame, *, checked: bool = False) -> None:
        """Take in one batch of ``call_id, template_key`` rows (``checked``: rows validation
        has been through, whose template_key it normalized already)."""
        import polars as pl

        if not frame.height:
            return
        # A blank template is no template, as validation reads it: a re-export that writes
        # "" where the last one left the field empty is the same input.
        template = pl.col("template_key") if checked else stripped_or_null("template_key")
        key = pl.concat_str(
            pl.col("call_id").fill_null("\x00"),
            pl.lit("\x1f"),
            template.fill_null("\x00"),
            pl.lit("\x1e"),
        )
        # Polars hands over large strings: each chunk's bytes are contiguous.
        _digest_values(self._digest, frame.select(key).to_series().to_arrow())
        self.rows += frame.height

    def result(self) -> InputFingerprint:
        """The fingerprint of every row added so far."""
        where = str(self._origin) if self._origin is not None else str(self._path.resolve())
        return InputFingerprint(where, self.rows, self._digest.hexdigest())


def _digest_values(digest: Any, array: Any) -> None:
    """Feed ``digest`` the UTF-8 bytes of every value of ``array`` (an Arrow array or chunked
    array of large strings), back to back, straight from the buffers that hold them: no
    Python string, no second copy."""
    for chunk in getattr(array, "chunks", [array]):
        _validity, offsets, data = chunk.buffers()
        if data is None or not len(chunk):
            continue
        ends = memoryview(offsets).cast("q")  # int64 offsets, from the chunk's own offset
        digest.update(memoryview(data)[ends[chunk.offset] : ends[chunk.offset + len(chunk)]])


def key_batches(source: InputSource, batch_size: int) -> Iterator[pl.DataFrame]:
    """``row, call_id, template_key`` only: the cheap pass that fingerprints and finds repeats."""
    yield from shaped_batches(source, batch_size, KEY_FIELDS)


# -- helpers -----------------------------------------------------------------------------------


def _is_blank(path: Path) -> bool:
    """Nothing but white space, after an optional UTF-8 byte order mark (read a block at a
    time, stopping at the first other byte)."""
    try:
        with path.open("rb") as handle:
            chunk = handle.read(_BLOCK).removeprefix(_BOM)
            while chunk:
                if chunk.strip(_BLANK):
                    return False
                chunk = handle.read(_BLOCK)
    except OSError as exc:
        msg = f"{path}: cannot read it ({exc.strerror})"
        raise InputError(msg) from None
    return True


def _utf8_problem(path: Path) -> str | None:
    """``line N (byte offset M): not UTF-8 text`` for the first byte that is not UTF-8."""
    carry = b""
    start = lines = 0  # the file offset of ``carry``, and the line ends before it
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(_BLOCK)
            data = carry + chunk
            try:
                # A character cut at the end of a block is decoded with the next one.
                _text, used = codecs.utf_8_decode(data, "strict", not chunk)
            except UnicodeDecodeError as exc:
                line = lines + data.count(b"\n", 0, exc.start) + 1
                return f"line {line} (byte offset {start + exc.start}): not UTF-8 text"
            if not chunk:
                return None
            lines += data.count(b"\n", 0, used)
            start += used
            carry = data[used:]


def _escaped(text: str) -> str:
    """``text`` with every character that is not printable written as its escape."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _shown(text: str) -> str:
    """A name or value from the file as a message may quote it: at most 40 characters, in
    single quotes, with quotes, backslashes and what is not printable escaped."""
    head = "".join(
        "\\'" if ch == "'" else ch if ch.isprintable() and ch != "\\" else repr(ch)[1:-1]
        for ch in text[:_SHOWN_CHARS]
    )
    return f"'{head}'" + ("…" if len(text) > _SHOWN_CHARS else "")


def _shown_names(names: tuple[str, ...]) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(_shown(name) for name in names[:_SHOWN_NAMES])
    more = len(names) - _SHOWN_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _reason(exc: BaseException, fmt: InputFormat = "csv") -> str:
    """A library's error in one short line. Text readers may quote the bytes they choke on, so
    no more than 40 characters of theirs are kept, escaped; pyarrow's Parquet errors are about
    the file's structure (sizes, footers, encodings), never its values, and are kept longer."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = re.sub(r"^Could not open Parquet input source '[^']*': ", "", first)
    return _escaped(first[: _PARQUET_REASON_CHARS if fmt == "parquet" else _SHOWN_CHARS])
