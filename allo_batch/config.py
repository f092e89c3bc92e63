"""Frozen configuration of a run. The CLI and the Python API both build a :class:`JobConfig`."""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from allo_batch.constants import DEFAULT_BASE_URL
from allo_batch.errors import UsageError

InputFormat = Literal["csv", "parquet", "ndjson"]
FORMATS: Final[dict[str, InputFormat]] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
}
REQUIRED_COLUMNS: Final = ("call_id", "content")
OPTIONAL_COLUMNS: Final = ("template_key",)
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
    breaker_threshold: int = 25


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxOptions:
    """``run --sandbox``: an embedded simulator seeded from the input."""

    world_file: Path | None = None
    write_rate: int = 5
    faults: str | None = None
    seed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class JobConfig:
    """Everything one run needs. Build it with keywords; defaults are production defaults."""

    input: Path
    output: Path | None = None
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
    dry_run: bool = False
    force: bool = False
    sandbox: SandboxOptions | None = None
    batch_size: int = 20_000
    progress: bool = False
    log_interval: float = 30.0

    @property
    def format(self) -> InputFormat:
        """The input format: explicit, else from the file extension."""
        if self.input_format:
            return self.input_format
        found = FORMATS.get(self.input.suffix.lower())
        if found is None:
            msg = (
                f"{self.input}: cannot tell the format from the extension "
                f"{self.input.suffix or '(none)'}; use --format csv|parquet|ndjson"
            )
            raise UsageError(msg)
        return found

    @property
    def output_path(self) -> Path:
        """The result file: explicit, else ``<input stem>.results.parquet`` here."""
        return self.output or Path(f"{self.input.stem}.results.parquet")

    def workers(self, rate: float) -> int:
        """Little's law with a 300 ms latency guess and 1.5x headroom, 2..32 (perf rule 5)."""
        if self.concurrency:
            return self.concurrency
        return max(2, min(32, math.ceil(rate * 0.3 * 1.5)))


def api_key_from(env: dict[str, str] | None = None, key_file: Path | None = None) -> Secret | None:
    """The key from ``--api-key-file`` or ``ALLO_API_KEY``; never from the command line."""
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            msg = f"{key_file}: cannot read the API key file ({exc.strerror})"
            raise UsageError(msg) from exc
        if not text:
            msg = f"{key_file}: the API key file is empty"
            raise UsageError(msg)
        return Secret(text)
    value = (env if env is not None else dict(os.environ)).get(API_KEY_ENV, "").strip()
    return Secret(value) if value else None


def check_base_url(url: str) -> str:
    """Refuse plain ``http://`` unless the host is loopback (the key would travel in clear)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"--base-url {url!r} is not an http(s) URL"
        raise UsageError(msg)
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
        mapping[ours] = theirs
    return mapping
