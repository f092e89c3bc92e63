"""Pure, vectorised checks that mark rows the API would refuse, with the API's own codes.

Per-row checks (DESIGN §4) are one polars expression evaluated per batch. Duplicate targets need a
global view: :func:`find_duplicates` is one key-only pass over the whole input before anything is
sent. It hashes ``(call_id, template_key)`` to find candidate groups cheaply, then confirms them on
the real strings, so a hash collision can never mark a row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from allo_batch.constants import CALL_PREFIX, MAX_CONTENT_CHARS, TEMPLATE_KEYS, Code
from allo_batch.models import (
    CODE,
    DUPLICATE_ROW,
    MESSAGE,
    REPEAT_OF,
    ROW,
    not_a_key,
    stripped_or_null,
)

if TYPE_CHECKING:
    import polars as pl

_SHOWN_ROWS: Final = 5
# How much of an id or key a message quotes: row messages are printed by `validate` and kept in
# the result file, so a pasted secret or a line of content in the wrong column must not be.
_SHOWN_CHARS: Final = 40
_CONTROL: Final = r"\p{Cc}"
_SHA256: Final = r"^[0-9a-f]{64}$"
T = TypeVar("T")


def _escapes() -> dict[str, str]:
    """Characters written as their Python escape when a message quotes the file: controls
    (C0, DEL, C1), and the invisible ones that reorder or hide text in a terminal (format
    characters such as bidi overrides and zero-width spaces, separators, odd spaces)."""
    controls = [*range(0x20), *range(0x7F, 0xA0)]
    invisible = [
        *(0x00A0, 0x00AD, 0x061C, 0x1680, 0x180E, 0x205F, 0x3000, 0xFEFF),
        *range(0x2000, 0x2010),
        *range(0x2028, 0x2030),
        *range(0x2060, 0x2070),
        *range(0xFFF9, 0xFFFC),
    ]
    table = {chr(code): repr(chr(code))[1:-1] for code in (*controls, *invisible)}
    return {**table, "\\": "\\\\", "'": "\\'"}


_ESCAPES: Final = _escapes()


def _shown(value: pl.Expr) -> pl.Expr:
    """``value`` as a message quotes it: its first 40 characters, escaped, in single quotes,
    and ``…`` after when there is more. One vectorised replace, no Python per row."""
    import polars as pl

    head = value.str.slice(0, _SHOWN_CHARS).str.replace_many(_ESCAPES)
    more = pl.when(value.str.len_chars() > _SHOWN_CHARS).then(pl.lit("…")).otherwise(pl.lit(""))
    return pl.format("'{}'{}", head, more)


def _quoted(name: str) -> pl.Expr:
    """Column ``name``'s value as a message quotes it (:func:`_shown`); a value that cannot be
    an id or a key, only its length: it is most likely another column's text, maybe a summary,
    which no message may show."""
    import polars as pl

    length = pl.col(name).str.len_chars()
    hidden = pl.format(
        "a text of {} characters, not shown (is this the {} column?)", length, pl.lit(name)
    )
    return pl.when(not_a_key(name)).then(hidden).otherwise(_shown(pl.col(name)))


def _bad_call_id() -> pl.Expr:
    """Missing, not a call id, holding a control character (a newline, NUL, tab...), or with
    white space at either end: sent as is, such an id would be a different path, or a
    different call, from the one a person reading the file sees."""
    import polars as pl

    call_id = pl.col("call_id")
    return (
        call_id.is_null()
        | ~call_id.str.starts_with(CALL_PREFIX)
        | call_id.str.contains(_CONTROL)
        | (call_id.str.strip_chars() != call_id)
    )


def normalized_template() -> pl.Expr:
    """``template_key`` with surrounding blanks removed and empty values as null."""
    return stripped_or_null("template_key")


def normalized_expected() -> pl.Expr:
    """``expected_sha256`` as it is compared with a target's hash: hex in lower case, a blank
    one null (no expectation)."""
    return stripped_or_null("expected_sha256").str.to_lowercase()


def _bad_expected() -> pl.Expr:
    """An ``expected_sha256`` that is not a SHA-256 (64 hex digits, either case): no content
    could match it, so the row would always end as a conflict."""
    expected = normalized_expected()
    return expected.is_not_null() & ~expected.str.contains(_SHA256)


def _with_expected(batch: pl.DataFrame) -> pl.DataFrame:
    """``batch`` with an ``expected_sha256`` column (null when the input has none)."""
    import polars as pl

    if "expected_sha256" in batch.columns:
        return batch
    return batch.with_columns(pl.lit(None, dtype=pl.String).alias("expected_sha256"))


def issue_code() -> pl.Expr:
    """The first check a row fails, as the API's code, or null for a valid row."""
    import polars as pl

    content, template = pl.col("content"), pl.col("template_key")
    # Bytes bound characters from above, so count characters only where bytes exceed the limit.
    too_long = (content.str.len_bytes() > MAX_CONTENT_CHARS) & (
        content.str.len_chars() > MAX_CONTENT_CHARS
    )
    return (
        pl.when(_bad_call_id())
        .then(pl.lit(Code.INVALID_ITEM_ID))
        .when(content.is_null() | (content.str.strip_chars().str.len_bytes() == 0))
        .then(pl.lit(Code.INVALID_REQUEST_BODY))
        .when(too_long)
        .then(pl.lit(Code.INVALID_REQUEST_BODY))
        .when(template.is_not_null() & ~template.is_in(TEMPLATE_KEYS))
        .then(pl.lit(Code.INVALID_REQUEST_BODY))
        .when(_bad_expected())
        .then(pl.lit(Code.INVALID_REQUEST_BODY))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias(CODE)
    )


def issue_message() -> pl.Expr:
    """A human reason naming the column, matching :func:`issue_code`."""
    import polars as pl

    call_id, content, template = pl.col("call_id"), pl.col("content"), pl.col("template_key")
    return (
        pl.when(call_id.is_null())
        .then(pl.lit("column call_id: missing"))
        .when(call_id.str.contains(_CONTROL))
        .then(pl.format("column call_id: {} holds a control character", _quoted("call_id")))
        .when(call_id.str.strip_chars() != call_id)
        .then(pl.format("column call_id: {} has surrounding whitespace", _quoted("call_id")))
        .when(~call_id.str.starts_with(CALL_PREFIX))
        .then(
            pl.format(
                "column call_id: {} is not a call id (must start with {})",
                _quoted("call_id"),
                pl.lit(CALL_PREFIX),
            )
        )
        .when(content.is_null() | (content.str.strip_chars().str.len_bytes() == 0))
        .then(pl.lit("column content: missing or blank"))
        .when(content.str.len_bytes() > MAX_CONTENT_CHARS)
        .then(
            pl.format(
                "column content: {} characters, over the API's maximum of {}",
                content.str.len_chars(),
                pl.lit(MAX_CONTENT_CHARS),
            )
        )
        .when(template.is_not_null() & ~template.is_in(TEMPLATE_KEYS))
        .then(
            pl.format(
                "column template_key: {} is not one of {}",
                _quoted("template_key"),
                pl.lit(", ".join(TEMPLATE_KEYS)),
            )
        )
        .otherwise(
            pl.format(
                "column expected_sha256: {} is not a SHA-256 (64 hex digits)",
                _quoted("expected_sha256"),
            )
        )
        .alias(MESSAGE)
    )


def validate_batch(batch: pl.DataFrame, duplicates: Duplicates) -> pl.DataFrame:
    """Add ``error_code``, ``message`` and ``repeat_of`` to a batch of read rows."""
    import polars as pl

    checked = _with_expected(batch).with_columns(normalized_template()).with_columns(issue_code())
    # Messages quote the file's own hash; the planner and the look stage get it normalized.
    checked = checked.with_columns(_messages(checked)).with_columns(normalized_expected())
    marks = duplicates.frame
    if marks.height == 0:
        return checked.with_columns(pl.lit(None, dtype=pl.Int64).alias(REPEAT_OF))
    joined = checked.join(marks, on=ROW, how="left", maintain_order="left")
    # Valid rows of a conflicting target (an invalid row keeps its own code and message).
    conflict = joined.select(pl.col(_DUP_ROWS).is_not_null() & pl.col(CODE).is_null())
    rows = conflict.to_series().arg_true()
    if not len(rows):
        return joined.drop(_DUP_ROWS, _BOTH_WAYS)
    return joined.with_columns(
        joined.get_column(CODE).scatter(rows, DUPLICATE_ROW),
        joined.get_column(MESSAGE).scatter(rows, _conflict_messages(joined[rows])),
    ).drop(_DUP_ROWS, _BOTH_WAYS)


def _conflict_messages(conflicting: pl.DataFrame) -> pl.Series:
    """The message of each of ``conflicting`` rows. Made here, a batch at a time, from the
    row's own call and template: :class:`Duplicates` keeps only the rows to name, a few bytes
    per row where whole messages took 200."""
    import polars as pl

    rows_named, call = pl.col(_DUP_ROWS), _shown(pl.col("call_id"))
    both_ways = pl.format(
        "rows {} give call {} different content, with and without template_key (a row without "
        "one updates the call's only summary, maybe the one another names)",
        rows_named,
        call,
    )
    one_target = pl.format(
        "rows {} give call {} (template {}) different content",
        rows_named,
        call,
        pl.col("template_key").fill_null("(none)"),
    )
    message = pl.when(pl.col(_BOTH_WAYS)).then(both_ways).otherwise(one_target)
    return conflicting.select(message.alias(MESSAGE)).to_series()


def _messages(checked: pl.DataFrame) -> pl.Series:
    """The message of each invalid row, null for the others. Worked out for the invalid rows
    alone: a ``when`` would build (and escape) a message for every row, then drop most."""
    import polars as pl

    invalid = checked.get_column(CODE).is_not_null()
    messages = pl.repeat(None, checked.height, dtype=pl.String, eager=True).alias(MESSAGE)
    if not invalid.any():
        return messages
    said = checked.filter(invalid).select(issue_message()).to_series()
    return messages.scatter(invalid.arg_true(), said)


@dataclass(frozen=True, slots=True)
class Duplicates:
    """Rows involved in duplicate targets: ``row``; for a conflict, ``dup_rows`` (the rows its
    message names) and ``both_ways`` (whether the call is given with and without a template,
    else one target is given different contents); for a plain repeat, ``repeat_of``."""

    frame: pl.DataFrame

    @property
    def conflicting(self) -> int:
        """How many rows are invalid because their target is given different content."""
        return int(self.frame[_DUP_ROWS].is_not_null().sum()) if self.frame.height else 0


_DUP_ROWS: Final = "dup_rows"
_BOTH_WAYS: Final = "both_ways"


def no_duplicates() -> Duplicates:
    """:class:`Duplicates` of an input where no target repeats."""
    import polars as pl

    schema = {ROW: pl.Int64, _DUP_ROWS: pl.String, _BOTH_WAYS: pl.Boolean, REPEAT_OF: pl.Int64}
    return Duplicates(pl.DataFrame(schema=schema))


def _conflicts(groups: pl.DataFrame, *, both_ways: bool) -> pl.DataFrame:
    """:class:`Duplicates`' frame for every row of ``groups`` (a list ``rows`` per group of
    conflicting rows)."""
    import polars as pl

    named = pl.col("rows").list.head(_SHOWN_ROWS).cast(pl.List(pl.String)).list.join(", ")
    return (
        groups.select("rows", named.alias(_DUP_ROWS))
        .explode("rows")
        .select(
            pl.col("rows").alias(ROW),
            _DUP_ROWS,
            pl.lit(both_ways).alias(_BOTH_WAYS),
            pl.lit(None, pl.Int64).alias(REPEAT_OF),
        )
    )


def key_hash(*, checked: bool = False) -> pl.Expr:
    """A 64-bit hash of a row's target: ``call_id`` and the normalised ``template_key``
    (``checked``: of a validated batch, whose template_key is normalized already)."""
    import polars as pl

    template = pl.col("template_key") if checked else normalized_template()
    return pl.struct(pl.col("call_id"), template).hash(seed=2).alias("key_hash")


def target_hashes(frame: pl.DataFrame, *, checked: bool = False) -> pl.Series:
    """The :func:`key_hash` of every row of a key-only batch (``checked``: of a batch
    :func:`validate_batch` returned)."""
    return frame.select(key_hash(checked=checked))["key_hash"]


# Candidate hashes (of targets, or of calls) compared per pass over the input. Every row of a
# candidate is held while it is compared (a candidate is two rows or more): a million at a
# time keeps an input whose every target repeats at about a gigabyte, where all at once took
# 3.7 GB for 10M rows, and costs such an input one more pass per million.
_CANDIDATES_PER_PASS: Final = 1_000_000


def _range_by_range(
    batches: Callable[[], Iterable[pl.DataFrame]],
    ordered: pl.Series,
    compare: Callable[[Iterable[pl.DataFrame], pl.Series], T],
) -> list[T]:
    """``compare`` of the input (``batches()``, read anew each time) and each range of
    :data:`_CANDIDATES_PER_PASS` hashes of ``ordered`` (sorted): one pass per range."""
    return [
        compare(batches(), ordered.slice(start, _CANDIDATES_PER_PASS))
        for start in range(0, ordered.len(), _CANDIDATES_PER_PASS)
    ]


class Targets:
    """What the first pass over an input learns of its targets, a batch at a time: every
    row's :func:`key_hash`, and whether some rows name a template while others name none
    (see :func:`calls_in_conflict`)."""

    def __init__(self) -> None:
        self._hashes: list[pl.Series] = []
        self._bare = self._named = False

    def add(self, frame: pl.DataFrame, *, checked: bool = False) -> None:
        """Take in a key-only batch (``checked``: a batch :func:`validate_batch` returned,
        whose template_key it normalized already)."""
        if not checked:
            frame = frame.select("call_id", normalized_template())
        nulls = frame.get_column("template_key").null_count()
        self._bare |= nulls > 0
        self._named |= nulls < frame.height
        self._hashes.append(target_hashes(frame, checked=True))

    @property
    def mixed(self) -> bool:
        """Whether rows came both with and without a template_key."""
        return self._bare and self._named

    def repeated(self) -> pl.Series:
        """The key hashes seen more than once (:func:`repeated_hashes`); the hashes kept so
        far are let go."""
        found = repeated_hashes(self._hashes)
        self._hashes.clear()
        return found


def _call_hash() -> pl.Expr:
    """A 64-bit hash of a row's call id alone."""
    import polars as pl

    return pl.col("call_id").hash(seed=3).alias("call_hash")


def calls_in_conflict(
    keys: Iterable[pl.DataFrame], batches: Callable[[], Iterable[pl.DataFrame]]
) -> pl.Series:
    """The hashes (sorted) of the calls whose valid rows give more than one content, some
    rows with a template_key and some without: a row without one updates the call's only
    completed summary, maybe the very one another row names, so which content the summary
    ends with would depend on which write lands last. (On a call with two, the API refuses
    the row without.) Hashes only: :func:`find_duplicates` confirms on the real strings.

    Only an input that mixes the two kinds of row needs this (:attr:`Targets.mixed`): a
    key-only pass (``keys``) finds the calls given both ways, and only when there are some
    do passes over whole rows (``batches()``) compare their contents, a hash per call, for a
    range of calls at a time (as :func:`find_duplicates` does, to bound memory)."""
    import polars as pl

    both = _calls_given_both_ways(keys)
    found = _range_by_range(batches, both, _calls_of_several_contents)
    return pl.concat(found).sort() if found else both


def _calls_given_both_ways(keys: Iterable[pl.DataFrame]) -> pl.Series:
    import polars as pl

    bare, named = [], []
    for frame in keys:
        hashed = frame.select(_call_hash(), normalized_template().is_null().alias("bare"))
        bare.append(hashed.filter(pl.col("bare")).get_column("call_hash"))
        named.append(hashed.filter(~pl.col("bare")).get_column("call_hash"))
    nothing = pl.Series("call_hash", [], dtype=pl.UInt64)
    without = pl.concat(bare).unique().sort() if bare else nothing
    if not without.len() or not named:
        return nothing
    given = pl.concat(named)
    return given.filter(_in_sorted(given, without)).unique().sort()


def _calls_of_several_contents(batches: Iterable[pl.DataFrame], calls: pl.Series) -> pl.Series:
    import polars as pl

    bare = pl.col("template_key").is_null()
    content = pl.col("content_hash")
    per_call = [
        rows.group_by(_call_hash()).agg(
            bare.any().alias("bare"),
            (~bare).any().alias("named"),
            content.min().alias("low"),
            content.max().alias("high"),
        )
        for rows in _valid_rows_among(batches, _call_hash(), calls)
    ]
    if not per_call:
        return calls.clear()
    merged = (
        pl.concat(per_call)
        .group_by("call_hash")
        .agg(pl.col("bare").any(), pl.col("named").any(), pl.col("low").min(), pl.col("high").max())
    )
    several = pl.col("bare") & pl.col("named") & (pl.col("low") != pl.col("high"))
    return merged.filter(several).get_column("call_hash").sort()


def repeated_hashes(hashes: pl.Series | list[pl.Series]) -> pl.Series:
    """The key hashes that occur more than once (given whole, or in chunks).

    Sorting and comparing neighbours needs two copies of 8 bytes per row and no hash table,
    which keeps 10M rows inside the memory budget (a group-by took 740 MB there).
    """
    import polars as pl

    if isinstance(hashes, list):
        hashes = pl.concat(hashes, rechunk=False) if hashes else pl.Series(dtype=pl.UInt64)
    ordered = hashes.sort()
    if ordered.len() < 2:
        return ordered.clear()
    later = ordered.slice(1)
    return later.filter(later == ordered.slice(0, ordered.len() - 1)).unique()


def _in_sorted(values: pl.Series, ordered: pl.Series) -> pl.Series:
    """Whether each of ``values`` is one of ``ordered`` (sorted, not empty): a binary search
    per value. (``is_in`` builds a hash set of all of ``ordered`` for every batch: with
    millions of repeated targets, most of the time of the whole check.)"""
    at = ordered.search_sorted(values, side="left").clip(0, ordered.len() - 1)
    return ordered.gather(at) == values


def duplicates_in(frame: pl.DataFrame) -> Duplicates:
    """:func:`find_duplicates` for a frame already in memory."""
    targets = Targets()
    targets.add(frame)
    calls = calls_in_conflict([frame], lambda: [frame]) if targets.mixed else None
    return find_duplicates(lambda: [frame], targets.repeated(), calls)


def find_duplicates(
    batches: Callable[[], Iterable[pl.DataFrame]],
    candidates: pl.Series,
    calls: pl.Series | None = None,
) -> Duplicates:
    """Rows of valid targets given twice, as conflicts or plain repeats; and the rows of a
    call in conflict (:func:`calls_in_conflict`), as conflicts.

    ``candidates`` are the key hashes seen more than once (:func:`repeated_hashes` of a key-only
    pass), ``calls`` the hashes of the calls in conflict (None: none). Only rows with such a
    hash are kept from the input (``batches()`` reads it anew) and compared on the real
    strings, so a hash collision never marks a row, and nothing is read when there are none.
    A target's rows share its hash, so candidates are compared a range of hashes at a time,
    one pass each, and memory holds the rows of one range.
    """
    import polars as pl

    in_conflict = calls.sort() if calls is not None else candidates.clear()
    of_calls = _range_by_range(batches, in_conflict, _conflicts_of_calls)
    of_targets = _range_by_range(batches, candidates.sort(), _duplicates_among)
    found = [part for part in of_calls + of_targets if part.height]
    if not found:
        return no_duplicates()
    marks = pl.concat(found).sort(ROW, maintain_order=True)
    # Each range's rows are its own; only a row both of a call in conflict and of a repeated
    # target comes twice, and the call's conflict, first, is what it is told (a copy of the
    # rows, so only then).
    if any(part.height for part in of_calls) and any(part.height for part in of_targets):
        marks = marks.unique(ROW, keep="first", maintain_order=True)
    return Duplicates(marks)


def _valid_rows_among(
    batches: Iterable[pl.DataFrame], hashed: pl.Expr, wanted: pl.Series
) -> Iterator[pl.DataFrame]:
    """Of each batch, as it is read, the valid rows whose ``hashed`` value is one of
    ``wanted`` (sorted, not empty): ``row``, ``call_id``, the normalized ``template_key`` and
    a hash of the content."""
    import polars as pl

    return (
        _with_expected(batch.filter(_in_sorted(batch.select(hashed).to_series(), wanted)))
        .with_columns(normalized_template())
        .filter(issue_code().is_null())
        .select(
            ROW, "call_id", "template_key", pl.col("content").hash(seed=1).alias("content_hash")
        )
        for batch in batches
    )


def _conflicts_of_calls(batches: Iterable[pl.DataFrame], calls: pl.Series) -> pl.DataFrame:
    """Every valid row of the calls of ``calls`` (sorted, not empty) that, on the real strings,
    are given both with and without a template_key in more than one content."""
    import polars as pl

    kept = list(_valid_rows_among(batches, _call_hash(), calls))
    if not kept:
        return no_duplicates().frame
    template = pl.col("template_key")
    grouped = (
        pl.concat(kept)
        .group_by("call_id")
        .agg(
            pl.col(ROW).sort().alias("rows"),
            template.is_null().any().alias("bare"),
            template.is_not_null().any().alias("named"),
            pl.col("content_hash").n_unique().alias("contents"),
        )
    )
    in_conflict = grouped.filter(pl.col("bare") & pl.col("named") & (pl.col("contents") > 1))
    return _conflicts(in_conflict, both_ways=True)


def _duplicates_among(batches: Iterable[pl.DataFrame], wanted: pl.Series) -> pl.DataFrame:
    """:class:`Duplicates`' frame for the rows whose key hash is one of ``wanted`` (sorted,
    not empty), unsorted."""
    import polars as pl

    kept = list(_valid_rows_among(batches, key_hash(), wanted))
    involved = pl.concat(kept) if kept else pl.DataFrame()
    if involved.height == 0:
        return no_duplicates().frame
    target = ["call_id", "template_key"]
    groups = involved.group_by(target).agg(
        pl.col(ROW).sort().alias("rows"), pl.col("content_hash").n_unique().alias("contents")
    )
    conflicts = _conflicts(groups.filter(pl.col("contents") > 1), both_ways=False)
    repeats = (
        involved.join(
            groups.filter(pl.col("contents") == 1).select(target),
            on=target,
            how="semi",
            nulls_equal=True,
        )
        .with_columns(pl.col(ROW).min().over(target).alias(REPEAT_OF))
        .filter(pl.col(ROW) != pl.col(REPEAT_OF))
        .select(
            ROW,
            pl.lit(None, pl.String).alias(_DUP_ROWS),
            pl.lit(None, pl.Boolean).alias(_BOTH_WAYS),
            REPEAT_OF,
        )
    )
    return pl.concat([conflicts, repeats])
