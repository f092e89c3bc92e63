"""Values that flow between the stages: planned requests, row results, the run summary."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger("allo_batch")

Status = Literal["updated", "unchanged", "skipped", "conflict", "invalid", "failed", "not_sent"]
STATUSES: Final[tuple[Status, ...]] = (
    "updated",
    "unchanged",
    "skipped",
    "conflict",
    "invalid",
    "failed",
    "not_sent",
)
#: Statuses that leave a row's target holding its content: the exit code stays 0.
SUCCESS: Final[tuple[Status, ...]] = ("updated", "unchanged", "skipped")

# Columns of the working frames that pass between read, validate and plan.
ROW: Final = "row"
FIELDS: Final = ("call_id", "template_key", "content", "expected_sha256")
KEY_FIELDS: Final = ("call_id", "template_key")
CODE: Final = "error_code"
MESSAGE: Final = "message"
REPEAT_OF: Final = "repeat_of"
# A row without ``template_key`` addresses the call's only summary; keys use this in its place.
NO_TEMPLATE: Final = ""

#: The done index's key: two 64-bit hashes of ``(call_id, template_key, content_sha256)``,
#: 16 bytes a row where the strings took about 130 (a collision of 128 bits is not a concern).
DONE_KEYS: Final = ("_done_k1", "_done_k2")


def stripped_or_null(name: str) -> pl.Expr:
    """Column ``name`` without surrounding blanks, and null where nothing is left: how a blank
    optional field reads (no template, no expected hash), in validation and in the input's
    fingerprint alike."""
    import polars as pl

    value = pl.col(name).str.strip_chars()
    return pl.when(value.str.len_bytes() > 0).then(value).otherwise(None).alias(name)


#: No call id or template key is longer, or holds white space inside: a value that does is
#: most likely text from another column (columns swapped or mislabelled), maybe a summary.
KEY_MAX_CHARS: Final = 64


def not_a_key(name: str) -> pl.Expr:
    """Whether column ``name``'s value cannot be an id or a key (see :data:`KEY_MAX_CHARS`).
    Such a value of a refused row is never written whole: not to a message, not to the result
    file, which must hold no summary content."""
    import polars as pl

    value = pl.col(name)
    too_long = value.str.len_chars() > KEY_MAX_CHARS
    return (too_long | value.str.strip_chars().str.contains(r"\s")).fill_null(False)


def unless_not_a_key(name: str) -> pl.Expr:
    """Column ``name`` as given, but null in a refused row where it is :func:`not_a_key`."""
    import polars as pl

    refused = pl.col(CODE).is_not_null() & not_a_key(name)
    return pl.when(refused).then(None).otherwise(pl.col(name)).alias(name)


def done_keys() -> list[pl.Expr]:
    """The done index's key of each row of a frame with ``call_id``, ``template_key`` (null for
    none) and ``content_sha256``; the planner computes the same for each batch."""
    import polars as pl

    content = pl.concat_str(
        pl.col("call_id").fill_null(""),
        pl.col("template_key").fill_null(NO_TEMPLATE),
        pl.col("content_sha256").fill_null(""),
        separator="\x1f",
    )
    return [content.hash(seed=11).alias(DONE_KEYS[0]), content.hash(seed=29).alias(DONE_KEYS[1])]


def done_rows_for(done: pl.DataFrame, keyed: pl.DataFrame) -> pl.DataFrame:
    """The rows of the done index that rows with :func:`done_keys` columns may match: join
    ``keyed`` with these, never with the whole index, which a join would hash again each time
    (a million rows of an earlier run, for every batch of a rerun)."""
    import polars as pl

    first = DONE_KEYS[0]
    return done.filter(pl.col(first).is_in(keyed.get_column(first).implode()))


# Local codes (DESIGN §4) beside the API's own.
DUPLICATE_ROW: Final = "DUPLICATE_ROW"
TIMEOUT: Final = "TIMEOUT"
CONNECTION_ERROR: Final = "CONNECTION_ERROR"
URL_TOO_LONG: Final = "URL_TOO_LONG"  # an id httpx cannot put in a URL (65,536 characters)

Reason = Literal[
    "dry_run",  # not_sent: a dry run sends nothing
    "limit",  # not_sent: beyond --limit
    "stopped",  # not_sent: the run stopped before sending it
    "in_flight",  # not_sent: cut off in flight by a stop; may have landed, resent next time
    "landed_earlier",  # skipped: an earlier run of this output landed this content
    "repeat",  # skipped: the same target and content as an earlier row of this input
    "already_right",  # unchanged: a certain read showed the target holds this content
    "changed_since",  # conflict: the target no longer holds what the run wrote (undo)
    "uncertain",  # skipped by undo, or conflict: a read could not be tied to the template
    "no_before_image",  # skipped by undo: nothing to put back (the target had no summary)
]
#: Reasons of rows left unsent on purpose: they do not make the exit code non-zero.
DEFERRED_REASONS: Final[tuple[Reason, ...]] = ("dry_run", "limit")

RESULT_COLUMNS: Final = (
    "row",
    "call_id",
    "template_key",
    "status",
    "error_code",
    "retryable",
    "http_status",
    "version",
    "updated_at",
    "attempts",
    "request_id",
    "content_sha256",
    "message",
    "reason",
)
_columns = attrgetter(*RESULT_COLUMNS)


def content_sha256(content: str | None) -> str:
    """The hash recorded for a row's content (of the empty string when missing)."""
    return hashlib.sha256((content or "").encode()).hexdigest()


def content_sha256_column(contents: pl.Series) -> pl.Series:
    """:func:`content_sha256` of every value of a column, as a ``content_sha256`` column.

    Hashed in Rust by the ``polars-hash`` plugin where it works (a third of hashlib's time on
    short rows, outside the GIL); else, one row at a time in Python."""
    import polars as pl

    contents = contents.fill_null("")
    native = _native_sha256(contents)
    if native is not None:
        return native.alias("content_sha256")
    sha256 = hashlib.sha256
    encoded = contents.cast(pl.Binary).to_list()
    return pl.Series("content_sha256", [sha256(value).hexdigest() for value in encoded], pl.String)


def _native_sha256(contents: pl.Series) -> pl.Series | None:
    plugin = _sha256_plugin()
    if plugin is None:
        return None
    import polars as pl

    try:
        return _plugin_sha256(plugin, contents)
    # Whatever a mismatched plugin raises (a Rust panic is no Exception): hashlib does it.
    except (Exception, pl.exceptions.PanicException):
        return None


_PROBE: Final = ("", "a", "é日本 ✓", "twelve bytes", "x" * 70_000, "line\nbreak")


@functools.cache
def _sha256_plugin() -> Any:
    """The ``polars_hash`` module, if it imports and hashes as hashlib does: a compiled plugin
    can break with a polars release it was not built for, so it is checked once a process
    (on a column in two chunks, as batches come), and hashlib takes over, saying why."""
    import polars as pl

    try:
        import polars_hash

        half = len(_PROBE) // 2
        probe = pl.concat(
            [pl.Series("content", _PROBE[:half]), pl.Series("content", _PROBE[half:])],
            rechunk=False,
        )
        agrees = _plugin_sha256(polars_hash, probe).to_list() == list(map(content_sha256, _PROBE))
    except (Exception, pl.exceptions.PanicException) as exc:
        log.warning("polars-hash cannot be used (%s); hashing with hashlib, slower", exc)
        return None
    if not agrees:
        log.warning("polars-hash hashes otherwise than hashlib; hashing with hashlib, slower")
        return None
    return polars_hash


def _plugin_sha256(polars_hash: Any, contents: pl.Series) -> pl.Series:
    name = contents.name or "content"
    frame = contents.rename(name).to_frame()
    return frame.select(polars_hash.col(name).chash.sha2_256()).to_series()


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One PATCH to send: the row it comes from and its body, serialised once."""

    row: int
    call_id: str
    template_key: str | None
    content_sha256: str
    body: bytes
    #: Write only if the target holds content of this hash (``undo``: what the run wrote).
    expected_sha256: str | None = None

    def result(self, status: Status, **fields: Any) -> RowResult:
        """This row's outcome: its identity and content hash, plus ``fields``."""
        return RowResult(
            row=self.row,
            call_id=self.call_id,
            template_key=self.template_key,
            status=status,
            content_sha256=self.content_sha256,
            **fields,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RowResult:
    """What happened to one input row; one line of the result file."""

    row: int
    call_id: str | None
    template_key: str | None
    status: Status
    content_sha256: str
    error_code: str | None = None
    retryable: bool = False
    http_status: int | None = None
    version: int | None = None
    updated_at: str | None = None
    attempts: int = 0
    request_id: str | None = None
    message: str | None = None
    reason: Reason | None = None

    @property
    def deferred(self) -> bool:
        """Left unsent on purpose (dry run, ``--limit``): not a reason for exit code 1."""
        return self.reason in DEFERRED_REASONS

    def as_dict(self) -> dict[str, Any]:
        """The result-file columns, in order."""
        return dict(zip(RESULT_COLUMNS, _columns(self), strict=True))

    def as_tuple(self) -> tuple[Any, ...]:
        """The result-file columns, in order, as one row."""
        return _columns(self)


@dataclass(slots=True)
class RunSummary:
    """End-of-run figures; the same numbers as ``--json`` and the Python API."""

    rows: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_error_code: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    reads: int = 0
    rate_limited: int = 0
    in_doubt_resent: int = 0
    changes: dict[str, int] = field(default_factory=dict)
    expected_write_seconds: float | None = None  # dry run: the writes' time at the limit
    verified: int | None = None  # --verify: targets read back after the writes
    verify_differs: int | None = None  # ... of which read back differently
    rate_limit: float | None = None
    achieved_rate: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    elapsed_seconds: float = 0.0
    exit_code: int = 0
    stopped_reason: str | None = None
    output: str | None = None
    dry_run: bool = False
    auth_form: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class InputCheck:
    """What ``allo-batch validate`` found: counts, and a few examples per error code."""

    path: Path
    rows: int = 0
    invalid: int = 0
    repeats: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    lines: dict[int, int] = field(default_factory=dict)  # row → the line it starts on
