"""Job specs: a TOML file under ``jobs/`` that names everything a run needs except the key.

``allo-batch run --job jobs/nightly.toml`` reads one. Command-line options (and the environment
variables the options read) override the file; the file overrides the defaults. Every key is
checked before anything is read or sent: an unknown key or a wrong type stops the run with the
file, the key and the expected type named.

Paths in a spec are relative to the spec's own folder, so cron and Airflow, whatever their
working directory, read the same files. ``input`` may be a glob: each matching file is its own
run, with its own result file, so ``output`` must then contain ``{stem}``.

Placeholders: ``{ds}`` (the run's date, ``YYYY-MM-DD``, from ``--ds``, else today),
``{ds_nodash}`` (``YYYYMMDD``), ``{job}`` (the spec's file name without ``.toml``) and, in
``output`` only, ``{stem}`` (the input file's name without its extension). ``{{`` and ``}}`` are
literal braces.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Final, Literal

from allo_batch.config import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    JobConfig,
    RetryPolicy,
    Secret,
    api_key_from,
    parse_deadline,
)
from allo_batch.constants import DEFAULT_BASE_URL
from allo_batch.errors import UsageError
from allo_batch.options import OPTIONS, LogFormat, RunOptions
from allo_batch.storage import Location, ObjectUri, StorageOptions, location, matching_objects

_DATE_PLACEHOLDERS: Final = ("ds", "ds_nodash", "job")


@dataclass(frozen=True, slots=True)
class _Field:
    """What one spec-only key accepts (run options are checked by the table in ``options``)."""

    kind: Literal["string", "table"]
    choices: tuple[str, ...] = ()
    placeholders: tuple[str, ...] = ()

    def expected(self) -> str:
        """The expected type in words, for error messages."""
        if self.choices:
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        return "a table of strings" if self.kind == "table" else "a string"


# Keys only a spec has (what each means: the README, "Scheduling"); every run option of the
# table in ``allo_batch.options`` is a key too.
SPEC_FIELDS: Final[dict[str, _Field]] = {
    "description": _Field("string"),
    "input": _Field("string", placeholders=_DATE_PLACEHOLDERS),  # a file or a glob
    "output": _Field("string", placeholders=(*_DATE_PLACEHOLDERS, "stem")),
    "columns": _Field("table"),  # field = the file's column
    "storage_options": _Field("table"),  # passed to the store's filesystem (storage.py)
    "api_key_env": _Field("string"),  # the variable that holds the key
    "api_key_file": _Field("string"),  # the file that holds the key
    "if_no_input": _Field("string", choices=("fail", "skip")),  # fail: exit 2; skip: exit 0
}
KEYS: Final = (*SPEC_FIELDS, *OPTIONS)
_SECRET_KEYS: Final = ("api_key", "key", "token", "secret", "password")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A checked job file: only known keys, each of its expected type."""

    path: Path
    values: Mapping[str, Any]

    @property
    def name(self) -> str:
        """The job's name: its file name without ``.toml``."""
        return self.path.stem

    def get(self, key: str, default: Any = None) -> Any:
        """A value of the file, or ``default`` when the file leaves it out."""
        return self.values.get(key, default)

    def error(self, key: str, problem: str) -> UsageError:
        """A usage error that names this file and the key."""
        return UsageError(f"{self.path}: key '{key}': {problem}")


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """One run of a job: an input file and its result file."""

    input: Location
    output: Location | None


def load_spec(path: Path) -> JobSpec:
    """Read and check a job file (exit 2 on any problem, naming file, key and type)."""
    import tomllib

    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError as exc:
        msg = f"{path}: no such job file"
        raise UsageError(msg) from exc
    except OSError as exc:
        msg = f"{path}: cannot read the job file ({exc.strerror})"
        raise UsageError(msg) from exc
    except tomllib.TOMLDecodeError as exc:
        msg = f"{path}: not valid TOML: {exc}"
        raise UsageError(msg) from exc
    except UnicodeDecodeError as exc:
        msg = f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})"
        raise UsageError(msg) from exc
    spec = JobSpec(path, raw)
    for key, value in raw.items():
        _check(spec, key, value)
    if "api_key_env" in raw and "api_key_file" in raw:
        raise spec.error("api_key_file", "give api_key_env or api_key_file, not both")
    return spec


def _check(spec: JobSpec, key: str, value: Any) -> None:
    option = OPTIONS.get(key)
    if option is not None:
        if not option.has_kind(value):
            raise spec.error(key, f"expected {option.expected()}, not {_describe(value)}")
        if not option.accepts(value):
            raise spec.error(key, f"expected {option.expected()}, not {value!r}")
        if key == "finish_by":  # checked here, to be named as the file's, not as --finish-by
            try:
                parse_deadline(value)
            except UsageError:
                problem = f"{value!r} is no time: use an ISO 8601 date-time or HH:MM"
                raise spec.error(key, problem) from None
        return
    field = SPEC_FIELDS.get(key)
    if field is None:
        if key.lower() in _SECRET_KEYS:
            problem = (
                "a job file never holds the key itself; name where it comes from with "
                'api_key_env = "VARIABLE" or api_key_file = "/path/to/key"'
            )
            raise spec.error(key, problem)
        close = difflib.get_close_matches(key, KEYS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(KEYS)}"
        raise spec.error(key, f"unknown key{hint}")
    if key == "storage_options":
        if not isinstance(value, dict):
            raise spec.error(key, f"expected a table, not {_describe(value)}")
        try:
            StorageOptions.from_mapping(value, key)
        except UsageError as error:
            raise spec.error(key, str(error)) from None
        return
    if field.kind == "table":
        _check_columns(spec, key, value)
        return
    if not isinstance(value, str):
        raise spec.error(key, f"expected {field.expected()}, not {_describe(value)}")
    if field.choices and value not in field.choices:
        raise spec.error(key, f"expected {field.expected()}, not {value!r}")
    if field.placeholders:
        _check_placeholders(spec, key, value, field.placeholders)


def _check_columns(spec: JobSpec, key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise spec.error(key, f"expected a table of strings, not {_describe(value)}")
    known = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    for ours, theirs in value.items():
        if ours not in known:
            raise spec.error(f"{key}.{ours}", f"unknown field; use {', '.join(known)}")
        if not isinstance(theirs, str) or not theirs:
            raise spec.error(
                f"{key}.{ours}", f"expected the file's column name (a string), not {theirs!r}"
            )


def _describe(value: Any) -> str:
    scalars = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if type(value) in scalars:
        return f"{scalars[type(value)]} ({value!r})"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a date or time ({value})"


def _check_placeholders(spec: JobSpec, key: str, value: str, allowed: tuple[str, ...]) -> None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
    except ValueError as exc:
        raise spec.error(key, f"{exc} (write {{{{ and }}}} for literal braces)") from exc
    for name in names:
        if name not in allowed:
            known = ", ".join(f"{{{a}}}" for a in allowed)
            raise spec.error(key, f"unknown placeholder {{{name}}}; use {known}")


def placeholders(spec: JobSpec, ds: date) -> dict[str, str]:
    """The values of the date and job placeholders."""
    return {"ds": ds.isoformat(), "ds_nodash": ds.strftime("%Y%m%d"), "job": spec.name}


def plan_files(
    spec: JobSpec,
    *,
    ds: date,
    input_override: Location | None = None,
    output_override: Location | None = None,
    storage: StorageOptions | None = None,
) -> list[PlannedFile]:
    """The runs this job makes on ``ds``: one per input file, each with its result file.

    An empty list means no file matched (the caller applies ``if_no_input``).
    """
    values = placeholders(spec, ds)
    storage = storage or StorageOptions()
    inputs: list[Location]
    if input_override is not None:
        inputs = [input_override]
    else:
        pattern = spec.get("input")
        if pattern is None:
            raise spec.error("input", "missing; name the corrections file (or give INPUT)")
        found = _placed(spec, pattern, values)
        expanded = str(found)
        if isinstance(found, ObjectUri):
            inputs = list(matching_objects(found, storage))
        elif glob.has_magic(expanded):
            inputs = [Path(p) for p in sorted(glob.glob(expanded)) if Path(p).is_file()]
        else:
            inputs = [Path(expanded)] if Path(expanded).exists() else []
    if output_override is not None:
        if len(inputs) > 1:
            msg = f"-o names one result file, but {spec.path}'s input matches {len(inputs)} files"
            raise UsageError(msg)
        return [PlannedFile(path, output_override) for path in inputs]
    template = spec.get("output")
    if template is None:
        raise spec.error("output", "missing; name the result file (or give -o)")
    if len(inputs) > 1 and "{stem}" not in template:
        raise spec.error(
            "output",
            f"the input matches {len(inputs)} files, so the output needs {{stem}} "
            "to give each its own result file",
        )
    planned = [
        PlannedFile(path, _placed(spec, template, {**values, "stem": path.stem})) for path in inputs
    ]
    # A glob that also matches the job's own result files (input "d/*.csv", output
    # "d/{stem}.results.csv") would take them for inputs on the rerun: they are left out.
    outputs = {_same_place(run.output) for run in planned if run.output is not None}
    planned = [run for run in planned if _same_place(run.input) not in outputs]
    _refuse_shared_outputs(spec, planned)
    return planned


def _same_place(where: Location) -> str:
    """A location as two spellings of one file compare."""
    return str(where.resolve()) if isinstance(where, Path) else where.uri


def _refuse_shared_outputs(spec: JobSpec, planned: list[PlannedFile]) -> None:
    """Two inputs with one stem (``a.csv``, ``a.ndjson``) would share a result file: the second
    run would be refused as another input after the first had sent. Refused before either."""
    seen: dict[str, Location] = {}
    for run in planned:
        where = str(run.output)
        if where in seen:
            raise spec.error(
                "output",
                f"{seen[where]} and {run.input} would both write {where}; give each input its "
                "own result file (rename one, or narrow the input pattern)",
            )
        seen[where] = run.input


def spec_api_key(spec: JobSpec, env: Mapping[str, str] | None = None) -> Secret | None:
    """The key from where the spec says, else from ``ALLO_API_KEY``."""
    environ = os.environ if env is None else env
    if spec.get("api_key_file") is not None:
        return api_key_from(key_file=_beside(spec, spec.get("api_key_file")))
    name = spec.get("api_key_env")
    if name is None:
        return api_key_from(env=dict(environ))
    value = environ.get(name, "").strip()
    if not value:
        raise spec.error("api_key_env", f"the environment variable {name} is not set")
    return Secret(value)


def _beside(spec: JobSpec, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else spec.path.parent / path


def _placed(spec: JobSpec, template: str, values: Mapping[str, str]) -> Location:
    """An input or output of a spec: an object's URI as it is, a path beside the spec."""
    found = location(template.format_map(values))
    return found if isinstance(found, ObjectUri) else _beside(spec, str(found))


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRequest:
    """What a caller asks ``run`` for: one input, or a job spec whose values ``options`` and
    ``columns`` override. The command line builds one; so can a Python caller or Airflow."""

    input: Location | None = None
    output: Location | None = None
    job: Path | None = None
    ds: date | None = None
    options: RunOptions = field(default_factory=RunOptions)
    columns: Mapping[str, str] = field(default_factory=dict)
    api_key: Secret | None = None  # given directly; wins over every other source
    api_key_file: Path | None = None
    dry_run: bool = False
    force: bool = False
    progress: bool = False
    storage_options: StorageOptions = field(default_factory=StorageOptions)


@dataclass(frozen=True, slots=True)
class JobPlan:
    """The runs a request makes, in order, and how the caller should report them."""

    configs: list[JobConfig]
    log_format: LogFormat = "text"
    job: str | None = None  # the spec's name, for log lines
    ds: date | None = None
    nothing_to_do: str | None = None  # why no run starts (``if_no_input = "skip"``)


def configs_for(request: RunRequest, *, env: Mapping[str, str] | None = None) -> JobPlan:
    """The configurations ``request`` runs: one, or with a job spec one per matching file.

    Raises :class:`UsageError` (exit 2) for anything wrong, before any file is read.
    """
    environ = os.environ if env is None else env
    if request.job is None:
        if request.input is None:
            msg = "give INPUT, or --job with a job spec"
            raise UsageError(msg)
        if request.ds is not None:
            msg = "--ds only applies with --job"
            raise UsageError(msg)
        key = request.api_key or api_key_from(dict(environ), request.api_key_file)
        config = _config(request, request.options, request.input, request.output, key)
        return JobPlan([config], log_format=_log_format(request.options))
    spec = load_spec(request.job)
    options = request.options.over(spec_options(spec))
    ds = request.ds or date.today()
    stored = StorageOptions.from_mapping(spec.get("storage_options", {}), "storage_options")
    storage = request.storage_options.over(stored)
    files = plan_files(
        spec,
        ds=ds,
        input_override=request.input,
        output_override=request.output,
        storage=storage,
    )
    plan = JobPlan([], log_format=_log_format(options), job=spec.name, ds=ds)
    if not files:
        pattern = spec.get("input")
        why = f"{request.job}: no input file matches {pattern!r} for {ds}"
        if spec.get("if_no_input", "fail") == "skip":
            return dataclasses.replace(plan, nothing_to_do=f"{why}; nothing to do")
        raise UsageError(why)
    key = _spec_key(request, spec, environ)
    columns = {**spec.get("columns", {}), **request.columns}
    request = dataclasses.replace(request, columns=columns, storage_options=storage)
    plan.configs.extend(_config(request, options, f.input, f.output, key) for f in files)
    return plan


def spec_options(spec: JobSpec) -> RunOptions:
    """The run options a spec sets (checked when it was loaded)."""
    return RunOptions(**{name: spec.get(name) for name in OPTIONS if spec.get(name) is not None})


def _spec_key(request: RunRequest, spec: JobSpec, env: Mapping[str, str]) -> Secret | None:
    if request.api_key is not None:
        return request.api_key
    if request.dry_run:  # a dry run needs no key
        return None
    if request.api_key_file is not None:
        return api_key_from(key_file=request.api_key_file)
    return spec_api_key(spec, env)


def _log_format(options: RunOptions) -> LogFormat:
    return "json" if options.log_format == "json" else "text"


def _config(
    request: RunRequest,
    options: RunOptions,
    input_path: Location,
    output: Location | None,
    key: Secret | None,
) -> JobConfig:
    """One run's configuration: given options, else the table's defaults."""
    max_attempts = options.value("max_attempts")
    max_outage = options.value("max_outage")
    assert isinstance(max_attempts, int) and isinstance(max_outage, int | float)
    config = JobConfig(
        input=input_path,
        output=output,
        input_format=options.format,
        columns=dict(request.columns),
        base_url=options.base_url or DEFAULT_BASE_URL,
        api_key=key,
        rate=options.rate,
        concurrency=options.concurrency,
        timeout=float(options.value("timeout") or 0),
        retry=RetryPolicy(max_attempts=max_attempts, max_outage=float(max_outage)),
        max_errors=options.max_errors,
        limit=options.limit,
        finish_by=parse_deadline(options.finish_by) if options.finish_by else None,
        auth=options.auth or "auto",
        write_always=bool(options.write_always),
        verify=bool(options.verify),
        blind=bool(options.blind),
        dry_run=request.dry_run,
        force=request.force,
        progress=request.progress,
        log_interval=float(options.value("log_interval") or 0),
        storage_options=request.storage_options,
        state_dir=Path(options.state_dir).expanduser() if options.state_dir else None,
        checkpoint_interval=float(options.value("checkpoint_interval") or 0),
    )
    _ = config.output_path  # an input in a store without -o: refused here, exit 2
    return config
