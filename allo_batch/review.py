"""The ``report`` command's library: after a run, what a person reads and what they fix.

One call, :func:`review`, does what a :class:`ReportRequest` asks and hands back the text for
stdout and the notes for stderr; the command line only prints them. It composes the parts that
each know one stage: :mod:`allo_batch.failed` (the result file), :mod:`allo_batch.corrections`
(the input, read again and checked) and :mod:`allo_batch.report_html` (the page).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from allo_batch import corrections, failed, report_html
from allo_batch.config import parse_column_mapping
from allo_batch.errors import UsageError
from allo_batch.failed import ResultFacts
from allo_batch.lock import refuse_to_overwrite


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """What ``allo-batch report`` was asked for."""

    result: Path
    as_json: bool = False
    failed: bool = False
    show: int = 50  # rows listed by ``failed``; 0 lists them all
    export_failed: Path | None = None
    input_path: Path | None = None
    input_format: str | None = None
    columns: tuple[str, ...] = ()  # --column NAME=FILE_COLUMN, as for ``run``
    html: Path | None = None


@dataclass(slots=True)
class ReportOutput:
    """What to print: ``text`` on stdout (may be empty), ``notes`` one per line on stderr."""

    text: str = ""
    notes: list[str] = field(default_factory=list)


def review(request: ReportRequest) -> ReportOutput:
    """Do what ``request`` asks; raise :class:`~allo_batch.errors.UsageError` (exit 2) when an
    input cannot be checked or a file cannot be written, before writing anything."""
    if request.export_failed is not None and request.input_path is None:
        msg = "--export-failed needs --input INPUT: the run's input, whose rows are written"
        raise UsageError(msg)
    if not (request.failed or request.export_failed or request.html):
        return ReportOutput(text=_summary(request))
    facts = failed.load(request.result)
    if request.html is not None:
        # The run's input as its sidecar recorded it, too: no --input is needed to name it.
        recorded = Path(facts.input_path) if facts.input_path else None
        keep = {
            "the result file": request.result,
            "the input": request.input_path,
            "the run's input": recorded,
        }
        refuse_to_overwrite("--html", request.html, keep)
    out = ReportOutput()
    lines = _lines(request, facts, out)
    if request.failed:
        out.text = (
            failed.listing_json(facts, request.show, lines)
            if request.as_json
            else failed.format_listing(facts, request.show, lines)
        )
        if request.as_json and failed.left_out(facts, request.show):
            out.notes.append(
                f"allo-batch: {failed.left_out(facts, request.show)} more rows need a human "
                "(--show 0 lists them all)"
            )
    if request.html is not None:
        _write_html(request.html, facts, lines)
        out.notes.append(f"allo-batch: wrote {request.html}")
    return out


def _summary(request: ReportRequest) -> str:
    from allo_batch.report import format_summary, summarize_file, summary_json

    summary = summarize_file(request.result)
    if request.as_json:
        return summary_json(summary)
    what = "a dry run" if summary.dry_run else "a run"
    title = f"allo-batch report: {request.result}, {what} of {summary.rows} rows"
    return format_summary(summary, title=title)


def _lines(request: ReportRequest, facts: ResultFacts, out: ReportOutput) -> dict[int, int]:
    """Check the input when one is given, export from it if asked, and return the line numbers
    of the rows a listing or the page shows."""
    if request.input_path is None:
        return {}
    shown = max(request.show if request.failed else 0, report_html.MAX_TABLE_ROWS)
    if request.failed and request.show == 0:
        shown = facts.needs.height
    if not facts.needs.height:
        if request.export_failed is not None:
            out.notes.append("allo-batch: no rows need a human; nothing to export")
        return {}
    source = corrections.open_checked(
        request.input_path,
        corrections.input_format(request.input_path, request.input_format),
        parse_column_mapping(request.columns),
        facts.input_facts,
        request.result,
    )
    if request.export_failed is not None:
        wanted = dict(facts.needs.select("row", "call_id").iter_rows())
        keep_off = [request.result, request.result.with_name(request.result.name + ".run.json")]
        written = corrections.export_rows(source, wanted, request.export_failed, keep_off)
        out.notes.append(
            f"allo-batch: wrote {written} rows of {request.input_path} to "
            f"{request.export_failed}; correct them there, then run that file"
        )
    head = facts.needs.head(shown)
    return corrections.line_numbers(source, dict(head.select("row", "call_id").iter_rows()))


def _write_html(path: Path, facts: ResultFacts, lines: dict[int, int]) -> None:
    """Write the page whole (a temporary file renamed into place), owner-only: it names the
    calls of customers, as the result file does."""
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = report_html.render(facts, lines, generated=generated)
    temp = path.with_name(f".{path.name}.partial")
    try:
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        msg = f"--html {path}: cannot write it ({exc.strerror})"
        raise UsageError(msg) from None
