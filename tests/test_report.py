"""Progress for people (tqdm) and for logs, and the summary of a result file."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from allo_batch.cli import cli
from allo_batch.report import LogReporter, TqdmReporter

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def test_log_reporter_writes_a_line_per_interval_with_eta() -> None:
    """Not on a terminal: one plain line per interval, with counts, rate and ETA."""
    stream = io.StringIO()
    reporter = LogReporter(total=None, interval=0.0, stream=stream)
    reporter.start(200)
    reporter.update(50, Counter(updated=48, failed=2), 4.9)
    line = stream.getvalue().strip()
    assert line.startswith("allo-batch: 50/200 (25%) rows, updated 48, failed 2, 4.9 req/s, ETA ")


def test_log_reporter_stays_quiet_within_the_interval() -> None:
    """No line before the interval has passed."""
    stream = io.StringIO()
    reporter = LogReporter(total=10, interval=3600.0, stream=stream)
    reporter.update(5, Counter(updated=5), None)
    assert stream.getvalue() == ""


def test_tqdm_reporter_counts_rows(capsys: pytest.CaptureFixture[str]) -> None:
    """On a terminal the bar advances to the rows accounted for and shows the counts."""
    reporter = TqdmReporter(total=None)
    reporter.start(10)
    reporter.update(4, Counter(updated=3, invalid=1), 2.0)
    reporter.update(10, Counter(updated=9, invalid=1), 2.0)
    reporter.close()
    err = capsys.readouterr().err
    assert "10/10" in err
    assert "updated 9, invalid 1, 2.0 req/s" in err


def test_report_command_summarises_a_result_file(tmp_path: Path) -> None:
    """`allo-batch report` prints counts per status and error code for any result file."""
    output = tmp_path / "plan.parquet"
    runner = CliRunner()
    planned = runner.invoke(
        cli, ["run", str(SAMPLE / "corrections.csv"), "--dry-run", "-o", str(output)]
    )
    assert planned.exit_code == 1
    result = runner.invoke(cli, ["report", str(output)])
    assert result.exit_code == 0
    assert "292 rows" in result.output
    assert "not_sent  283" in result.output
    assert "INVALID_ITEM_ID                  2" in result.output
    as_json = runner.invoke(cli, ["report", str(output), "--json"])
    assert '"exit_code": 1' in as_json.output


def test_the_summary_says_what_the_reads_found_and_no_rate_for_a_burst() -> None:
    """A dry run with a key counts the changes: the text said only "not_sent 200", as if all
    200 were to be written. Requests sent within a second get no rate: 5 "at 835.79/s of a
    50/s limit" read like a broken limit, while a window's allowance may go out at once."""
    from allo_batch.models import RunSummary
    from allo_batch.report import format_summary

    dry = RunSummary(
        rows=200,
        by_status={"not_sent": 200},
        changes={"changed": 100, "unchanged": 100},
        dry_run=True,
        requests=0,
    )
    assert "  targets   read first: 100 changed, 100 unchanged" in format_summary(dry)
    burst = RunSummary(rows=5, requests=5, achieved_rate=835.79, rate_limit=50)
    assert "  requests  5 within a second, under a 50/s limit; 429s: 0" in format_summary(burst)
    paced = RunSummary(rows=150, requests=150, achieved_rate=49.8, rate_limit=50)
    assert "  requests  150 at 49.80/s of a 50/s limit; 429s: 0" in format_summary(paced)
    windows = RunSummary(rows=143, requests=143, achieved_rate=54.34, rate_limit=50)
    told = format_summary(windows)
    assert "  requests  143 in 2.6 s, each window's allowance of a 50/s limit; 429s: 0" in told
