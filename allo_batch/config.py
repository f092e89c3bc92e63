"""Frozen configuration of a run. The CLI, job specs and the Python API all build a
:class:`JobConfig`, which checks its values against the one table of options."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from allo_batch.constants import DEFAULT_BASE_URL
from allo_batch.errors import UsageError
from allo_batch.options import OPTIONS, AuthForm
from allo_batch.options import InputFormat as InputFormat
from allo_batch.storage import ObjectUri, StorageOptions, location

log = logging.getLogger("allo_batch")
FORMATS: Final[dict[str, InputFormat]] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
}
REQUIRED_COLUMNS: Final = ("call_id", "content")
# expected_sha256: write the row only where the target holds content of this hash (``undo``
# writes it; any corrections file may carry it for a compare-and-set run).
OPTIONAL_COLUMNS: Final = ("template_key", "expected_sha256")
API_KEY_ENV: Final = "ALLO_API_KEY"


class Secret:
    """A string that never shows itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Which failures are retried, how often and how long to wait (DESIGN §5)."""

    max_attempts: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_rate_limited: int = 30
    #: Seconds the API may stay unreachable (connection refused, timeouts, gateway pages, 5xx
    #: with no success in between) before the run stops; until then rows wait, not fail.
    max_outage: float = 300.0
    #: Longest pause between tries while the API is unreachable (so a restart is seen soon).
    outage_backoff_max: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class JobConfig:
    """Everything one run needs. Build it with keywords; defaults are production defaults."""

    input: Path | ObjectUri  # a str with a scheme (s3://...) is taken as an ObjectUri
    output: Path | ObjectUri | None = None
    input_format: InputFormat | None = None
    columns: dict[str, str] = field(default_factory=dict)
    base_url: str = DEFAULT_BASE_URL
    api_key: Secret | None = None
    rate: float | None = None
    jitter_margin: float = 0.02
    concurrency: int | None = None
    timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_errors: int | None = None
    limit: int | None = None
    finish_by: datetime | None = None  # aware; see parse_deadline
    auth: AuthForm = "auto"
    write_always: bool = False
    verify: bool = False
    blind: bool = False
    dry_run: bool = False
    force: bool = False
    batch_size: int = 20_000
    progress: bool = False
    log_interval: float = 30.0
    storage_options: StorageOptions = field(default_factory=StorageOptions)
    state_dir: Path | None = None  # for an output in a store; storage.state_root's default
    checkpoint_interval: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", location(self.input))
        if self.output is not None:
            object.__setattr__(self, "output", location(self.output))
        # The same checks as the command line and job specs: the one table of options.
        for name, value in (
            ("format", self.input_format),
            ("base_url", self.base_url),
            ("rate", self.rate),
            ("concurrency", self.concurrency),
            ("timeout", self.timeout),
            ("max_attempts", self.retry.max_attempts),
            ("max_errors", self.max_errors),
            ("max_outage", self.retry.max_outage),
            ("limit", self.limit),
            ("auth", self.auth),
            ("log_interval", self.log_interval),
            ("checkpoint_interval", self.checkpoint_interval),
        ):
            OPTIONS[name].check(value, f"JobConfig {name}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            msg = f"JobConfig batch_size: expected an integer >= 1, not {self.batch_size!r}"
            raise UsageError(msg)
        if not 0 <= self.jitter_margin < 1:
            msg = f"JobConfig jitter_margin: expected 0 <= margin < 1, not {self.jitter_margin!r}"
            raise UsageError(msg)
        if self.blind and self.verify:
            msg = "--verify reads the written targets back, and --blind reads nothing: drop one"
            raise UsageError(msg)

    @property
    def format(self) -> InputFormat:
        """The input format: explicit, else from the file extension."""
        if self.input_format:
            return self.input_format
        found = FORMATS.get(self.input.suffix.lower())
        if found is None and isinstance(self.input, Path) and self.input.is_dir():
            msg = f"{self.input}: is a folder; name an input file in it (or use a job spec's glob)"
            raise UsageError(msg)
        if found is None:
            msg = (
                f"{self.input}: cannot tell the format from the extension "
                f"{self.input.suffix or '(none)'}; use --format csv|parquet|ndjson"
            )
            raise UsageError(msg)
        return found

    @property
    def output_path(self) -> Path | ObjectUri:
        """The result file: explicit, else ``<input stem>.results.parquet`` beside the input
        (never the working directory, so the same command from elsewhere resumes too; an
        input in a store needs an explicit one)."""
        if isinstance(self.input, ObjectUri) and self.output is None:
            msg = (
                f"{self.input} is in a store: name the result file with -o (a local path or "
                "an s3://, gs:// or az:// URI); it is never put in the working directory"
            )
            raise UsageError(msg)
        return self.output or self.input.with_name(f"{self.input.stem}.results.parquet")

    def workers(self, rate: float) -> int:
        """Little's law with a 300 ms latency guess and 1.5x headroom, 2..32 (perf rule 5)."""
        if self.concurrency:
            return self.concurrency
        return max(2, min(32, math.ceil(rate * 0.3 * 1.5)))


def api_key_from(env: dict[str, str] | None = None, key_file: Path | None = None) -> Secret | None:
    """The key from ``--api-key-file`` or ``ALLO_API_KEY``; never from the command line.

    A key file holds the key alone on one line; blank lines and surrounding white space
    (a trailing newline, CRLF) are ignored. Anything else (a comment, a second line, a key with
    white space or control characters inside) is refused without echoing the file.
    """
    if key_file is not None:
        return Secret(_key_from_file(key_file))
    value = (env if env is not None else dict(os.environ)).get(API_KEY_ENV, "").strip()
    if not value:
        return None
    _check_key(value, API_KEY_ENV)
    return Secret(value)


def _key_from_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        msg = f"{path}: cannot read the API key file ({reason})"
        raise UsageError(msg) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        msg = f"{path}: the API key file is empty"
        raise UsageError(msg)
    if len(lines) > 1:
        msg = (
            f"{path}: the API key file has {len(lines)} non-blank lines; "
            "it must hold the key alone on one line (no comments)"
        )
        raise UsageError(msg)
    _check_key(lines[0], str(path))
    if stat.S_ISREG(mode) and mode & 0o077:
        log.warning(
            "%s: the API key file is readable by others (mode %s); chmod 600 it",
            path,
            oct(mode & 0o777),
        )
    return lines[0]


def _check_key(key: str, where: str) -> None:
    """Refuse a key that could not travel in a header, without ever echoing it."""
    if any(ch.isspace() or unicodedata.category(ch)[0] == "C" for ch in key):
        msg = f"{where}: the API key holds white space or control characters; it is refused"
        raise UsageError(msg)
    if not key.isascii():  # a header carries ASCII only: such a key cannot even be sent
        msg = f"{where}: the API key holds characters other than ASCII; it is refused"
        raise UsageError(msg)


def parse_deadline(text: str, now: datetime | None = None) -> datetime:
    """``--finish-by``: an ISO 8601 date-time (local time when it has no offset), or ``HH:MM``
    for the next such local time (tomorrow's when today's has passed)."""
    current = now or datetime.now().astimezone()
    try:
        if len(text) <= 5 and ":" in text:
            hour, minute = (int(part) for part in text.split(":"))
            deadline = current.replace(hour=hour, minute=minute, second=0, microsecond=0)
            return deadline if deadline > current else deadline + timedelta(days=1)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        msg = f"--finish-by {text!r}: use an ISO 8601 date-time (2026-11-26T06:00) or HH:MM"
        raise UsageError(msg) from None
    return parsed if parsed.tzinfo else parsed.astimezone()


def check_base_url(url: str) -> str:
    """Refuse plain ``http://`` unless the host is loopback (the key would travel in clear)."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Not echoed: the URL holds a password. The key goes in ALLO_API_KEY, nothing in URLs.
        msg = "--base-url: a user name or password in the URL is refused; give only the host"
        raise UsageError(msg)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"--base-url {url!r} is not an http(s) URL"
        raise UsageError(msg)
    try:
        parts.port  # noqa: B018 (urlsplit checks the port only when it is asked for)
    except ValueError:
        msg = f"--base-url {url!r}: the port must be a number from 0 to 65535"
        raise UsageError(msg) from None
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        msg = f"--base-url {url!r}: plain http is allowed only to a loopback host; use https"
        raise UsageError(msg)
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_column_mapping(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["content=new_summary"]`` → ``{"content": "new_summary"}`` (our name = file's name)."""
    mapping: dict[str, str] = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not sep or not theirs or ours not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            msg = (
                f"--column {item!r}: use NAME=FILE_COLUMN with NAME one of "
                f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}"
            )
            raise UsageError(msg)
        if ours in mapping and mapping[ours] != theirs:
            given = f"{mapping[ours]!r} and {theirs!r}"
            msg = f"--column {ours}= is given twice ({given}); give it once"
            raise UsageError(msg)
        mapping[ours] = theirs
    return mapping


def literal_path(path: Path) -> str:
    """``path`` as polars' NDJSON readers take it literally.

    polars expands ``*``, ``?`` and ``[...]`` in every path it is given, so a file named
    ``fixes[1].ndjson`` was "not found". Its CSV and Parquet readers take ``glob=False``; the
    NDJSON ones do not (polars 1.x), so each such character is put in a class of its own.
    """
    return "".join(f"[{char}]" if char in "*?[]" else char for char in str(path))
