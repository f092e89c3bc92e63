"""The command line. Only translates: options → configuration, library call, error → exit code.

Heavy libraries (polars, httpx, uvicorn) are imported inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="allo-batch")
def cli() -> None:
    """Apply corrected Allo call summaries in bulk: rate-limited, resumable, accounted for."""
    _setup_logging()


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at the time of writing (click's test runner swaps it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _setup_logging() -> None:
    """Warnings (a lock taken over, --force) go to stderr, one line each."""
    import logging

    log = logging.getLogger("allo_batch")
    if not log.handlers:
        handler = logging.StreamHandler(_CurrentStderr())
        handler.setFormatter(logging.Formatter("allo-batch: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, help="Port; 0 picks a free one.")
@click.option("--api-key", "api_key", default=None, help="The full-scope key [default: generated].")
@click.option("--write-rate", default=5, show_default=True, help="Writes per second per key.")
@click.option("--read-rate", default=20, show_default=True, help="Reads per second per key.")
@click.option(
    "--world",
    "world_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="World JSON: calls with their completed templates, SMS ids, extra keys.",
)
@click.option(
    "--from-input",
    "from_input",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Make every cll- id of this corrections file exist with the templates its rows name.",
)
@click.option("--faults", default=None, help="Fault spec, e.g. latency=50ms,jitter=20ms,503=0.01.")
@click.option("--seed", default=0, show_default=True, help="Seed for reproducible faults.")
def sandbox(
    host: str,
    port: int,
    api_key: str | None,
    write_rate: int,
    read_rate: int,
    world_file: Path | None,
    from_input: Path | None,
    faults: str | None,
    seed: int,
) -> None:
    """Serve a local simulator of the Allo API until Ctrl-C.

    \b
    Fault spec: comma-separated name=value pairs:
      latency=50ms   jitter=20ms   (latency uniform in 50ms ± 20ms)
      500=P          an INTERNAL_SERVER_ERROR envelope (write not applied)
      502=P  503=P   a non-JSON gateway page (write not applied)
      drop=P         the connection closes without a complete answer (not applied)
      stall=P        the write is applied, the answer held back for stall-time
      stall-time=30s
    Decisions depend only on --seed and each target's request count.

    \b
    Inspection (no key): GET /_sandbox/state[?written=1], POST /_sandbox/reset,
    POST /_sandbox/revoke {"key": "..."}.
    """
    import secrets

    from allo_batch import sandbox as sb
    from allo_batch.sandbox.server import base_url_of, bind_socket, make_server
    from allo_batch.sandbox.world import pairs_from_file

    key = api_key or f"ak_sandbox_{secrets.token_hex(8)}"
    try:
        pairs = pairs_from_file(from_input) if from_input else None
        world = sb.build_world(
            world_file=world_file,
            seed_pairs=pairs,
            api_key=key,
            write_rate=write_rate,
            read_rate=read_rate,
        )
        app = sb.create_app(world, faults=faults, seed=seed)
        sock = bind_socket(host, port)
    except (sb.WorldError, sb.FaultSpecError, OSError) as exc:
        raise click.UsageError(str(exc)) from exc
    url = base_url_of(sock)
    click.echo(f"allo-batch sandbox serving {url}", err=False)
    click.echo(f"  full-scope API key: {key}")
    click.echo(f"  calls: {len(world.calls)}, SMS: {len(world.sms)}, keys: {len(world.keys)}")
    click.echo(f"  state: curl {url}/_sandbox/state    stop: Ctrl-C", nl=True)
    # uvicorn re-raises the Ctrl-C it already handled gracefully.
    with contextlib.suppress(KeyboardInterrupt):
        make_server(app, log_level="info").run(sockets=[sock])
    click.echo("allo-batch sandbox stopped")


_FORMATS = click.Choice(["csv", "parquet", "ndjson"])
_format_option = click.option(
    "--format", "input_format", type=_FORMATS, help="Input format [default: from the extension]."
)
_column_option = click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="NAME=FILE_COLUMN",
    help="Map a field to a differently named column, e.g. content=new_summary.",
)


def _fail(error: Exception) -> NoReturn:
    from allo_batch.errors import AlloBatchError

    code = error.exit_code if isinstance(error, AlloBatchError) else 2
    click.echo(f"allo-batch: {error}", err=True)
    sys.exit(int(code))


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Result file (.parquet, .csv, .ndjson) [default: <INPUT stem>.results.parquet].",
)
@_format_option
@_column_option
@click.option(
    "--base-url",
    envvar="ALLO_BASE_URL",
    default=None,
    help="API base URL [env ALLO_BASE_URL; default https://api.withallo.com].",
)
@click.option(
    "--api-key-file",
    type=click.Path(path_type=Path),
    help="File holding the API key [default: env ALLO_API_KEY].",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="Writes per second [default: the key's write_per_second from /v2/api/me, else 5].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    help="Requests in flight [default: from the rate, 2..32].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds per request.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 100),
    default=5,
    show_default=True,
    help="Tries per row for retryable failures (429s not counted).",
)
@click.option(
    "--max-errors", type=click.IntRange(min=1), help="Stop the run after this many failed rows."
)
@click.option("--limit", type=click.IntRange(min=0), help="Only the first N rows (a canary run).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Read, validate and plan; send nothing; still write the result file.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Write into an --output that holds results of a different input.",
)
@click.option(
    "--sandbox",
    "use_sandbox",
    is_flag=True,
    help="Run against an embedded simulator on a free loopback port.",
)
@click.option(
    "--sandbox-world",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --sandbox: a world JSON instead of seeding from the input.",
)
@click.option(
    "--sandbox-rate",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="With --sandbox: the simulated key's writes per second.",
)
@click.option(
    "--sandbox-faults",
    default=None,
    help="With --sandbox: fault spec (see `allo-batch sandbox --help`).",
)
@click.option(
    "--sandbox-seed",
    type=int,
    default=0,
    show_default=True,
    help="With --sandbox: seed for faults.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar [default: on when stderr is a terminal].",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the run summary as one JSON object on stdout."
)
def run(
    input_path: Path,
    output: Path | None,
    input_format: str | None,
    columns: tuple[str, ...],
    base_url: str | None,
    api_key_file: Path | None,
    rate: float | None,
    concurrency: int | None,
    timeout: float,
    max_attempts: int,
    max_errors: int | None,
    limit: int | None,
    dry_run: bool,
    force: bool,
    use_sandbox: bool,
    sandbox_world: Path | None,
    sandbox_rate: int,
    sandbox_faults: str | None,
    sandbox_seed: int,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Send the corrections in INPUT (CSV, Parquet or NDJSON of call_id, template_key, content).

    \b
    Exit codes: 0 every row updated (now or earlier), 1 some rows invalid or failed,
    2 bad usage or unreadable input (nothing sent), 3 stopped early (key refused,
    --max-errors, API unavailable, another run holds the output), 130 interrupted
    (a rerun resumes).

    \b
    Example:
      ALLO_API_KEY=... allo-batch run corrections.parquet -o corrections.results.parquet
    """
    from allo_batch.config import (
        JobConfig,
        RetryPolicy,
        SandboxOptions,
        api_key_from,
        parse_column_mapping,
    )
    from allo_batch.constants import DEFAULT_BASE_URL
    from allo_batch.errors import AlloBatchError

    with _exit_130_on_signals():
        try:
            config = JobConfig(
                input=input_path,
                output=output,
                input_format=input_format,  # type: ignore[arg-type]
                columns=parse_column_mapping(columns),
                base_url=base_url or DEFAULT_BASE_URL,
                api_key=None if use_sandbox else api_key_from(key_file=api_key_file),
                rate=rate,
                concurrency=concurrency,
                timeout=timeout,
                retry=RetryPolicy(max_attempts=max_attempts),
                max_errors=max_errors,
                limit=limit,
                dry_run=dry_run,
                force=force,
                sandbox=SandboxOptions(
                    world_file=sandbox_world,
                    write_rate=sandbox_rate,
                    faults=sandbox_faults,
                    seed=sandbox_seed,
                )
                if use_sandbox
                else None,
                progress=sys.stderr.isatty() if progress is None else progress,
            )
            summary = _run_with_reporter(config)
        except AlloBatchError as error:
            summary = getattr(error, "summary", None)
            if summary is None:
                _fail(error)
            _print_summary(summary, as_json=as_json)
            _fail(error)
        _print_summary(summary, as_json=as_json)
        sys.exit(summary.exit_code)


def _run_with_reporter(config: Any) -> Any:
    from allo_batch.pipeline import run_job
    from allo_batch.report import LogReporter, TqdmReporter

    reporter: Any
    if config.progress:
        reporter = TqdmReporter(total=None)
    else:
        reporter = LogReporter(total=None, interval=config.log_interval)
    return run_job(config, reporter=reporter)


def _print_summary(summary: Any, *, as_json: bool) -> None:
    from allo_batch.report import format_summary, summary_json

    if as_json:
        click.echo(summary_json(summary))
    else:
        click.echo(format_summary(summary), err=True)


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@_format_option
@_column_option
@click.option(
    "--show",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Example rows shown per error code.",
)
def validate(
    input_path: Path, input_format: str | None, columns: tuple[str, ...], show: int
) -> None:
    """Check INPUT locally and print a report; send nothing. Exit 1 if any row is invalid."""
    from allo_batch.config import JobConfig, parse_column_mapping
    from allo_batch.errors import AlloBatchError
    from allo_batch.inspect import validation_report

    try:
        config = JobConfig(
            input=input_path,
            input_format=input_format,  # type: ignore[arg-type]
            columns=parse_column_mapping(columns),
        )
        text, invalid = validation_report(config, show=show)
    except AlloBatchError as error:
        _fail(error)
    click.echo(text)
    sys.exit(1 if invalid else 0)


@cli.command()
@click.argument("result", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def report(result: Path, as_json: bool) -> None:
    """Summarise a result file: counts per status and error code, and the run's figures."""
    from allo_batch.errors import AlloBatchError
    from allo_batch.report import format_summary, summarize_file, summary_json

    try:
        summary = summarize_file(result)
    except AlloBatchError as error:
        _fail(error)
    click.echo(summary_json(summary) if as_json else format_summary(summary))


class _Interrupted(BaseException):
    """SIGINT/SIGTERM outside the send phase (click would turn KeyboardInterrupt into exit 1)."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted(signum)


@contextlib.contextmanager
def _exit_130_on_signals() -> Iterator[None]:
    """For ``run``: while rows are being sent, the run itself handles SIGINT and SIGTERM (stop,
    grace, record, exit 130). Before and after that phase a signal ends the process at once with
    exit 130: the journal keeps whatever landed, and a rerun resumes."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, _interrupt)
    try:
        yield
    except _Interrupted as stop:
        name = signal.Signals(stop.args[0]).name
        click.echo(f"allo-batch: interrupted by {name}; a rerun resumes from here", err=True)
        sys.exit(130)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main() -> None:
    """Console-script entry point."""
    cli()
