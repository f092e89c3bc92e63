"""The command line. Only translates: options → a library request, one library call per
command, what to print, and errors → exit codes (README, "Exit codes").

One module per family of commands (``run``/``undo``, ``validate``/``diff``/``report``,
``sandbox``); the click options they share are built in ``options`` from the one table of run
options. Heavy libraries (polars, httpx, uvicorn) are imported inside the commands, so
``--help`` is fast.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any, NoReturn

import click

from allo_batch.errors import AlloBatchError, ExitCode

_STATE: dict[str, Any] = {"debug": False}  # set by the group: --debug, the log handler


# Each command's module and short help: ``allo-batch --help`` lists them without importing the
# commands (tests/test_structure.py checks the texts against the commands' own).
COMMANDS: dict[str, tuple[str, str]] = {
    "diff": ("local", "Preview what `run` would change: read every valid row's target, send..."),
    "report": ("local", "Summarise a result file: counts per status and error code, and the..."),
    "run": ("running", "Send the corrections in INPUT (CSV, Parquet or NDJSON of call_id,..."),
    "sandbox": ("sandbox", "Serve a local simulator of the Allo API until Ctrl-C."),
    "undo": ("running", "Put back the before-image of every row RESULTS' run (and its..."),
    "validate": ("local", "Check INPUT locally and print a report; send nothing."),
}


class _Group(click.Group):
    """Loads a command's module only when it is used, and turns a bug into exit 70 with one
    line and a saved traceback, never exit 1 (which means "some rows failed" to cron and
    Airflow)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            import_module(f"allo_batch.cli.{COMMANDS[cmd_name][0]}")
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])

    def main(self, args: Sequence[str] | None = None, *positional: Any, **extra: Any) -> Any:
        """Click's own, but a mistake on the command line (``--rate 0``) is a ``stop`` event
        under ``--log-format json``, like every other last line, not click's text."""
        if positional or extra.get("standalone_mode") is False:
            return super().main(args, *positional, **extra)
        words = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(words, **extra, standalone_mode=False)
        except click.ClickException as exc:
            if _json_log_asked(words):
                from allo_batch.report import RunConsole

                RunConsole("json").failed(exc.format_message(), exc.exit_code)
            else:
                exc.show()  # as click shows it
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C outside any command's
                click.echo("allo-batch: interrupted by SIGINT", err=True)
                sys.exit(130)
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, _Interrupted):
            raise
        except Exception as exc:  # a bug, or the machine refusing a file
            refused = _refused_by_the_machine(exc)
            if refused is not None:
                _machine_refused(refused, sends=ctx.invoked_subcommand in ("run", "undo"))
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
    handler = _STATE.setdefault("log", ConsoleLogHandler())
    handler.console = None  # an earlier command's, in a process that runs several (tests)
    handler.install()


def _json_log_asked(words: list[str]) -> bool:
    """Whether the command line asks for ``--log-format json`` (read before click could)."""
    pairs = zip(words, [*words[1:], ""], strict=True)
    return "--log-format=json" in words or ("--log-format", "json") in pairs


def _fail(error: AlloBatchError) -> NoReturn:
    click.echo(f"allo-batch: {error}", err=True)
    sys.exit(int(error.exit_code))


# What the machine, not allo-batch nor the data, can refuse: space, quota, a name too long,
# permissions, a read-only filesystem, open-file limits.
_MACHINE_ERRNOS = frozenset(
    {"ENOSPC", "EDQUOT", "ENAMETOOLONG", "EACCES", "EPERM", "EROFS", "EMFILE", "ENFILE"}
)


def _refused_by_the_machine(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` when the machine refused a file, else None. In an exception
    group (a task of the run), the first such one: the others are its consequences (a full
    disk fails every writer, and the streams they fed break)."""
    import errno

    if isinstance(exc, OSError):
        return exc if errno.errorcode.get(exc.errno or 0) in _MACHINE_ERRNOS else None
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _refused_by_the_machine(inner)) is not None:
                return found
    return None


def _machine_refused(exc: OSError, *, sends: bool) -> NoReturn:
    """Say what the machine refused; exit 3 (stopped early, a rerun resumes) for a command
    that sends, else 2 (nothing was sent)."""
    where = f"{exc.filename}: " if exc.filename else ""
    said = f"{where}{exc.strerror or exc}; the machine refused it (not a bug, not your data)"
    after = ". What landed is kept; a rerun resumes once it is fixed" if sends else ""
    code = ExitCode.STOPPED if sends else ExitCode.USAGE
    _last_word(f"{said}{after}", code)
    sys.exit(int(code))


def _last_word(message: str, exit_code: int) -> None:
    """The line a command ends with when it ends here: through the run's console once
    ``run`` or ``undo`` set one up (a ``stop`` event under ``--log-format json``, so every
    line of such a log stays JSON), else plain."""
    console = getattr(_STATE.get("log"), "console", None)
    if console is not None:
        console.failed(message, exit_code)
    else:
        click.echo(f"allo-batch: {message}", err=True)


def _crash_folder() -> Path:
    """Where a crash's traceback is saved: the system's temporary folder."""
    import tempfile

    return Path(tempfile.gettempdir())


def _crash(exc: Exception) -> NoReturn:
    import os
    import traceback

    text = "".join(traceback.format_exception(exc))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = _crash_folder() / f"allo-batch-crash-{stamp}-{os.getpid()}.txt"
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    if _STATE["debug"]:
        click.echo(text, err=True, nl=False)
    _last_word(
        f"internal error ({type(exc).__name__}); this is a bug, not your data. "
        f"Traceback saved to {path}; the journal keeps what landed, a rerun resumes",
        ExitCode.INTERNAL,
    )
    sys.exit(int(ExitCode.INTERNAL))


class _Interrupted(BaseException):
    """SIGINT/SIGTERM outside the send phase (click would turn KeyboardInterrupt into exit 1)."""


def _interrupt(signum: int, frame: object) -> None:
    """Raise once: a second signal, or the same one seen again, must not cut short the
    clean-up that the first one started (temporary files removed, the output's lock let go).
    polars turns a SIGINT into a KeyboardInterrupt of its own, and Python then runs this
    handler too, at the first line of that clean-up: it finds that KeyboardInterrupt being
    handled and lets the clean-up go on."""
    import signal

    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, signal.SIG_IGN)
    if isinstance(sys.exc_info()[1], KeyboardInterrupt):
        return
    raise _Interrupted(signum)


@contextlib.contextmanager
def _exit_130_on_signals(console: Any = None) -> Iterator[None]:
    """For ``run``: while rows are being sent, the run itself handles SIGINT and SIGTERM (stop,
    grace, record, exit 130). Before and after that phase a signal ends the process at once with
    exit 130: the journal keeps whatever landed, and a rerun resumes. The commands that only
    read (``validate``, ``diff``, ``report``) end the same way, with no console of their own."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, _interrupt)
    try:
        yield
    except (_Interrupted, KeyboardInterrupt) as stop:
        signum = stop.args[0] if isinstance(stop, _Interrupted) else signal.SIGINT
        said = f"interrupted by {signal.Signals(signum).name}"
        if console is not None:
            console.failed(f"{said}; a rerun resumes from here", 130)
        else:
            click.echo(f"allo-batch: {said}", err=True)
        sys.exit(130)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main() -> None:
    """Console-script entry point: the command, then :func:`exit_now` with its exit code."""
    try:
        cli()
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


def exit_now(code: object) -> NoReturn:
    """End the process with ``code`` without finalizing the interpreter.

    pyarrow reads CSV and NDJSON inputs through Python streams from threads of its own, and its
    reader's close does not wait for them. A thread still reading (a stop mid-file), or letting
    go of the stream, when the interpreter finalizes aborts the process (exit 134) or hangs it.
    Nothing here needs finalizing: every file a command writes is closed (and what must survive
    a crash is on disk) before it returns, so the output streams and the logs are flushed and the
    process ends at once.
    """
    import logging
    import os

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # as Python prints a non-integer exit code
        with contextlib.suppress(Exception):
            click.echo(str(code), err=True)
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe (| head) has nothing to flush to
            stream.flush()
    os._exit(status)
