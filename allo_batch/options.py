"""The one table of run options: names, types, ranges, defaults and help, declared once.

It drives the ``run`` command's click options, the job-spec keys and their type checks, and
:class:`~allo_batch.config.JobConfig`'s own validation, so the three can never disagree about
what ``--rate`` or ``max_attempts`` accepts. No heavy import here: ``--help`` reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Final, Literal

from allo_batch.errors import UsageError

Kind = Literal["string", "number", "integer", "choice", "flag"]
InputFormat = Literal["csv", "parquet", "ndjson"]
LogFormat = Literal["text", "json"]
AuthForm = Literal["auto", "prefixed", "bare"]
Value = str | float | int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    """One run option: the same name on the command line (``--max-attempts``) and in a job spec
    (``max_attempts``)."""

    name: str
    kind: Kind
    help: str
    default: Value = None
    default_text: str | None = None  # when the default is decided at run time
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.name.replace("_", "-")

    def expected(self) -> str:
        """The accepted values in words, for error messages."""
        if self.choices:
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "flag":
            return "true or false"
        text = {"string": "a string", "number": "a number", "integer": "an integer"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{text} from {self.low:g} to {self.high:g}"
        if self.low is not None:
            return f"{text} {'>' if self.low_open else '>='} {self.low:g}"
        return text

    def has_kind(self, value: object) -> bool:
        """Whether ``value`` is of this option's type (whatever its range)."""
        if self.kind == "flag":
            return isinstance(value, bool)
        if isinstance(value, bool):  # True is an int to Python, never a number here
            return False
        if self.kind in ("string", "choice"):
            return isinstance(value, str)
        if self.kind == "integer":
            return isinstance(value, int)
        return isinstance(value, int | float)

    def accepts(self, value: object) -> bool:
        """Whether ``value`` has this option's type and lies in its range."""
        if value is None:
            return True
        if not self.has_kind(value):
            return False
        if isinstance(value, bool):
            return True
        if isinstance(value, str):
            return not self.choices or value in self.choices
        assert isinstance(value, int | float)
        if not math.isfinite(value):  # NaN compares false with every bound; inf overflows
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def check(self, value: object, where: str) -> None:
        """Raise :class:`UsageError` naming ``where`` unless :meth:`accepts` ``value``."""
        if not self.accepts(value):
            msg = f"{where}: expected {self.expected()}, not {value!r}"
            raise UsageError(msg)


RUN_OPTIONS: Final = (
    Option(
        name="format",
        kind="choice",
        choices=("csv", "parquet", "ndjson"),
        help="Input format.",
        default_text="from the extension",
    ),
    Option(
        name="base_url",
        kind="string",
        help="API base URL (env ALLO_BASE_URL).",
        default_text="https://api.withallo.com",
        metavar="URL",
    ),
    Option(
        name="rate",
        kind="number",
        low=0.0001,  # below that (a write every 3 hours) the pacer's arithmetic overflows
        help="Writes per second.",
        default_text="the key's write_per_second from /v2/api/me, else 5",
    ),
    Option(
        name="concurrency",
        kind="integer",
        low=1,
        high=256,
        help="Requests in flight.",
        default_text="from the rate, 2..32",
    ),
    Option(
        name="timeout",
        kind="number",
        low=0,
        low_open=True,
        default=30.0,
        help="Seconds per request.",
    ),
    Option(
        name="max_attempts",
        kind="integer",
        low=1,
        high=100,
        default=5,
        help="Tries per row for retryable failures (429s not counted).",
    ),
    Option(
        name="max_errors", kind="integer", low=1, help="Stop the run after this many failed rows."
    ),
    Option(
        name="max_outage",
        kind="number",
        low=0,
        default=300.0,
        help="Seconds the API may fail continuously (connection refused, 5xx) before the run "
        "stops with exit 3; until then it retries with capped backoff.",
    ),
    Option(
        name="finish_by",
        kind="string",
        help="Stop cleanly at this time (ISO 8601, or HH:MM for the next such local time): no "
        "new rows, requests in flight finish, exit 3; the next window's run resumes. A run "
        "that cannot finish in time says so at the start.",
        metavar="TIME",
    ),
    Option(name="limit", kind="integer", low=0, help="Only the first N rows (a canary run)."),
    Option(
        name="auth",
        kind="choice",
        choices=("auto", "prefixed", "bare"),
        default="auto",
        help="Authorization header form: 'Api-Key <key>' (prefixed), the bare key, or auto "
        "(prefixed, and the bare key once if /me refuses it with 401).",
    ),
    Option(
        name="write_always",
        kind="flag",
        help="Write every row, even where a read shows the target already holds its content "
        "(before-images are still kept).",
    ),
    Option(
        name="verify",
        kind="flag",
        help="After the writes, read the landed targets again and list rows whose read differs "
        "from what was sent (normalised by the API, or reads lagging); nothing is resent.",
    ),
    Option(
        name="blind",
        kind="flag",
        help="Write without reading first: no before-images, no undo, nothing skipped as "
        "unchanged (for a key without CONVERSATIONS_READ).",
    ),
    Option(
        name="log_format",
        kind="choice",
        choices=("text", "json"),
        default="text",
        help="stderr: lines for people, or one JSON object per line (no progress bar).",
    ),
    Option(
        name="log_interval",
        kind="number",
        low=0,
        low_open=True,
        default=30.0,
        help="Seconds between progress lines when stderr is not a terminal.",
    ),
    Option(
        name="state_dir",
        kind="string",
        help="Folder for the local state of an output in a store (its journal, and the result "
        "file between checkpoints; owner-only).",
        default_text="$XDG_STATE_HOME/allo-batch, else ~/.local/state/allo-batch",
        metavar="DIR",
    ),
    Option(
        name="checkpoint_interval",
        kind="number",
        low=0,
        low_open=True,
        default=60.0,
        help="For an output in a store: seconds between uploads of the result file so far "
        "(also every 50,000 rows, and at every stop).",
    ),
)
OPTIONS: Final = {option.name: option for option in RUN_OPTIONS}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """Values of the run options as one source gives them; ``None`` means not given there.

    The command line's win over a job spec's, which win over the defaults of the table.
    """

    format: InputFormat | None = None
    base_url: str | None = None
    rate: float | None = None
    concurrency: int | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    max_errors: int | None = None
    max_outage: float | None = None
    limit: int | None = None
    finish_by: str | None = None
    auth: AuthForm | None = None
    write_always: bool | None = None
    verify: bool | None = None
    blind: bool | None = None
    log_format: LogFormat | None = None
    log_interval: float | None = None
    state_dir: str | None = None
    checkpoint_interval: float | None = None

    def __post_init__(self) -> None:
        for name, value in self.given().items():
            OPTIONS[name].check(value, OPTIONS[name].flag)

    def given(self) -> dict[str, Any]:
        """The options this source gives."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def over(self, fallback: RunOptions) -> RunOptions:
        """These options, with ``fallback``'s where these give none."""
        return dataclasses.replace(fallback, **self.given())

    def value(self, name: str) -> Value:
        """The given value, else the table's default."""
        given = getattr(self, name)
        return OPTIONS[name].default if given is None else given
