"""``make bench``: every target of issue 5, measured side by side in one run.

``python -m tests.benchmarks [--quick] [--only NAME ...]``. ``--quick`` shortens the pacing
runs and the request counts for a smoke test; only a full run is reported in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import polars as pl

from tests.benchmarks.common import (
    KEY,
    ChildRun,
    Outcome,
    allo_batch,
    run_child,
    sandbox,
    table,
    write_corrections,
)

Scenario = Callable[[Path, bool], list[Outcome]]


def run_args(source: Path, output: Path, base_url: str, *extra: str) -> list[str]:
    return allo_batch(
        "run",
        str(source),
        "-o",
        str(output),
        "--base-url",
        base_url,
        "--no-progress",
        "--json",
        *extra,
    )


def pacing(limit: int, seconds: float, faults: str, label: str, target: float) -> Scenario:
    """One run at the key's limit: the share of the limit it sends, and its 429s (none).

    ``--blind``: the look stage's reads take permits from the same pacer (about 1 % of them),
    and the achieved rate counts writes only; without reads it measures the pacer alone.
    """

    def scenario(folder: Path, quick: bool) -> list[Outcome]:
        duration = seconds / 10 if quick else seconds
        rows = int(limit * duration)
        source = write_corrections(folder / f"pace{limit}.csv", rows, content_bytes=300)
        with sandbox(source, write_rate=limit, faults=faults, seed=limit) as sb:
            child = run_child(
                run_args(source, folder / f"pace{limit}.results.csv", sb.base_url, "--blind"),
                env={"ALLO_API_KEY": KEY},
                timeout=duration * 3 + 120,
            )
            summary = child.summary()
            refused = sb.counters().get("rate_limited", 0)
        ratio = (summary.get("achieved_rate") or 0.0) / limit
        ok = ratio >= target and refused == 0 and summary["by_status"].get("updated") == rows
        return [
            Outcome(
                f"pacing at {limit}/s, {duration:.0f} s, {label}",
                f"{ratio:.3f} of allowed; {refused} 429s",
                f">= {target}; 0",
                ok,
                f"{summary['by_status'].get('updated', 0)}/{rows} updated",
            )
        ]

    return scenario


def two_runs(folder: Path, quick: bool) -> list[Outcome]:
    """Two runs at once with one key (limit 20/s, 200 rows each): they share its budget.

    The combined rate is over the span from the first dispatch of either run to the last of
    either. A run's summary gives its own dispatch span, ``(requests − 1) / achieved_rate``,
    and it ends a near-constant time after its last dispatch (the last answer, closing the
    files), so ``max(end) − min(end − span)`` over the two runs is that span.
    """
    limit, rows = 20, 100 if quick else 200
    both = write_corrections(folder / "both.csv", 2 * rows, content_bytes=300)
    frame = pl.read_csv(both)
    halves = [folder / "first.csv", folder / "second.csv"]
    frame.head(rows).write_csv(halves[0])
    frame.tail(rows).write_csv(halves[1])
    runs: list[tuple[float, ChildRun]] = []

    def run(half: Path, base_url: str) -> None:
        started = time.time()
        child = run_child(
            run_args(half, half.with_suffix(".results.csv"), base_url, "--blind"),
            env={"ALLO_API_KEY": KEY},
            timeout=2 * rows / limit * 3 + 120,
        )
        runs.append((started + child.wall, child))

    with sandbox(both, write_rate=limit, faults="latency=50ms,jitter=20ms", seed=2) as sb:
        threads = [threading.Thread(target=run, args=(half, sb.base_url)) for half in halves]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        refused = sb.counters().get("rate_limited", 0)
    summaries = [child.summary() for _, child in runs]
    ends = [end for end, _ in runs]
    spans = [(s["requests"] - 1) / s["achieved_rate"] for s in summaries]
    requests = sum(s["requests"] for s in summaries)
    combined = (requests - 1) / (max(ends) - min(e - s for e, s in zip(ends, spans, strict=True)))
    ratio = combined / limit
    updated = sum(s["by_status"].get("updated", 0) for s in summaries)
    return [
        Outcome(
            f"two runs at once with one key (limit {limit}/s, {rows} rows each)",
            f"{ratio:.3f} of allowed together; {refused} 429s",
            ">= 0.97; 0",
            ratio >= 0.97 and refused == 0 and updated == 2 * rows,
            f"{updated}/{2 * rows} updated",
        )
    ]


def spent_key(folder: Path, quick: bool) -> list[Outcome]:
    """Another client spends 3 of the 5 writes of the window in which the run starts."""
    limit, rows = 5, 40
    source = write_corrections(folder / "spent.csv", rows, content_bytes=300)
    headers = {"Authorization": f"Api-Key {KEY}", "Content-Type": "application/json"}
    with sandbox(source, write_rate=limit, faults="latency=50ms,jitter=20ms") as sb:
        process = subprocess.Popen(
            run_args(source, folder / "spent.results.csv", sb.base_url),
            env={**os.environ, "ALLO_API_KEY": KEY},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Spend 3 writes as soon as the run has asked /me (its first PATCH comes right after),
        # then again at the start of the next two windows.
        deadline = time.monotonic() + 60
        while sb.counters().get("requests", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        spent = 0
        with httpx.Client(base_url=sb.base_url, headers=headers, timeout=10) as client:
            for window in range(3):
                if window:
                    time.sleep(1.0 - time.time() % 1.0 + 0.01)
                for n in range(3):
                    answer = client.patch(
                        f"/v2/api/conversations/items/cll-{n:09d}/summary",
                        json={"content": "other client", "template_key": "MARKDOWN_CLASSIC"},
                    )
                    spent += answer.status_code == 200
        out, _err = process.communicate(timeout=120)
        summary = json.loads(out)
    refused = summary["rate_limited"]
    return [
        Outcome(
            "key partly spent by another client at start",
            f"{refused} 429s for the run",
            "0",
            refused == 0 and summary["by_status"].get("updated") == rows,
            f"{summary['by_status'].get('updated', 0)}/{rows} updated; "
            f"the other client landed {spent} of 9",
        )
    ]


def client_cpu(folder: Path, quick: bool) -> list[Outcome]:
    """Unlimited rate, 2 KB PATCHes: allo-batch's CPU per request vs a bare httpx loop."""
    rows = 20_000 if quick else 100_000
    source = write_corrections(folder / "cpu.csv", rows, content_bytes=2048)
    figures: dict[str, tuple[float, float]] = {}
    with sandbox(source, write_rate=10_000_000) as sb:
        bare = run_child(
            [sys.executable, "-m", "tests.benchmarks.bare_httpx", sb.base_url, str(source), "8"],
            env={"ALLO_API_KEY": KEY},
            timeout=1800,
        )
        done = json.loads(bare.stdout)["ok"]
        figures["bare"] = (bare.cpu / done, done / bare.wall)
        for workers in (8, 64):
            child = run_child(
                run_args(
                    source,
                    folder / f"cpu{workers}.results.csv",
                    sb.base_url,
                    "--rate",
                    "10000000",
                    "--concurrency",
                    str(workers),
                ),
                env={"ALLO_API_KEY": KEY},
                timeout=1800,
            )
            summary = child.summary()
            sent = summary["requests"]
            figures[str(workers)] = (child.cpu / sent, summary["achieved_rate"])
    cpu_ratio = figures["8"][0] / figures["bare"][0]
    pool_ratio = figures["64"][1] / figures["8"][1]
    return [
        Outcome(
            f"client CPU per request, {rows // 1000}k PATCHes of 2 KB, unlimited, W=8",
            f"{cpu_ratio:.2f} x bare httpx",
            "<= 1.3",
            cpu_ratio <= 1.3,
            f"{figures['8'][0] * 1e6:.0f} vs {figures['bare'][0] * 1e6:.0f} CPU-us/request",
        ),
        Outcome(
            "throughput, concurrency 64 vs 8",
            f"{pool_ratio:.2f}",
            ">= 0.9",
            pool_ratio >= 0.9,
            f"{figures['64'][1]:.0f} vs {figures['8'][1]:.0f} req/s",
        ),
    ]


def memory(folder: Path, quick: bool) -> list[Outcome]:
    """Peak RSS of the whole ``run --dry-run``."""
    inputs = [
        ("1M rows x 2 KB, CSV", folder / "m1.csv", 1_000_000, 2048, 700),
        ("1M rows x 2 KB, Parquet, 125k-row groups", folder / "m1.parquet", 1_000_000, 2048, 900),
        ("10M short rows, CSV", folder / "m10.csv", 10_000_000, 20, 500),
    ]
    outcomes, peaks = [], {}
    for label, path, rows, width, budget in inputs:
        write_corrections(path, rows, content_bytes=width)
        child = run_child(
            allo_batch(
                "run",
                str(path),
                "--dry-run",
                "-o",
                str(path) + ".results.parquet",
                "--no-progress",
                "--json",
            ),
            timeout=1800,
            pinned=False,
        )
        child.summary()
        peaks[path.name] = child.max_rss_mb
        outcomes.append(
            Outcome(
                f"peak RSS, run --dry-run, {label}",
                f"{child.max_rss_mb:.0f} MB",
                f"<= {budget} MB",
                child.max_rss_mb <= budget,
                f"{child.wall:.1f} s",
            )
        )
        path.unlink()
    ratio = peaks["m10.csv"] / peaks["m1.csv"]
    outcomes.append(Outcome("peak RSS, 10M rows / 1M rows", f"{ratio:.2f}", "<= 1.2", ratio <= 1.2))
    return outcomes


def validation(folder: Path, quick: bool) -> list[Outcome]:
    """``allo-batch validate`` on 10M rows: prefix, length, template and duplicate checks."""
    path = write_corrections(folder / "v10.csv", 10_000_000, content_bytes=20)
    child = run_child(allo_batch("validate", str(path)), timeout=600, pinned=False)
    ok = child.code == 0 and "10000000 rows" in child.stdout
    return [
        Outcome(
            "validation of 10M rows (whole `allo-batch validate`)",
            f"{child.wall:.2f} s",
            "<= 5 s",
            ok and child.wall <= 5.0,
            f"{child.max_rss_mb:.0f} MB",
        )
    ]


def help_speed(folder: Path, quick: bool) -> list[Outcome]:
    """``allo-batch --help`` wall time over ``python -c pass``, medians of interleaved runs."""
    script = Path(sys.executable).with_name("allo-batch")
    bare, helped = [], []
    for _ in range(15):
        bare.append(run_child([sys.executable, "-c", "pass"], timeout=60).wall)
        helped.append(run_child([str(script), "--help"], timeout=60).wall)
    ratio = statistics.median(helped) / statistics.median(bare)
    return [
        Outcome(
            "`allo-batch --help` / `python -c pass`",
            f"{ratio:.2f}",
            "<= 4",
            ratio <= 4.0,
            f"{statistics.median(helped) * 1000:.0f} vs {statistics.median(bare) * 1000:.0f} ms",
        )
    ]


SCENARIOS: dict[str, Scenario] = {
    "help": help_speed,
    "validation": validation,
    "memory": memory,
    "spent": spent_key,
    "pace100": pacing(100, 60, "latency=10ms,jitter=10ms", "latency 0-20 ms", 0.995),
    "pace1000": pacing(1000, 60, "latency=10ms,jitter=10ms", "latency 0-20 ms", 0.98),
    "cpu": client_cpu,
    "pace5": pacing(5, 600, "latency=50ms,jitter=20ms", "latency 50 +- 20 ms", 0.995),
    "tworuns": two_runs,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test only)")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    options = parser.parse_args()
    outcomes: list[Outcome] = []
    started = time.strftime("%Y-%m-%d %H:%M")
    for name, scenario in SCENARIOS.items():
        if options.only and name not in options.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"allo-bench-{name}-") as folder:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                got = scenario(Path(folder), options.quick)
            except Exception as exc:  # a scenario that breaks is a failed target, not a crash
                got = [Outcome(name, f"error: {exc}", "runs", False)]
            for outcome in got:
                print(f"[bench]   {outcome}", file=sys.stderr, flush=True)
            outcomes.extend(got)
    print(
        f"allo-batch benchmarks, {started}{' (quick)' if options.quick else ''}; "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(table(outcomes))
    failed = [o for o in outcomes if not o.passed]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} targets met")
    return 1 if failed else 0


if __name__ == "__main__":
    threading.excepthook = lambda args: None  # the sandbox's drain threads end with the sandbox
    sys.exit(main())
