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
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from allo_batch.errors import AlloBatchError, ExitCode

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


# The commands register themselves on ``cli``.
from allo_batch.cli import local, running, sandbox  # noqa: E402, F401
