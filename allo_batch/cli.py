"""The command line. Only translates: options → a library request, one library call per
command, what to print, and errors → exit codes (README, "Exit codes").

Heavy libraries (polars, httpx, uvicorn) are imported inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import click

from allo_batch.errors import AlloBatchError, ExitCode
from allo_batch.options import OPTIONS, RUN_OPTIONS, Option, RunOptions

F = TypeVar("F", bound=Callable[..., Any])
_STATE: dict[str, Any] = {"debug": False}  # set by the group: --debug, the log handler


class _Group(click.Group):
    """Turns a bug into exit 70 with one line and a saved traceback, never exit 1 (which
    means "some rows failed" to cron and Airflow)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, _Interrupted):
            raise
        except Exception as exc:  # a bug: nothing else reaches here
            _crash(exc)


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="allo-batch")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")
def cli(debug: bool) -> None:
    """Apply corrected Allo call summaries in bulk: rate-limited, resumable, accounted for."""
    from allo_batch.report import ConsoleLogHandler

    _STATE["debug"] = debug
    _STATE.setdefault("log", ConsoleLogHandler()).install()


def _fail(error: AlloBatchError) -> NoReturn:
    click.echo(f"allo-batch: {error}", err=True)
    sys.exit(int(error.exit_code))


def _crash(exc: Exception) -> NoReturn:
    import os
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(exc))
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    path = Path(tempfile.gettempdir()) / f"allo-batch-crash-{stamp}-{os.getpid()}.txt"
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    if _STATE["debug"]:
        click.echo(text, err=True, nl=False)
    click.echo(
        f"allo-batch: internal error ({type(exc).__name__}); this is a bug, not your data. "
        f"Traceback saved to {path}; the journal keeps what landed, a rerun resumes",
        err=True,
    )
    sys.exit(int(ExitCode.INTERNAL))


def _option_decorator(option: Option) -> Callable[[F], F]:
    """One click option from the table in ``allo_batch.options``."""
    if option.kind == "flag":
        return click.option(option.flag, option.name, is_flag=True, default=None, help=option.help)
    kind: Any = str
    if option.choices:
        kind = click.Choice(option.choices)
    elif option.kind == "integer":
        kind = click.IntRange(
            None if option.low is None else int(option.low),
            None if option.high is None else int(option.high),
        )
    elif option.kind == "number":
        kind = click.FloatRange(option.low, option.high, min_open=option.low_open)
    shown = option.default_text or (None if option.default is None else str(option.default))
    help_text = option.help + (f" [default: {shown}]" if shown else "")
    envvar = "ALLO_BASE_URL" if option.name == "base_url" else None
    return click.option(
        option.flag, option.name, type=kind, default=None, help=help_text, envvar=envvar
    )


def _table_options(function: F) -> F:
    for option in reversed(RUN_OPTIONS):
        function = _option_decorator(option)(function)
    return function


def _picked_options(*names: str) -> Callable[[F], F]:
    """Some options of the table (a command that reads, or undoes, but is not ``run``)."""

    def decorate(function: F) -> F:
        for name in reversed(names):
            function = _option_decorator(OPTIONS[name])(function)
        return function

    return decorate


_column_option = click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="NAME=FILE_COLUMN",
    help="Map a field to a differently named column, e.g. content=new_summary.",
)


def _path(**kind: Any) -> click.Path:
    return click.Path(path_type=Path, **kind)


_FILE = _path(exists=True, dir_okay=False)
# fmt: off
_RUN_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [  # not in the table
    (["-o", "--output"], {"type": _path(), "help": "Result file (.parquet, .csv, .ndjson) "
     "[default: <INPUT stem>.results.parquet beside INPUT]."}),
    (["--api-key-file"], {"type": _path(), "help": "File holding the API key alone on one "
     "line [default: env ALLO_API_KEY]."}),
    (["--dry-run"], {"is_flag": True, "help": "Read, validate, plan and (with a key) read the "
     "targets; send nothing; still write the result file."}),
    (["--force"], {"is_flag": True, "help": "Write into an --output that holds results of a "
     "different input."}),
    (["--sandbox", "use_sandbox"], {"is_flag": True, "help": "Run against an embedded "
     "simulator on a free loopback port."}),
    (["--sandbox-world"], {"type": _FILE, "help": "With --sandbox: a world JSON instead of "
     "seeding from the input."}),
    (["--sandbox-rate"], {"type": click.IntRange(min=1), "default": 5, "show_default": True,
     "help": "With --sandbox: the simulated key's writes per second."}),
    (["--sandbox-faults"], {"help": "With --sandbox: fault spec (`allo-batch sandbox -h`)."}),
    (["--sandbox-persona"], {"default": "documented", "show_default": True,
     "help": "With --sandbox: how it answers where the docs are silent."}),
    (["--sandbox-seed"], {"type": int, "default": 0, "show_default": True,
     "help": "With --sandbox: seed for faults."}),
    (["--progress/--no-progress"], {"default": None, "help": "Progress bar [default: on when "
     "stderr is a terminal]."}),
    (["--json", "as_json"], {"is_flag": True, "help": "Print the run summary as one JSON "
     "object on stdout."}),
    (["--job", "job_file"], {"type": _path(dir_okay=False), "help": "Job spec (TOML, see "
     "jobs/); options given here override it."}),
    (["--ds"], {"envvar": "ALLO_BATCH_DS", "type": click.DateTime(formats=["%Y-%m-%d"]),
     "help": "With --job: the date of {ds} [env ALLO_BATCH_DS; default: today]."}),
]
# fmt: on


# fmt: off
_SANDBOX_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [
    (["--host"], {"default": "127.0.0.1", "show_default": True, "help": "Address to listen on."}),
    (["--port"], {"default": 8765, "show_default": True, "help": "Port; 0 picks a free one."}),
    (["--api-key"], {"help": "The full-scope key [default: generated]."}),
    (["--write-rate"], {"default": 5, "show_default": True, "help": "Writes per second per key."}),
    (["--read-rate"], {"default": 20, "show_default": True, "help": "Reads per second per key."}),
    (["--world", "world_file"], {"type": _FILE, "help": "World JSON: calls with their "
     "completed templates, SMS ids, extra keys."}),
    (["--from-input"], {"type": _FILE, "help": "Make every cll- id of this corrections file "
     "exist with the templates its rows name."}),
    (["--faults"], {"help": "Fault spec, e.g. latency=50ms,jitter=20ms,503=0.01."}),
    (["--seed"], {"default": 0, "show_default": True, "help": "Seed for reproducible faults."}),
    (["--persona"], {"default": "documented", "show_default": True, "help": "How the simulator "
     "answers where the API docs are silent (see below)."}),
]
_DIFF_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [
    (["-o", "--output"], {"type": _path(), "help": "Preview file (.csv, .parquet, .ndjson) "
     "[default: <INPUT stem>.preview.csv beside INPUT]."}),
    (["--api-key-file"], {"type": _path(), "help": "File holding the API key."}),
    (["--show"], {"type": click.IntRange(min=0), "default": 5, "show_default": True,
     "help": "Unified diffs printed (the first changed rows)."}),
    (["--html", "html_page"], {"type": _path(dir_okay=False), "help": "Also write a "
     "self-contained page of side-by-side diffs (owner-only: it holds content)."}),
]
_UNDO_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [
    (["-o", "--output"], {"type": _path(), "help": "The undo's result file "
     "[default: <RESULTS>.undo.parquet]."}),
    (["--api-key-file"], {"type": _path(), "help": "File holding the API key."}),
    (["--dry-run"], {"is_flag": True, "help": "Read the targets and say what would be put back "
     "and what conflicts; write nothing."}),
    (["--force"], {"is_flag": True, "help": "Put back even where the target changed since."}),
    (["--include-uncertain"], {"is_flag": True, "help": "Also put back before-images whose "
     "read could not be tied to the row's template."}),
    (["--json", "as_json"], {"is_flag": True, "help": "Print the summary as JSON on stdout."}),
]
_REPORT_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [
    (["--json", "as_json"], {"is_flag": True, "help": "Print the summary (or --failed) as JSON."}),
    (["--failed"], {"is_flag": True, "help": "List the rows to fix by hand (invalid or failed)."}),
    (["--show"], {"type": click.IntRange(min=0), "default": 50, "show_default": True,
     "help": "Rows --failed lists (0: all)."}),
    (["--export-failed"], {"type": _path(dir_okay=False), "help": "Write those rows of --input, "
     "every column, to FILE (.csv, .parquet, .ndjson)."}),
    (["--input", "input_path"], {"metavar": "INPUT", "type": _FILE, "help": "The run's input "
     "(checked against RESULT): for --export-failed, and line numbers."}),
    (["--format", "input_format"], {"type": click.Choice(["csv", "parquet", "ndjson"]),
     "help": "Format of --input [default: from the extension]."}),
    (["--html"], {"type": _path(dir_okay=False), "help": "Write a self-contained HTML report "
     "with plots to FILE."}),
]
# fmt: on


def _declared(options: list[tuple[list[str], dict[str, Any]]]) -> Callable[[F], F]:
    """Click options from a compact table (declarations, keywords)."""

    def decorate(function: F) -> F:
        for declarations, keywords in reversed(options):
            function = click.option(*declarations, **keywords)(function)
        return function

    return decorate


@cli.command()
@click.argument("input_path", metavar="[INPUT]", required=False, type=_path())
@_column_option
@_table_options
@_declared(_RUN_OPTIONS)
def run(
    input_path: Path | None,
    output: Path | None,
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
    of theirs, and a stop (3, 130) leaves the later files.

    \b
    Examples:
      ALLO_API_KEY=... allo-batch run corrections.parquet -o corrections.results.parquet
      allo-batch run --job jobs/nightly.toml --ds 2026-11-23 --log-format json
    """
    from allo_batch.config import parse_column_mapping
    from allo_batch.jobspec import RunRequest, configs_for
    from allo_batch.report import RunConsole

    console = RunConsole(str(table.get("log_format") or "text"), as_json=as_json)
    _STATE["log"].console = console
    with _exit_130_on_signals(console):
        try:
            request = RunRequest(
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
                url = stack.enter_context(
                    _embedded_sandbox(
                        [c.input for c in configs],
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
        console.skipped(f"not started after the stop above: {left}", done.exit_code)
    return done.exit_code


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


class _SandboxCommand(click.Command):
    """``sandbox --help`` ends with the personas and what each one chooses."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from allo_batch.sandbox.personas import describe_personas

        with formatter.section("Personas (--persona)"):
            for line in describe_personas().splitlines():
                formatter.write(f"{'':{formatter.current_indent}}{line}\n")


@cli.command(cls=_SandboxCommand)
@_declared(_SANDBOX_OPTIONS)
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
    persona: str,
) -> None:
    """Serve a local simulator of the Allo API until Ctrl-C.

    \b
    Fault spec: comma-separated name=value pairs:
      latency=50ms   jitter=20ms   (latency uniform in 50ms ± 20ms)
      500=P          an INTERNAL_SERVER_ERROR envelope (write not applied)
      502=P 503=P 504=P  a gateway error: HTML page or envelope, per persona (not applied)
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
    from allo_batch.sandbox.background import serve_forever
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
        serve_forever(
            world,
            key,
            host=host,
            port=port,
            say=click.echo,
            faults=faults,
            seed=seed,
            persona=persona,
        )
    except (sb.WorldError, sb.FaultSpecError, sb.UnknownPersonaError, OSError) as exc:
        raise click.UsageError(str(exc)) from exc


@cli.command()
@click.argument("input_path", metavar="INPUT", type=_path())
@_picked_options("format")
@_column_option
@_declared(
    [
        (
            ["--show"],
            {
                "type": click.IntRange(min=0),
                "default": 5,
                "show_default": True,
                "help": "Example rows shown per error code.",
            },
        )
    ]
)
def validate(input_path: Path, format: str | None, columns: tuple[str, ...], show: int) -> None:
    """Check INPUT locally and print a report; send nothing. Exit 1 if any row is invalid."""
    from allo_batch.config import JobConfig, parse_column_mapping
    from allo_batch.pipeline import check_input
    from allo_batch.report import format_input_check

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
@click.argument("input_path", metavar="INPUT", type=_path())
@_column_option
@_declared(_DIFF_OPTIONS)
@_picked_options("format", "base_url", "rate", "timeout", "auth", "limit")
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

    try:
        request = RunRequest(
            input=input_path,
            options=RunOptions(**table),
            columns=parse_column_mapping(columns),
            api_key_file=api_key_file,
        )
        [config] = configs_for(request).configs
        target = output or input_path.with_name(f"{input_path.stem}.preview.csv")
        found = preview_input(config, target, show=show)
        if html_page is not None:
            write_html(found, html_page)
    except AlloBatchError as error:
        _fail(error)
    click.echo("\n".join(found.summary_lines()))
    color = sys.stdout.isatty()
    for change in found.shown:
        click.echo(f"\n{change.title}")
        for line in change.unified():
            fg = "green" if line.startswith("+") else "red" if line.startswith("-") else None
            click.echo(click.style(line, fg=fg) if color and fg else line)


@cli.command()
@click.argument("results", type=_FILE)
@_declared(_UNDO_OPTIONS)
@_picked_options(
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
    from allo_batch.undo import plan_undo

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
            )
            configs = configs_for(request).configs
        except AlloBatchError as error:
            console.failed(str(error), int(error.exit_code))
            sys.exit(int(error.exit_code))
        for line in plan.lines():
            console.skipped(line)
        sys.exit(_run_all(configs, console))


@cli.command()
@click.argument("result", type=_FILE)
@_column_option
@_declared(_REPORT_OPTIONS)
def report(result: Path, **options: Any) -> None:
    """Summarise a result file: counts per status and error code, and the run's figures; or
    list, export or chart its rows and its run (--failed, --export-failed, --html)."""
    from allo_batch.review import ReportRequest, review

    try:
        out = review(ReportRequest(result, **options))
    except AlloBatchError as error:
        _fail(error)
    for note in out.notes:
        click.echo(note, err=True)
    if out.text:
        click.echo(out.text)


class _Interrupted(BaseException):
    """SIGINT/SIGTERM outside the send phase (click would turn KeyboardInterrupt into exit 1)."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted(signum)


@contextlib.contextmanager
def _exit_130_on_signals(console: Any) -> Iterator[None]:
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
        console.failed(f"interrupted by {name}; a rerun resumes from here", 130)
        sys.exit(130)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main() -> None:
    """Console-script entry point."""
    cli()
