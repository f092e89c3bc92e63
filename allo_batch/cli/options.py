"""Click options built from the one table of run options, and the compact tables of the
options that only the command line has."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from allo_batch.options import OPTIONS, RUN_OPTIONS, Option

MAX_SHOWN = 10**9  # --show: more rows than any file holds, and within what polars can take

F = TypeVar("F", bound=Callable[..., Any])
Declared = list[tuple[list[str], dict[str, Any]]]


def option_decorator(option: Option) -> Callable[[F], F]:
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


def table_options(function: F) -> F:
    for option in reversed(RUN_OPTIONS):
        function = option_decorator(option)(function)
    return function


def picked_options(*names: str) -> Callable[[F], F]:
    """Some options of the table (a command that reads, or undoes, but is not ``run``)."""

    def decorate(function: F) -> F:
        for name in reversed(names):
            function = option_decorator(OPTIONS[name])(function)
        return function

    return decorate


column_option = click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="NAME=FILE_COLUMN",
    help="Map a field to a differently named column, e.g. content=new_summary.",
)


def path(**kind: Any) -> click.Path:
    return click.Path(path_type=Path, **kind)


FILE = path(exists=True, dir_okay=False)


class _LocalPath(click.Path):
    """A local path: an object's URI is refused as such, not taken for a path (``s3:/b/k``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if "://" in str(value):
            command = ctx.info_name if ctx is not None else "this command"
            self.fail(
                f"{value}: {command} reads local files only; copy the object here first",
                param,
                ctx,
            )
        if problem := self.problem(Path(value)):
            self.fail(problem, param, ctx)
        return super().convert(value, param, ctx)

    def problem(self, path: Path) -> str | None:
        """What to say of a local ``path`` before click's own checks (none here)."""
        return None


class _ResultFile(_LocalPath):
    """An existing result file; a missing one whose run was cut off says how to finish it."""

    def problem(self, path: Path) -> str | None:
        from allo_batch.report import unfinished_result_file

        return unfinished_result_file(path)


RESULT_FILE = _ResultFile(path_type=Path, exists=True, dir_okay=False)
LOCAL_PATH = _LocalPath(path_type=Path)


class _Location(click.ParamType[Any]):
    """A local path, or an object in a store (``s3://bucket/key``, ``https://...``)."""

    name = "path|uri"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from allo_batch.errors import UsageError
        from allo_batch.storage import location

        try:
            return location(value)
        except UsageError as error:
            self.fail(str(error), param, ctx)


LOCATION = _Location()
# fmt: off
RUN_EXTRA_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [  # not in the table
    (["-o", "--output"], {"type": LOCATION, "help": "Result file (.parquet, .csv, .ndjson), "
     "a path or an s3://, gs://, az:// URI [default: <INPUT stem>.results.parquet beside "
     "INPUT; required for an INPUT in a store]."}),
    (["--storage-option", "storage_options"], {"multiple": True, "metavar": "KEY=VALUE",
     "help": "Passed to the store's filesystem (fsspec), e.g. endpoint_url=..., "
     "client_kwargs.region_name=...; never credentials [default: the store's own "
     "environment and config chain]."}),
    (["--api-key-file"], {"type": path(), "help": "File holding the API key alone on one "
     "line [default: env ALLO_API_KEY]."}),
    (["--dry-run"], {"is_flag": True, "help": "Read, validate, plan and (with a key) read the "
     "targets; send nothing; still write the result file."}),
    (["--force"], {"is_flag": True, "help": "Write into an --output that holds results of a "
     "different input."}),
    (["--sandbox", "use_sandbox"], {"is_flag": True, "help": "Run against an embedded "
     "simulator on a free loopback port."}),
    (["--sandbox-world"], {"type": FILE, "help": "With --sandbox: a world JSON instead of "
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
     "object on a line of stdout (a job of several files: one line per file)."}),
    (["--job", "job_file"], {"type": path(dir_okay=False), "help": "Job spec (TOML, see "
     "jobs/); options given here override it."}),
    (["--ds"], {"envvar": "ALLO_BATCH_DS", "type": click.DateTime(formats=["%Y-%m-%d"]),
     "help": "With --job: the date of {ds} [env ALLO_BATCH_DS; default: today]."}),
]
# fmt: on


# fmt: off
SANDBOX_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [
    (["--host"], {"default": "127.0.0.1", "show_default": True, "help": "Address to listen on."}),
    (["--port"], {"type": click.IntRange(0, 65535), "default": 8765, "show_default": True,
     "help": "Port; 0 picks a free one."}),
    (["--api-key"], {"help": "The full-scope key [default: generated]."}),
    (["--write-rate"], {"type": click.IntRange(min=1), "default": 5, "show_default": True,
     "help": "Writes per second per key."}),
    (["--read-rate"], {"type": click.IntRange(min=1), "default": 20, "show_default": True,
     "help": "Reads per second per key."}),
    (["--world", "world_file"], {"type": FILE, "help": "World JSON: calls with their "
     "completed templates, SMS ids, extra keys."}),
    (["--from-input"], {"type": FILE, "help": "Make every cll- id of this corrections file "
     "exist with the templates its rows name."}),
    (["--faults"], {"help": "Fault spec, e.g. latency=50ms,jitter=20ms,503=0.01."}),
    (["--seed"], {"default": 0, "show_default": True, "help": "Seed for reproducible faults."}),
    (["--persona"], {"default": "documented", "show_default": True, "help": "How the simulator "
     "answers where the API docs are silent (see below)."}),
]
DIFF_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [
    (["-o", "--output"], {"type": path(), "help": "Preview file (.csv, .parquet, .ndjson) "
     "[default: <INPUT stem>.preview.csv beside INPUT]."}),
    (["--api-key-file"], {"type": path(), "help": "File holding the API key."}),
    (["--show"], {"type": click.IntRange(min=0, max=MAX_SHOWN), "default": 5, "show_default": True,
     "help": "Unified diffs printed (the first changed rows)."}),
    (["--html", "html_page"], {"type": path(dir_okay=False), "help": "Also write a "
     "self-contained page of side-by-side diffs (owner-only: it holds content)."}),
]
UNDO_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [
    (["-o", "--output"], {"type": path(), "help": "The undo's result file "
     "[default: <RESULTS>.undo.parquet]."}),
    (["--api-key-file"], {"type": path(), "help": "File holding the API key."}),
    (["--dry-run"], {"is_flag": True, "help": "Read the targets and say what would be put back "
     "and what conflicts; write nothing."}),
    (["--force"], {"is_flag": True, "help": "Put back even where the target changed since."}),
    (["--include-uncertain"], {"is_flag": True, "help": "Also put back before-images whose "
     "read could not be tied to the row's template."}),
    (["--json", "as_json"], {"is_flag": True, "help": "Print the summary as JSON on stdout."}),
]
REPORT_OPTIONS: list[tuple[list[str], dict[str, Any]]] = [
    (["--json", "as_json"], {"is_flag": True, "help": "Print the summary (or --failed) as JSON."}),
    (["--failed"], {"is_flag": True, "help": "List the rows to fix by hand (invalid or failed)."}),
    (["--show"], {"type": click.IntRange(min=0, max=MAX_SHOWN), "default": 50, "show_default": True,
     "help": "Rows --failed lists (0: all)."}),
    (["--export-failed"], {"type": path(dir_okay=False), "help": "Write those rows of --input, "
     "every column, to FILE (.csv, .parquet, .ndjson)."}),
    (["--input", "input_path"], {"metavar": "INPUT", "type": FILE, "help": "The run's input "
     "(checked against RESULT): for --export-failed, and line numbers."}),
    (["--format", "input_format"], {"type": click.Choice(["csv", "parquet", "ndjson"]),
     "help": "Format of --input [default: from the extension]."}),
    (["--html"], {"type": path(dir_okay=False), "help": "Write a self-contained HTML report "
     "with plots to FILE."}),
]
# fmt: on


def declared(options: list[tuple[list[str], dict[str, Any]]]) -> Callable[[F], F]:
    """Click options from a compact table (declarations, keywords)."""

    def decorate(function: F) -> F:
        for declarations, keywords in reversed(options):
            function = click.option(*declarations, **keywords)(function)
        return function

    return decorate
