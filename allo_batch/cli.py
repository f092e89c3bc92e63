"""The command line. Only translates: options → configuration, library call, error → exit code.

Heavy libraries (polars, httpx, uvicorn) are imported inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

_TEXT_LOG_FORMAT = "allo-batch: %(levelname)s: %(message)s"


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
        handler.setFormatter(logging.Formatter(_TEXT_LOG_FORMAT))
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
@click.argument("input_path", metavar="[INPUT]", required=False, type=click.Path(path_type=Path))
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
@click.option(
    "--job",
    "job_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Job spec (TOML, see jobs/); options given here override it.",
)
@click.option(
    "--ds",
    envvar="ALLO_BATCH_DS",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="With --job: the date of {ds} [env ALLO_BATCH_DS; default: today].",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="stderr: lines for people, or one JSON object per line (no progress bar).",
)
@click.pass_context
def run(ctx: click.Context, /, input_path: Path | None, **options: Any) -> None:
    """Send the corrections in INPUT (CSV, Parquet or NDJSON of call_id, template_key, content).

    \b
    Exit codes: 0 every row updated (now or earlier), 1 some rows invalid or failed,
    2 bad usage or unreadable input (nothing sent), 3 stopped early (key refused,
    --max-errors, API unavailable, another run holds the output), 130 interrupted
    (a rerun resumes). With --job and an input glob, each file is its own run, the
    exit code is the highest of theirs, and a stop (3, 130) leaves the later files.

    \b
    Examples:
      ALLO_API_KEY=... allo-batch run corrections.parquet -o corrections.results.parquet
      allo-batch run --job jobs/nightly.toml --ds 2026-11-23 --log-format json
    """
    from allo_batch.errors import AlloBatchError

    explicit = {
        name
        for name in options
        if ctx.get_parameter_source(name)
        in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    }
    console = _Console(options["log_format"], as_json=options["as_json"])
    with _exit_130_on_signals(console):
        try:
            plans = _plan_runs(input_path, options, explicit, console)
        except AlloBatchError as error:
            console.failed(error)
            sys.exit(int(error.exit_code))
        codes: list[int] = []
        for done, config in enumerate(plans):
            codes.append(_run_one(config, console))
            if codes[-1] >= _STOPPED and done + 1 < len(plans):
                # A stop (key refused, API down, Ctrl-C) would stop the next file too.
                left = ", ".join(str(later.input) for later in plans[done + 1 :])
                console.skipped(f"not started after the stop above: {left}", codes[-1])
                break
        sys.exit(max(codes, default=0))


def _plan_runs(
    input_path: Path | None, options: dict[str, Any], explicit: set[str], console: _Console
) -> list[Any]:
    """The configurations to run: one, or with ``--job`` one per matching input file."""
    import datetime as dt

    from allo_batch.config import api_key_from
    from allo_batch.errors import UsageError
    from allo_batch.jobspec import load_spec, plan_files, spec_api_key

    job_file: Path | None = options["job_file"]
    if job_file is None:
        if input_path is None:
            msg = "give INPUT, or --job with a job spec"
            raise UsageError(msg)
        if options["ds"] is not None:
            msg = "--ds only applies with --job"
            raise UsageError(msg)
        key_file = options["api_key_file"]
        key = None if options["use_sandbox"] else api_key_from(key_file=key_file)
        return [_config(input_path, options["output"], options, {}, key)]
    spec = load_spec(job_file)
    for name, option in _SPEC_OPTIONS.items():
        if option not in explicit and spec.get(name) is not None:
            options[option] = spec.get(name)
    console.use(options["log_format"], job=spec.name)
    ds = options["ds"].date() if options["ds"] else dt.date.today()
    console.context(ds=ds.isoformat())
    files = plan_files(spec, ds=ds, input_override=input_path, output_override=options["output"])
    if not files:
        pattern = spec.get("input")
        if spec.get("if_no_input", "fail") == "skip":
            console.skipped(
                f"{job_file}: no input file matches {pattern!r} for {ds}; nothing to do"
            )
            return []
        msg = f"{job_file}: no input file matches {pattern!r} for {ds}"
        raise UsageError(msg)
    if options["use_sandbox"] or options["dry_run"]:  # a dry run needs no key
        key = None
    elif "api_key_file" in explicit:
        key = api_key_from(key_file=options["api_key_file"])
    else:
        key = spec_api_key(spec)
    columns = dict(spec.get("columns", {}))
    log_interval = spec.get("log_interval")
    configs = []
    for planned in files:
        if planned.output is not None:
            try:
                planned.output.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                msg = f"{planned.output.parent}: cannot make the output folder ({exc.strerror})"
                raise UsageError(msg) from exc
        configs.append(
            _config(planned.input, planned.output, options, columns, key, log_interval=log_interval)
        )
    return configs


_STOPPED = 3  # exit codes from here on end a run early: later files of a job are not started

# Job-spec keys that have a ``run`` option of their own (which wins when given).
_SPEC_OPTIONS = {
    "format": "input_format",
    "base_url": "base_url",
    "rate": "rate",
    "concurrency": "concurrency",
    "timeout": "timeout",
    "max_attempts": "max_attempts",
    "max_errors": "max_errors",
    "limit": "limit",
    "log_format": "log_format",
}


def _config(
    input_path: Path,
    output: Path | None,
    options: dict[str, Any],
    columns: dict[str, str],
    key: Any,
    *,
    log_interval: float | None = None,
) -> Any:
    from allo_batch.config import JobConfig, RetryPolicy, SandboxOptions, parse_column_mapping
    from allo_batch.constants import DEFAULT_BASE_URL

    progress = options["progress"]
    config = JobConfig(
        input=input_path,
        output=output,
        input_format=options["input_format"],
        columns={**columns, **parse_column_mapping(options["columns"])},
        base_url=options["base_url"] or DEFAULT_BASE_URL,
        api_key=key,
        rate=options["rate"],
        concurrency=options["concurrency"],
        timeout=options["timeout"],
        retry=RetryPolicy(max_attempts=options["max_attempts"]),
        max_errors=options["max_errors"],
        limit=options["limit"],
        dry_run=options["dry_run"],
        force=options["force"],
        sandbox=SandboxOptions(
            world_file=options["sandbox_world"],
            write_rate=options["sandbox_rate"],
            faults=options["sandbox_faults"],
            seed=options["sandbox_seed"],
        )
        if options["use_sandbox"]
        else None,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    return dataclasses.replace(config, log_interval=log_interval) if log_interval else config


def _run_one(config: Any, console: _Console) -> int:
    """Run one configuration; report its summary or its stop; return its exit code."""
    from allo_batch.errors import AlloBatchError
    from allo_batch.pipeline import run_job

    try:
        summary = run_job(config, reporter=console.reporter(config))
    except AlloBatchError as error:
        partial = getattr(error, "summary", None)
        if partial is not None:
            console.summary(partial, config)
        console.failed(error, config)
        return int(error.exit_code)
    console.summary(summary, config)
    return int(summary.exit_code)


class _Console:
    """Where ``run`` tells what happens: lines for people, or JSON events (``--log-format``)."""

    def __init__(self, log_format: str, *, as_json: bool) -> None:
        self.as_json = as_json
        self.log: Any = None
        self.use(log_format)

    def use(self, log_format: str, **context: Any) -> None:
        """Switch to ``log_format`` (a job spec may set it), with fields for every event."""
        import logging

        from allo_batch.report import JsonLog

        self.log = JsonLog(**context) if log_format == "json" else None
        formatter: logging.Formatter = (
            _json_log_formatter(self.log) if self.log else logging.Formatter(_TEXT_LOG_FORMAT)
        )
        for handler in logging.getLogger("allo_batch").handlers:
            handler.setFormatter(formatter)

    def context(self, **fields: Any) -> None:
        """Add fields to every later JSON event."""
        if self.log is not None:
            self.log.context.update(fields)

    def reporter(self, config: Any) -> Any:
        """The progress reporter of one run."""
        from allo_batch.report import JsonLogReporter, LogReporter, TqdmReporter

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

    def summary(self, summary: Any, config: Any) -> None:
        """The end-of-run summary: stdout with --json; stderr as text or a ``summary`` event."""
        from allo_batch.report import format_summary, summary_json

        if self.as_json:
            click.echo(summary_json(summary))
        if self.log is not None:
            self.log.emit("summary", input=str(config.input), **summary.as_dict())
        elif not self.as_json:
            click.echo(format_summary(summary), err=True)

    def failed(self, error: Exception, config: Any = None) -> None:
        """A run that stopped or never started."""
        from allo_batch.errors import AlloBatchError

        code = int(error.exit_code) if isinstance(error, AlloBatchError) else 2
        if self.log is not None:
            where = {"input": str(config.input)} if config is not None else {}
            self.log.emit("stop", exit_code=code, reason=str(error), **where)
        else:
            click.echo(f"allo-batch: {error}", err=True)

    def skipped(self, message: str, exit_code: int = 0) -> None:
        """Files of a job left alone: none matched today, or a stop came first."""
        if self.log is not None:
            self.log.emit("skip", exit_code=exit_code, reason=message)
        else:
            click.echo(f"allo-batch: {message}", err=True)

    def interrupted(self, name: str) -> None:
        """A signal outside the send phase."""
        reason = f"interrupted by {name}; a rerun resumes from here"
        if self.log is not None:
            self.log.emit("stop", exit_code=130, reason=reason)
        else:
            click.echo(f"allo-batch: {reason}", err=True)


def _json_log_formatter(log: Any) -> Any:
    """A logging formatter that turns ``allo_batch`` records into ``warning`` (…) events."""
    import logging

    class JsonLogFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return str(log.line(record.levelname.lower(), message=record.getMessage()))

    return JsonLogFormatter()


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
def _exit_130_on_signals(console: _Console) -> Iterator[None]:
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
        console.interrupted(signal.Signals(stop.args[0]).name)
        sys.exit(130)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main() -> None:
    """Console-script entry point."""
    cli()
