"""Progress while the run goes and the end-of-run summary. The only home of tqdm.

On a terminal a tqdm bar (rows/s, ETA, counts); otherwise a plain log line every
``log_interval`` seconds for cron and Airflow logs. Progress is read from counters on a timer,
never per row (performance.md rule 16).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

from allo_batch.models import DEFERRED_REASONS, STATUSES, SUCCESS, InputCheck, RunSummary


class Reporter(Protocol):
    """Receives progress snapshots."""

    def start(self, total: int) -> None:
        """The input has ``total`` rows."""

    def update(
        self,
        done: int,
        counts: Counter[str],
        rate: float | None,
        *,
        unreachable_for: float | None = None,
    ) -> None:
        """Rows accounted for so far, per status, the achieved request rate, and how long the
        API has been unreachable (None while it answers)."""

    def close(self) -> None:
        """The run is over."""


class NullReporter:
    """Shows nothing (tests, ``--no-progress`` with no log interval, the Python API)."""

    def start(self, total: int) -> None:
        """Ignore the total."""

    def update(
        self,
        done: int,
        counts: Counter[str],
        rate: float | None,
        *,
        unreachable_for: float | None = None,
    ) -> None:
        """Ignore progress."""

    def close(self) -> None:
        """Nothing to close."""


class TqdmReporter:
    """A progress bar on stderr."""

    def __init__(self, total: int | None) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True)
        self._shown = 0

    def start(self, total: int) -> None:
        """Set the bar's total so it shows a percentage and an ETA."""
        self._bar.total = total
        self._bar.refresh()

    def update(
        self,
        done: int,
        counts: Counter[str],
        rate: float | None,
        *,
        unreachable_for: float | None = None,
    ) -> None:
        """Advance the bar and show the counts."""
        self._bar.set_postfix_str(_counts_text(counts, rate, unreachable_for), refresh=False)
        self._bar.update(done - self._shown)
        self._shown = done

    def close(self) -> None:
        """Finish the bar."""
        self._bar.close()


class _Periodic:
    """What the periodic reporters share: the total, the interval and the ETA."""

    def __init__(self, total: int | None, interval: float) -> None:
        self._total = total
        self._interval = interval
        self._started = time.monotonic()
        self._next = self._started + interval

    def start(self, total: int) -> None:
        """Remember the total; the first line comes one interval from now."""
        self._total = total
        self._started = time.monotonic()
        self._next = self._started + self._interval

    def _due(self) -> float | None:
        """The time now if a line is due (and the next one is scheduled), else None."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self._interval
        return now

    def _eta(self, done: int, now: float) -> float | None:
        """Seconds left at the rate so far, when the total is known."""
        if not self._total or not done:
            return None
        return (self._total - done) * (now - self._started) / done

    def close(self) -> None:
        """Nothing to close."""


class LogReporter(_Periodic):
    """A plain line every ``interval`` seconds (not a terminal: cron, Airflow)."""

    def __init__(self, total: int | None, interval: float, stream: TextIO | None = None) -> None:
        super().__init__(total, interval)
        self._stream = stream or sys.stderr

    def update(
        self,
        done: int,
        counts: Counter[str],
        rate: float | None,
        *,
        unreachable_for: float | None = None,
    ) -> None:
        """Write a line when the interval has passed."""
        now = self._due()
        if now is None:
            return
        of = f"/{self._total} ({100 * done // max(self._total, 1)}%)" if self._total else ""
        left = self._eta(done, now)
        eta = f", ETA {_duration(left)} (ends ~{_clock_in(left)})" if left is not None else ""
        line = f"allo-batch: {done}{of} rows, {_counts_text(counts, rate, unreachable_for)}{eta}"
        print(line, file=self._stream, flush=True)


class JsonLog:
    """``--log-format json``: one JSON object per line on stderr, for log shippers.

    Every object has ``ts`` (UTC, ISO 8601), ``event`` and that event's fields. Events: ``start``,
    ``progress``, ``warning``, ``skip``, ``stop`` and ``summary``. None carries a row's content or
    the key: only counts, paths, codes and the run's own messages.
    """

    def __init__(self, stream: TextIO | None = None, **context: Any) -> None:
        self._stream = stream
        self.context = {k: v for k, v in context.items() if v is not None}

    def line(self, event: str, **fields: Any) -> str:
        """One event as a JSON line (``None`` fields left out)."""
        from datetime import UTC, datetime

        record = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
            **self.context,
            **{k: v for k, v in fields.items() if v is not None},
        }
        return json.dumps(record, default=str)

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event line to stderr."""
        print(self.line(event, **fields), file=self._stream or sys.stderr, flush=True)


class JsonLogReporter(_Periodic):
    """Progress as ``start`` and periodic ``progress`` events of a :class:`JsonLog`."""

    def __init__(self, log: JsonLog, interval: float, **start_fields: Any) -> None:
        super().__init__(None, interval)
        self._log = log
        self._start_fields = start_fields

    def start(self, total: int) -> None:
        """Emit ``start`` with the row count."""
        super().start(total)
        self._log.emit("start", rows=total, **self._start_fields)

    def update(
        self,
        done: int,
        counts: Counter[str],
        rate: float | None,
        *,
        unreachable_for: float | None = None,
    ) -> None:
        """Emit ``progress`` when the interval has passed."""
        now = self._due()
        if now is None:
            return
        eta = self._eta(done, now)
        self._log.emit(
            "progress",
            done=done,
            rows=self._total,
            by_status={s: counts[s] for s in STATUSES if counts.get(s)},
            requests_per_second=round(rate, 2) if rate else None,
            eta_seconds=round(eta, 1) if eta is not None else None,
            expected_end=_wall_in(eta) if eta is not None else None,
            unreachable_seconds=round(unreachable_for) if unreachable_for else None,
            note=_unreachable_text(unreachable_for),
        )


def _counts_text(
    counts: Counter[str], rate: float | None, unreachable_for: float | None = None
) -> str:
    parts = [f"{s} {counts[s]}" for s in STATUSES if counts.get(s)]
    if rate:
        parts.append(f"{rate:.1f} req/s")
    note = _unreachable_text(unreachable_for)
    if note:
        parts.append(note)
    return ", ".join(parts) or "starting"


def _unreachable_text(seconds: float | None) -> str | None:
    """Shown while the API has been failing for a while: the run waits, it has not hung."""
    if seconds is None or seconds < 1:
        return None
    return f"API unreachable for {seconds:.0f} s, retrying"


def _wall_in(seconds: float) -> str:
    """The UTC time ``seconds`` from now, ISO 8601."""
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="seconds")


def _clock_in(seconds: float) -> str:
    """The local clock time ``seconds`` from now, as people read it."""
    return time.strftime("%H:%M", time.localtime(time.time() + seconds))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_summary(summary: RunSummary, *, title: str | None = None) -> str:
    """The end-of-run summary as a few human lines, under ``title`` (default: what ran)."""
    what = "dry run" if summary.dry_run else "run"
    lines = [title or f"allo-batch {what}: {summary.rows} rows"]
    for status in STATUSES:
        if summary.by_status.get(status):
            lines.append(f"  {status:<9} {summary.by_status[status]}")
    if summary.by_error_code:
        lines.append("  by error code:")
        for code, count in sorted(summary.by_error_code.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {code:<32} {count}")
    if summary.changes:
        found = ", ".join(f"{n} {change}" for change, n in sorted(summary.changes.items()))
        lines.append(f"  targets   read first: {found}")
    if summary.requests:
        lines.append(
            f"  requests  {summary.requests} {_pace(summary)}; 429s: {summary.rate_limited}"
        )
        if summary.latency_p50_ms is not None:
            p50, p95 = summary.latency_p50_ms, summary.latency_p95_ms or 0.0
            lines.append(f"  latency   p50 {p50:.0f} ms, p95 {p95:.0f} ms")
    if summary.expected_write_seconds is not None:
        lines.append(
            f"  writes    would take about {_duration(summary.expected_write_seconds)}"
            f" at {summary.rate_limit:g}/s"
        )
    if summary.verified is not None:
        lines.append(
            f"  verify    {summary.verified} read back, {summary.verify_differs} differ"
            + (" (listed in the sidecar)" if summary.verify_differs else "")
        )
    if summary.in_doubt_resent:
        lines.append(
            f"  resent {summary.in_doubt_resent} rows whose earlier answer was lost in flight"
        )
    if summary.stopped_reason:
        lines.append(f"  stopped: {summary.stopped_reason}")
    if summary.output:
        lines.append(f"  results: {summary.output}")
    lines.append(f"  exit code {summary.exit_code}")
    return "\n".join(lines)


def _pace(summary: RunSummary) -> str:
    """The rate the requests went out at, against the key's limit. Requests sent within a
    second have no rate to speak of: a window's allowance may go out at once (a fixed window
    lets it), and 5 requests "at 835/s of a 50/s limit" read like a broken limit; nor do those
    of a few windows that went out above the limit's rate."""
    rate, requests = summary.achieved_rate, summary.requests
    if not rate:
        return "at n/a"
    limit = f"a {summary.rate_limit:g}/s limit" if summary.rate_limit else None
    span = (requests - 1) / rate
    if span < 1.0:
        return "within a second" + (f", under {limit}" if limit else "")
    if summary.rate_limit and rate > summary.rate_limit:
        # A few windows, each allowance sent as its window opened: over the span from the
        # first request to the last the rate can top the limit that no window exceeded.
        return f"in {span:.1f} s, each window's allowance of {limit}"
    return f"at {rate:.2f}/s" + (f" of {limit}" if limit else "")


def format_input_check(found: InputCheck) -> str:
    """The ``validate`` report: counts, then each error code with a few example rows
    (numbered like the result file, 0-based, with the line each starts on in the file)."""
    valid = found.rows - found.invalid
    lines = [
        f"{found.path}: {found.rows} rows, {valid} valid, {found.invalid} invalid"
        + (f", {found.repeats} exact repeats (sent once)" if found.repeats else "")
    ]
    for code, count in sorted(found.codes.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {code}: {count}")
        lines.extend(f"    {_where(row, found)}: {text}" for row, text in found.examples[code])
    return "\n".join(lines)


def _where(row: int, found: InputCheck) -> str:
    """A row as people find it: its line in the file when known, else its record number."""
    line = found.lines.get(row)
    return f"row {row} (line {line})" if line else f"row {row} (record {row + 1})"


def summary_json(summary: RunSummary) -> str:
    """The summary as one JSON object."""
    return json.dumps(summary.as_dict(), sort_keys=True)


_COUNTED_FROM_THE_FILE: Final = frozenset(
    {"rows", "by_status", "by_error_code", "output", "exit_code"}
)


def summarize_file(path: Path) -> RunSummary:
    """The summary of any result file, plus run figures from its sidecar when present."""
    import polars as pl

    from allo_batch.record import read_results, read_sidecar

    frame = read_results(path)
    by_status = dict(frame.group_by("status").len().iter_rows())
    codes = frame.filter(pl.col("error_code").is_not_null()).group_by("error_code").len()
    summary = RunSummary(
        rows=frame.height,
        by_status={k: int(v) for k, v in by_status.items()},
        by_error_code={k: int(v) for k, v in codes.iter_rows()},
        output=str(path),
    )
    sidecar: dict[str, Any] = read_sidecar(path).get("summary", {})
    # Every figure the run recorded (reads, verification, changes, ...), but the counts, which
    # the file itself gives (a later rerun or merge may have changed them).
    for name in {f.name for f in dataclasses.fields(RunSummary)} - _COUNTED_FROM_THE_FILE:
        if name in sidecar:
            setattr(summary, name, sidecar[name])
    if summary.stopped_reason:
        summary.exit_code = int(sidecar.get("exit_code", 3))
    else:
        deferred = frame.filter(
            (pl.col("status") == "not_sent") & pl.col("reason").is_in(DEFERRED_REASONS)
        ).height
        summary.exit_code = exit_code_for(summary.by_status, deferred=deferred)
    return summary


def unfinished_result_file(path: Path) -> str | None:
    """What to say of a result file that is missing because its run was cut off (``kill -9``,
    a lost machine) before writing it: its journal is there, and a rerun writes it."""
    from allo_batch.record import journal_path

    if path.exists() or not journal_path(path).exists():
        return None
    return (
        f"{path} is not written yet: a run into it was cut off before the end (its journal, "
        f"{journal_path(path).name}, keeps what landed). Run the same command again, with the "
        "same --output, to finish it and write the result file"
    )


def exit_code_for(by_status: dict[str, int], *, deferred: int = 0) -> int:
    """0 when every row's target holds its content (updated, unchanged, skipped), the
    ``deferred`` not_sent rows aside; else 1."""
    not_done = sum(n for s, n in by_status.items() if s not in SUCCESS) - deferred
    return 1 if not_done > 0 else 0


class RunConsole:
    """Where ``run`` tells what happens: lines for people, or JSON events (``--log-format``).

    It writes to whatever ``sys.stdout``/``sys.stderr`` are at the time (click's test runner
    swaps them). The summary goes to stdout as JSON with ``as_json``.
    """

    def __init__(self, log_format: str = "text", *, as_json: bool = False) -> None:
        self.as_json = as_json
        self.log: JsonLog | None = None
        self.use(log_format)

    def use(self, log_format: str, **context: Any) -> None:
        """Switch to ``log_format`` (a job spec may set it), with fields for every event."""
        self.log = JsonLog(**context) if log_format == "json" else None

    def log_line(self, level: str, message: str) -> str:
        """How a warning of the ``allo_batch`` logger reads in this console."""
        if self.log is not None:
            return self.log.line(level, message=message)
        return f"allo-batch: {level.upper()}: {message}"

    def reporter(self, config: Any) -> Reporter:
        """The progress reporter of one run."""
        if self.log is not None:
            return JsonLogReporter(
                self.log,
                config.log_interval,
                input=str(config.input),
                output=str(config.output_path),
                dry_run=config.dry_run,
            )
        if config.progress:
            return TqdmReporter(total=None)
        return LogReporter(total=None, interval=config.log_interval)

    def starting(self, config: Any) -> None:
        """Say where the results go before the run starts (a person must know where to look)."""
        if self.log is None and not self.as_json:
            _say(f"allo-batch: {config.input} -> {config.output_path}")

    def summary(self, summary: RunSummary, config: Any) -> None:
        """The end-of-run summary: stdout with --json; stderr as text or a ``summary`` event."""
        if self.as_json:
            _say(summary_json(summary), sys.stdout)
        if self.log is not None:
            self.log.emit("summary", input=str(config.input), **summary.as_dict())
        elif not self.as_json:
            _say(format_summary(summary))

    def failed(self, message: str, exit_code: int, config: Any = None) -> None:
        """A run that stopped or never started."""
        if self.log is not None:
            where = {"input": str(config.input)} if config is not None else {}
            self.log.emit("stop", exit_code=exit_code, reason=message, **where)
        else:
            _say(f"allo-batch: {message}")

    def skipped(self, message: str, exit_code: int = 0) -> None:
        """Files of a job left alone: none matched today, or a stop came first."""
        if self.log is not None:
            self.log.emit("skip", exit_code=exit_code, reason=message)
        else:
            _say(f"allo-batch: {message}")


def _say(text: str, stream: TextIO | None = None) -> None:
    """One message on stderr (or ``stream``), as it is at the time of writing."""
    out = stream or sys.stderr
    out.write(text + "\n")
    out.flush()


class ConsoleLogHandler(logging.Handler):
    """The ``allo_batch`` logger's warnings (a lock taken over, --force, a readable key file),
    one line each in the console's format, on whatever ``sys.stderr`` is at the time."""

    def __init__(self) -> None:
        super().__init__()
        self.console: RunConsole | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record as one line."""
        level, message = record.levelname.lower(), record.getMessage()
        if self.console is not None:
            _say(self.console.log_line(level, message))
        else:
            _say(f"allo-batch: {level.upper()}: {message}")

    def install(self) -> None:
        """Make this the ``allo_batch`` logger's only output (once per process)."""
        log = logging.getLogger("allo_batch")
        if self not in log.handlers:
            log.addHandler(self)
            log.setLevel(logging.INFO)
            log.propagate = False
