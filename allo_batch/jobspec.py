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

import difflib
import glob
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Final

from allo_batch.config import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, Secret, api_key_from
from allo_batch.errors import UsageError

_DATE_PLACEHOLDERS: Final = ("ds", "ds_nodash", "job")


@dataclass(frozen=True, slots=True)
class _Field:
    """What one top-level key accepts."""

    kind: str  # "string", "number", "integer", "table"
    choices: tuple[str, ...] = ()
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    placeholders: tuple[str, ...] = ()

    def expected(self) -> str:
        """The expected type in words, for error messages."""
        if self.choices:
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "table":
            return "a table of strings"
        text = {"string": "a string", "number": "a number", "integer": "an integer"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{text} from {self.low:g} to {self.high:g}"
        if self.low is not None:
            return f"{text} {'>' if self.low_open else '>='} {self.low:g}"
        return text


# The keys a spec may hold (what each means: the README, "Scheduling").
FIELDS: Final[dict[str, _Field]] = {
    "description": _Field("string"),
    "input": _Field("string", placeholders=_DATE_PLACEHOLDERS),  # a file or a glob
    "output": _Field("string", placeholders=(*_DATE_PLACEHOLDERS, "stem")),
    "format": _Field("string", choices=("csv", "parquet", "ndjson")),
    "columns": _Field("table"),  # field = the file's column
    "base_url": _Field("string"),
    "api_key_env": _Field("string"),  # the variable that holds the key
    "api_key_file": _Field("string"),  # the file that holds the key
    "rate": _Field("number", low=0, low_open=True),
    "concurrency": _Field("integer", low=1, high=256),
    "timeout": _Field("number", low=0, low_open=True),
    "max_attempts": _Field("integer", low=1, high=100),
    "max_errors": _Field("integer", low=1),
    "limit": _Field("integer", low=0),
    "log_format": _Field("string", choices=("text", "json")),
    "log_interval": _Field("number", low=0, low_open=True),
    "if_no_input": _Field("string", choices=("fail", "skip")),  # fail: exit 2; skip: exit 0
}
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

    input: Path
    output: Path | None


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
    spec = JobSpec(path, raw)
    for key, value in raw.items():
        _check(spec, key, value)
    if "api_key_env" in raw and "api_key_file" in raw:
        raise spec.error("api_key_file", "give api_key_env or api_key_file, not both")
    return spec


def _check(spec: JobSpec, key: str, value: Any) -> None:
    field = FIELDS.get(key)
    if field is None:
        if key.lower() in _SECRET_KEYS:
            problem = (
                "a job file never holds the key itself; name where it comes from with "
                'api_key_env = "VARIABLE" or api_key_file = "/path/to/key"'
            )
            raise spec.error(key, problem)
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(FIELDS)}"
        raise spec.error(key, f"unknown key{hint}")
    if field.kind == "table":
        _check_columns(spec, key, value)
        return
    if not _is_kind(value, field.kind):
        raise spec.error(key, f"expected {field.expected()}, not {_describe(value)}")
    if field.choices and value not in field.choices:
        raise spec.error(key, f"expected {field.expected()}, not {value!r}")
    if field.kind in ("number", "integer") and not _in_range(field, value):
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


def _is_kind(value: Any, kind: str) -> bool:
    if isinstance(value, bool):  # TOML true/false are never numbers here
        return False
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int)
    return isinstance(value, int | float)


def _in_range(field: _Field, value: float) -> bool:
    if field.low is not None and (value <= field.low if field.low_open else value < field.low):
        return False
    return field.high is None or value <= field.high


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
    input_override: Path | None = None,
    output_override: Path | None = None,
) -> list[PlannedFile]:
    """The runs this job makes on ``ds``: one per input file, each with its result file.

    An empty list means no file matched (the caller applies ``if_no_input``).
    """
    values = placeholders(spec, ds)
    if input_override is not None:
        inputs = [input_override]
    else:
        pattern = spec.get("input")
        if pattern is None:
            raise spec.error("input", "missing; name the corrections file (or give INPUT)")
        expanded = str(_beside(spec, pattern.format_map(values)))
        if glob.has_magic(expanded):
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
    return [
        PlannedFile(path, _beside(spec, template.format_map({**values, "stem": path.stem})))
        for path in inputs
    ]


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
