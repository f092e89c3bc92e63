"""Shared pieces of the benchmarks: child processes with their own CPU and RSS, a sandbox in its
own process, generated inputs, and the result table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl

KEY = "ak_bench_full_access"
TEMPLATES = ("MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL")
CLIENT_CORE, SERVER_CORE = 0, 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """One row of the benchmark table."""

    scenario: str
    figure: str
    target: str
    passed: bool
    note: str = ""


@dataclass(frozen=True, slots=True)
class ChildRun:
    """A finished child process: exit code, output, its own CPU seconds, peak RSS and wall time."""

    code: int
    stdout: str
    stderr: str
    cpu: float
    max_rss_mb: float
    wall: float

    def summary(self) -> dict[str, Any]:
        """The ``--json`` summary it printed."""
        try:
            value: dict[str, Any] = json.loads(self.stdout)
        except ValueError as exc:
            msg = f"no JSON summary (exit {self.code}): {self.stderr[-2000:]}"
            raise RuntimeError(msg) from exc
        return value


def pin(core: int) -> None:
    """Pin the calling process to one core when the machine has more than one."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {core % (os.cpu_count() or 1)})


def run_child(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float, pinned: bool = True
) -> ChildRun:
    """Run a child (pinned to the client core when a sandbox runs on the other one); read its
    own CPU and peak RSS from ``wait4``.

    Memory and validation run unpinned, as users run them: pinned to one core, polars and pyarrow
    start one worker thread instead of two, which understated the peak RSS by up to 190 MB.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        # taskset rather than a preexec_fn: without one, subprocess uses vfork, so the child's
        # peak RSS does not start with a copy of this process's (fork + exec counts it).
        process = subprocess.Popen(
            _pinned(args, CLIENT_CORE) if pinned else list(args),
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
            time.sleep(0.02)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(
            code=process.returncode,
            stdout=out.read().decode(),
            stderr=err.read().decode(),
            cpu=usage.ru_utime + usage.ru_stime,
            max_rss_mb=usage.ru_maxrss / 1024,
            wall=wall,
        )


def _pinned(args: Sequence[str], core: int) -> list[str]:
    taskset = shutil.which("taskset")
    if taskset and (os.cpu_count() or 1) > 1:
        return [taskset, "-c", str(core % (os.cpu_count() or 1)), *args]
    return list(args)


def allo_batch(*args: str) -> list[str]:
    """The command line of ``allo-batch`` with this interpreter."""
    return [sys.executable, "-m", "allo_batch", *args]


@dataclass(frozen=True, slots=True)
class Sandbox:
    """A sandbox served by its own process, pinned to the other core."""

    base_url: str
    process: subprocess.Popen[str]

    def state(self, *, written: bool = False) -> dict[str, Any]:
        query = "?written=1" if written else ""
        answer = httpx.get(f"{self.base_url}/_sandbox/state{query}", timeout=60)
        answer.raise_for_status()
        value: dict[str, Any] = answer.json()
        return value

    def counters(self) -> dict[str, int]:
        return dict(self.state(written=True)["counters"])


@contextmanager
def sandbox(
    from_input: Path,
    *,
    write_rate: int,
    read_rate: int | None = None,
    world: Path | None = None,
    faults: str | None = None,
    seed: int = 0,
) -> Iterator[Sandbox]:
    """``allo-batch sandbox`` on a free loopback port, seeded from the input (and ``world``, a
    world JSON file, e.g. with extra keys)."""
    args = allo_batch(
        "sandbox",
        "--port",
        "0",
        "--api-key",
        KEY,
        "--write-rate",
        str(write_rate),
        "--from-input",
        str(from_input),
        "--seed",
        str(seed),
    )
    if faults:
        args += ["--faults", faults]
    if read_rate is not None:
        args += ["--read-rate", str(read_rate)]
    if world is not None:
        args += ["--world", str(world)]
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: pin(SERVER_CORE),
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 300
        url = None
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"http://127\.0\.0\.1:\d+", line)
            url = match.group(0) if match else None
        if url is None:
            msg = "the sandbox did not start"
            raise RuntimeError(msg)
        # Drain its output so a full pipe never blocks it.
        import threading

        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield Sandbox(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def corrections(rows: int, *, content_bytes: int) -> pl.LazyFrame:
    """``rows`` valid corrections with contents of about ``content_bytes`` bytes each."""
    filler = ("corrected summary text " * (content_bytes // 23 + 1))[:content_bytes]
    index = pl.col("i").cast(pl.String)
    return pl.LazyFrame({"i": pl.int_range(0, rows, eager=True)}).select(
        ("cll-" + index.str.zfill(9)).alias("call_id"),
        pl.when(pl.col("i") % 2 == 0)
        .then(pl.lit(TEMPLATES[0]))
        .otherwise(pl.lit(TEMPLATES[1]))
        .alias("template_key"),
        ("## " + index + " " + pl.lit(filler)).alias("content"),
    )


def write_corrections(
    path: Path, rows: int, *, content_bytes: int, row_group: int = 125_000
) -> Path:
    """Write a corrections file from a child process, so this one stays small (see run_child)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.benchmarks.common",
            str(path),
            str(rows),
            str(content_bytes),
            str(row_group),
        ],
        check=True,
    )
    return path


def _write_here(path: Path, rows: int, content_bytes: int, row_group: int) -> None:
    """Write a corrections file with polars' streaming sinks."""
    frame = corrections(rows, content_bytes=content_bytes)
    if path.suffix == ".parquet":
        frame.sink_parquet(path, row_group_size=row_group)
    else:
        frame.sink_csv(path)


def table(outcomes: list[Outcome]) -> str:
    """The benchmark table as Markdown."""
    lines = ["| scenario | figure | target | result |", "|---|---|---|---|"]
    for o in outcomes:
        verdict = "pass" if o.passed else "FAIL"
        note = f" ({o.note})" if o.note else ""
        lines.append(f"| {o.scenario} | {o.figure}{note} | {o.target} | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _write_here(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
