"""``run`` and ``undo``: the commands that write."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from allo_batch.cli import _STATE, _exit_130_on_signals, _fail, cli
from allo_batch.cli.options import (
    LOCATION,
    RESULT_FILE,
    RUN_EXTRA_OPTIONS,
    UNDO_OPTIONS,
    column_option,
    declared,
    picked_options,
    table_options,
)
from allo_batch.errors import AlloBatchError
from allo_batch.options import RunOptions


@cli.command()
@click.argument("input_path", metavar="[INPUT]", required=False, type=LOCATION)
@column_option
@table_options
@declared(RUN_EXTRA_OPTIONS)
def run(
    input_path: Any,
    output: Any,
    storage_options: tuple[str, ...],
    columns: tuple[str, ...],
    api_key_file: Path | None,
    dry_run: bool,
    force: bool,
    use_sandbox: bool,
    sandbox_world: Path | None,
    sandbox_rate: int,
    sandbox_faults: str | None,
    sandbox_seed: int,
    sandbox_persona: str,
    progress: bool | None,
    as_json: bool,
    job_file: Path | None,
    ds: datetime | None,
    **table: object,
) -> None:
    """Send the corrections in INPUT (CSV, Parquet or NDJSON of call_id, template_key, content).

    \b
    Exit codes: 0 every row updated (now or earlier), 1 some rows invalid or failed,
    2 bad usage or unreadable input (nothing sent), 3 stopped early (key refused,
    --max-errors, API unreachable past --max-outage, another run holds the output),
    70 internal error (a bug; a rerun resumes), 130 interrupted (a rerun resumes).
    With --job and an input glob, each file is its own run, the exit code is the highest
    of theirs, and a stop (3, 130) leaves the later files; a local file refused (2) before
    any is sent leaves them all.

    \b
    Examples:
      ALLO_API_KEY=... allo-batch run corrections.parquet -o corrections.results.parquet
      allo-batch run --job jobs/nightly.toml --ds 2026-11-23 --log-format json
    """
    from allo_batch.config import parse_column_mapping
    from allo_batch.jobspec import RunRequest, configs_for
    from allo_batch.report import RunConsole
    from allo_batch.storage import StorageOptions, local_copies

    console = RunConsole(str(table.get("log_format") or "text"), as_json=as_json)
    _STATE["log"].console = console
    context = click.get_current_context()
    if job_file is None and _from_environment(context, "ds"):
        ds = None  # ALLO_BATCH_DS is for job runs; exported in a shell, it must not break others
    with _exit_130_on_signals(console):
        try:
            if not use_sandbox:
                _refuse_sandbox_options(context)
            request = RunRequest(
                storage_options=StorageOptions.parse(storage_options),
                input=input_path,
                output=output,
                job=job_file,
                ds=ds.date() if ds else None,
                # An absent flag is "not given" (a spec may set it), not False.
                options=RunOptions(**{k: v for k, v in table.items() if v is not False}),  # type: ignore[arg-type]
                columns=parse_column_mapping(columns),
                api_key_file=None if use_sandbox else api_key_file,
                dry_run=dry_run,
                force=force,
                progress=sys.stderr.isatty() if progress is None else progress,
            )
            if use_sandbox:  # the simulator's key, whatever the environment holds
                request = dataclasses.replace(request, api_key=_sandbox_key())
            plan = configs_for(request)
        except AlloBatchError as error:
            console.failed(str(error), int(error.exit_code))
            sys.exit(int(error.exit_code))
        console.use(plan.log_format, job=plan.job, ds=plan.ds.isoformat() if plan.ds else None)
        if plan.nothing_to_do:
            console.skipped(plan.nothing_to_do)
        configs = plan.configs
        with contextlib.ExitStack() as stack:
            if use_sandbox and configs:
                seeds = stack.enter_context(  # an input in a store seeds the world too
                    local_copies(
                        [c.input for c in configs],
                        configs[0].storage_options,
                        configs[0].state_dir,
                    )
                )
                url = stack.enter_context(
                    _embedded_sandbox(
                        seeds,
                        world_file=sandbox_world,
                        write_rate=sandbox_rate,
                        faults=sandbox_faults,
                        seed=sandbox_seed,
                        persona=sandbox_persona,
                    )
                )
                configs = [dataclasses.replace(c, base_url=url) for c in configs]
            sys.exit(_run_all(configs, console))


def _run_all(configs: list[Any], console: Any) -> int:
    from allo_batch.pipeline import JobOutcome, run_jobs

    def show(outcome: JobOutcome) -> None:
        if outcome.summary is not None:
            console.summary(outcome.summary, outcome.config)
        if outcome.error is not None:
            console.failed(str(outcome.error), outcome.exit_code, outcome.config)

    def reporter_for(config: Any) -> Any:
        console.starting(config)
        return console.reporter(config)

    done = run_jobs(configs, reporter_for=reporter_for, on_outcome=show)
    if done.not_started:
        left = ", ".join(str(config.input) for config in done.not_started)
        console.skipped(f"not started {done.why_not_started}: {left}", done.exit_code)
    return done.exit_code


def _refuse_sandbox_options(context: click.Context) -> None:
    """A --sandbox-* option without --sandbox would be dropped, and the run sent to the real
    API: exit 2 instead."""
    from allo_batch.errors import UsageError

    given = [
        f"--{name.replace('_', '-')}"
        for param in context.command.params
        if (name := param.name or "").startswith("sandbox_")
        and context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        raise UsageError(f"{', '.join(given)} only applies with --sandbox")


def _from_environment(context: click.Context, name: str) -> bool:
    return context.get_parameter_source(name) == click.core.ParameterSource.ENVIRONMENT


def _sandbox_key() -> Any:
    from allo_batch.config import Secret
    from allo_batch.sandbox.world import DEFAULT_SANDBOX_KEY

    return Secret(DEFAULT_SANDBOX_KEY)


@contextlib.contextmanager
def _embedded_sandbox(inputs: list[Path], **options: Any) -> Iterator[str]:
    try:
        import uvicorn  # noqa: F401

        from allo_batch import sandbox as sb
        from allo_batch.sandbox.background import embedded
    except ImportError:
        _fail(
            AlloBatchError("--sandbox needs the sandbox extra: pip install 'allo-batch[sandbox]'")
        )
    try:
        with embedded(inputs, **options) as running:
            yield running.base_url
    except (sb.WorldError, sb.FaultSpecError, sb.UnknownPersonaError) as exc:
        _fail(AlloBatchError(str(exc)))


@cli.command()
@click.argument("results", type=RESULT_FILE)
@declared(UNDO_OPTIONS)
@picked_options(
    "base_url",
    "rate",
    "concurrency",
    "timeout",
    "max_attempts",
    "max_errors",
    "max_outage",
    "auth",
    "log_format",
    "log_interval",
)
def undo(
    results: Path,
    output: Path | None,
    api_key_file: Path | None,
    dry_run: bool,
    force: bool,
    include_uncertain: bool,
    as_json: bool,
    **table: Any,
) -> None:
    """Put back the before-image of every row RESULTS' run (and its reruns) updated, where the
    target still holds exactly what the run wrote; a target changed since is a `conflict`
    and left alone (--force overrides). The undo is a run of its own: paced, journaled,
    resumable (rerun the same command), with its own result file and before-images.

    \b
    Exit codes as for `run`; 1 when some targets were left alone as conflicts.
    """
    from allo_batch.jobspec import RunRequest, configs_for
    from allo_batch.report import RunConsole
    from allo_batch.undo import mark_undone, plan_undo, unmark_if_nothing_sent

    console = RunConsole(str(table.get("log_format") or "text"), as_json=as_json)
    _STATE["log"].console = console
    with _exit_130_on_signals(console):
        try:
            plan = plan_undo(
                results, output=output, include_uncertain=include_uncertain, force=force
            )
            request = RunRequest(
                input=plan.input,
                output=plan.output,
                options=RunOptions(**table),
                api_key_file=api_key_file,
                dry_run=dry_run,
                progress=sys.stderr.isatty(),
                force=plan.merge,
            )
            configs = configs_for(request).configs
            if not dry_run:
                mark_undone(results, plan.output)
        except AlloBatchError as error:
            console.failed(str(error), int(error.exit_code))
            sys.exit(int(error.exit_code))
        for line in plan.lines():
            console.skipped(line)
        code = _run_all(configs, console)
        if not dry_run:
            unmark_if_nothing_sent(results, plan.output)
        sys.exit(code)
