"""``validate``, ``diff`` and ``report``: the commands that read and tell."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

import click

from allo_batch.cli import _exit_130_on_signals, _fail, cli
from allo_batch.cli.options import (
    DIFF_OPTIONS,
    LOCAL_PATH,
    LOCATION,
    MAX_SHOWN,
    REPORT_OPTIONS,
    RESULT_FILE,
    column_option,
    declared,
    picked_options,
)
from allo_batch.errors import AlloBatchError
from allo_batch.options import RunOptions


@cli.command()
@click.argument("input_path", metavar="INPUT", type=LOCATION)
@picked_options("format")
@column_option
@declared(
    [
        (
            ["--show"],
            {
                "type": click.IntRange(min=0, max=MAX_SHOWN),
                "default": 5,
                "show_default": True,
                "help": "Example rows shown per error code.",
            },
        )
    ]
)
def validate(input_path: Any, format: str | None, columns: tuple[str, ...], show: int) -> None:
    """Check INPUT locally and print a report; send nothing. Exit 1 if any row is invalid."""
    from allo_batch.config import JobConfig, parse_column_mapping
    from allo_batch.pipeline import check_input
    from allo_batch.report import format_input_check

    with _exit_130_on_signals():
        try:
            config = JobConfig(
                input=input_path,
                input_format=cast(Any, format),
                columns=parse_column_mapping(columns),
            )
            found = check_input(config, show=show)
        except AlloBatchError as error:
            _fail(error)
    click.echo(format_input_check(found))
    sys.exit(1 if found.invalid else 0)


@cli.command()
@click.argument("input_path", metavar="INPUT", type=LOCAL_PATH)
@column_option
@declared(DIFF_OPTIONS)
@picked_options("format", "base_url", "rate", "timeout", "auth", "limit")
def diff(
    input_path: Path,
    output: Path | None,
    columns: tuple[str, ...],
    api_key_file: Path | None,
    show: int,
    html_page: Path | None,
    **table: Any,
) -> None:
    """Preview what `run` would change: read every valid row's target, send nothing.

    Prints the counts (changed, unchanged, no_summary, not_found, invalid, repeat) and the
    first --show unified diffs; writes a preview file with one row per input row (no content).
    """
    from allo_batch.config import parse_column_mapping
    from allo_batch.jobspec import RunRequest, configs_for
    from allo_batch.pipeline import preview_input
    from allo_batch.preview import write_html

    with _exit_130_on_signals():
        try:
            request = RunRequest(
                input=input_path,
                options=RunOptions(**table),
                columns=parse_column_mapping(columns),
                api_key_file=api_key_file,
            )
            [config] = configs_for(request).configs
            target = output or input_path.with_name(f"{input_path.stem}.preview.csv")
            found = preview_input(config, target, show=show, html=html_page)
            if html_page is not None:
                write_html(found, html_page)
        except AlloBatchError as error:
            _fail(error)
    click.echo("\n".join(found.summary_lines()))
    color = sys.stdout.isatty()
    for change in found.shown[:show]:
        click.echo(f"\n{change.title}")
        for line in change.unified():
            fg = "green" if line.startswith("+") else "red" if line.startswith("-") else None
            click.echo(click.style(line, fg=fg) if color and fg else line)


@cli.command()
@click.argument("result", type=RESULT_FILE)
@column_option
@declared(REPORT_OPTIONS)
def report(result: Path, **options: Any) -> None:
    """Summarise a result file: counts per status and error code, and the run's figures; or
    list, export or chart its rows and its run (--failed, --export-failed, --html)."""
    from allo_batch.review import ReportRequest, review

    with _exit_130_on_signals():
        try:
            out = review(ReportRequest(result, **options))
        except AlloBatchError as error:
            _fail(error)
    for note in out.notes:
        click.echo(note, err=True)
    if out.text:
        click.echo(out.text)
