"""The rows of a result file that need a human, and how ``report --failed`` lists them.

A rerun finishes ``not_sent`` rows by itself, and ``updated``/``skipped`` rows are done. An
``invalid`` row (refused by the local checks) or a ``failed`` one (refused by the API, or given
up on after its retries) comes back the same way on every rerun until someone edits the input:
those are the rows listed here, in input order, with what the result file says about each.

Where a row is in the input: the result file numbers rows from 0 in file order (``row``). For a
CSV that is *not* a line number: a quoted field may span lines, and blank lines are skipped, so
line ``row + 2`` would be a guess. Without the input this module says ``record N`` (the Nth
record after the header, 1-based), which is always true; given line numbers read from the input
itself (:mod:`allo_batch.corrections`), it says ``line N``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from allo_batch.record import read_results, read_sidecar

if TYPE_CHECKING:
    import polars as pl

#: Statuses a rerun cannot fix without an edit, or a decision (a target changed since).
NEEDS_HUMAN: Final = ("invalid", "failed", "conflict")
#: The result columns a listing shows, in this order.
LISTED: Final = (
    "row",
    "call_id",
    "template_key",
    "status",
    "error_code",
    "retryable",
    "http_status",
    "message",
)
_WIDEST: Final = 40  # a call id or template key is cut to this many characters in a listing


@dataclass(frozen=True, slots=True)
class CodeCount:
    """An error code, the statuses its rows have, and how many rows have it."""

    code: str
    statuses: tuple[str, ...]
    rows: int


@dataclass(frozen=True, slots=True)
class ResultFacts:
    """What a result file and its sidecar say, read once for every kind of report."""

    path: Path
    rows: int
    by_status: dict[str, int]
    codes: list[CodeCount]
    needs: pl.DataFrame  # the LISTED columns of the rows that need a human, in row order
    sidecar: dict[str, Any]

    @property
    def input_facts(self) -> dict[str, Any] | None:
        """The input fingerprint the run recorded (``path``, ``rows``, ``keys_sha256``)."""
        facts = self.sidecar.get("input")
        return facts if isinstance(facts, dict) else None

    @property
    def input_path(self) -> str | None:
        """The input the run read, as recorded (it may have moved since)."""
        facts = self.input_facts
        path = facts.get("path") if facts else None
        return path if isinstance(path, str) else None


def load(path: Path) -> ResultFacts:
    """Read ``path`` (any result format) and its sidecar: counts, codes and the rows to fix."""
    import polars as pl

    frame = read_results(path)
    by_status = {str(k): int(v) for k, v in frame.group_by("status").len().iter_rows()}
    per_code = (
        frame.filter(pl.col("error_code").is_not_null())
        .group_by("error_code")
        .agg(pl.col("status").unique().sort().alias("statuses"), pl.len().alias("rows"))
        .sort(["rows", "error_code"], descending=[True, False])
    )
    codes = [
        CodeCount(str(code), tuple(statuses), int(rows)) for code, statuses, rows in per_code.rows()
    ]
    needs = frame.filter(pl.col("status").is_in(NEEDS_HUMAN)).select(LISTED).sort("row")
    return ResultFacts(path, frame.height, by_status, codes, needs, read_sidecar(path))


def where(row: int, lines: Mapping[int, int]) -> str:
    """``line N`` when the input was read for line numbers, else ``record N`` (1-based)."""
    line = lines.get(row)
    return f"line {line}" if line is not None else f"record {row + 1}"


def shown_rows(facts: ResultFacts, show: int) -> list[dict[str, Any]]:
    """The first ``show`` rows that need a human (``0``: all of them), as dicts."""
    needs = facts.needs if show == 0 else facts.needs.head(show)
    return needs.to_dicts()


def headline(facts: ResultFacts) -> str:
    """One line: how many rows need a human, of which status, and what a rerun will do."""
    total = facts.needs.height
    if not total:
        text = f"{facts.path}: no rows need a human (none invalid or failed)"
    else:
        parts = ", ".join(
            f"{facts.by_status[s]} {s}" for s in NEEDS_HUMAN if facts.by_status.get(s)
        )
        text = f"{facts.path}: {total} rows need a human: {parts}"
    left = facts.by_status.get("not_sent", 0)
    if left:
        text += f"; {left} not_sent rows need no edit (a run sends them) and are not listed"
    return text


def format_listing(facts: ResultFacts, show: int, lines: Mapping[int, int]) -> str:
    """``report --failed``: a headline, an aligned table, and how many rows were left out."""
    out = [headline(facts)]
    rows = shown_rows(facts, show)
    if not rows:
        return out[0]
    header = ("ROW", "WHERE", "CALL ID", "TEMPLATE", "STATUS", "CODE", "MESSAGE")
    table = [header] + [_cells(row, lines) for row in rows]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header) - 1)]
    for cells in table:
        lead = "  ".join(
            cell.rjust(width) if i == 0 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=False))
        )
        out.append(f"  {lead}  {cells[-1]}".rstrip())
    more = facts.needs.height - len(rows)
    if more:
        out.append(
            f"... and {more} more (--show 0 lists them all; --export-failed FILE --input INPUT "
            "writes them as a corrections file)"
        )
    note = record_note(facts, lines, len(rows))
    if note:
        out.append(note)
    return "\n".join(out)


def record_note(facts: ResultFacts, lines: Mapping[int, int], shown: int) -> str | None:
    """What ``record N`` means for this run's input, when a listing shows it for a text file
    (in a Parquet file the Nth record is all there is to say)."""
    if len(lines) >= shown:
        return None
    suffix = Path(facts.input_path or "").suffix.lower()
    if suffix == ".csv":
        return (
            "record N: the Nth record after the header, not always line N+1 (a quoted field may "
            "span lines); --input INPUT gives the line where each row starts"
        )
    if suffix in (".ndjson", ".jsonl"):
        return "record N: the Nth line that is not blank; --input INPUT gives line numbers"
    return None


def listing_json(facts: ResultFacts, show: int, lines: Mapping[int, int]) -> str:
    """``report --failed --json``: the same rows as a JSON list, with ``record`` (1-based)
    and ``line`` (null unless the input was read for it)."""
    items = [
        {"record": row["row"] + 1, "line": lines.get(row["row"]), **row}
        for row in shown_rows(facts, show)
    ]
    return json.dumps(items, ensure_ascii=False)


def left_out(facts: ResultFacts, show: int) -> int:
    """How many rows that need a human a listing of ``show`` rows leaves out."""
    return 0 if show == 0 else max(facts.needs.height - show, 0)


def _cells(row: dict[str, Any], lines: Mapping[int, int]) -> tuple[str, ...]:
    return (
        str(row["row"]),
        where(row["row"], lines),
        _cut(printable(row["call_id"])),
        _cut(printable(row["template_key"])),
        str(row["status"]) + (" (retryable)" if row["retryable"] else ""),
        printable(row["error_code"]),
        printable(row["message"]),
    )


def printable(value: object) -> str:
    """A value as a terminal may show it: ``-`` for none, every control character escaped (a
    call id comes from the input file and must not move the cursor or change colours)."""
    if value is None or value == "":
        return "-"
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _cut(text: str) -> str:
    return text if len(text) <= _WIDEST else text[: _WIDEST - 1] + "…"
