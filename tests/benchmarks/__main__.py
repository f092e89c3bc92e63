"""``make bench``: every target of issues 5, 13 and 14, measured side by side in one run.

``python -m tests.benchmarks [--quick] [--only NAME ...]``. ``--quick`` shortens the pacing
runs, the request counts and the big files (a tenth of the rows) for a smoke test; only a full
run is reported in the README. The machine is shared and noisy: ratios measured side by side
in one run are what counts.
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
from typing import Any

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


def transport_loop(variant: str, base_url: str, rows: int) -> ChildRun:
    """``transports.py``'s ``variant`` loop at ``base_url``: ``rows`` PATCHes after 1000
    warm-up ones, W=8, in a process of its own."""
    args = ["--client", variant, base_url, "--requests", str(rows), "--warmup", "1000"]
    return run_child(
        [sys.executable, "-m", "tests.benchmarks.transports", *args, "--workers", "8"],
        env={"ALLO_API_KEY": KEY},
        timeout=1800,
    )


def client_cpu(folder: Path, quick: bool) -> list[Outcome]:
    """Unlimited rate, 2 KB PATCHes: allo-batch's CPU per request vs a bare aiohttp loop.

    The loop is ``transports.py``'s ``aiohttp`` variant (one ClientSession, a pool of W), run
    at the same sandbox with the same bodies and the same concurrency; it counts the CPU of
    its requests only (after 1000 warm-up PATCHes), allo-batch its whole process (imports,
    reading, reads before writing, before-images, journal, result file). allo-batch runs with
    ``--write-always``: the loop wrote the same contents first, and every row must be sent.
    """
    rows = 20_000 if quick else 100_000
    source = write_corrections(folder / "cpu.csv", rows, content_bytes=2048)
    figures: dict[str, tuple[float, float]] = {}
    with sandbox(source, write_rate=10_000_000) as sb:
        loop = transport_loop("aiohttp", sb.base_url, rows)
        if loop.code != 0:
            msg = f"the aiohttp loop failed: {loop.stderr[-2000:]}"
            raise RuntimeError(msg)
        result = json.loads(loop.stdout)
        if result["ok"] != rows:
            msg = f"the aiohttp loop: {result['ok']}/{rows} answered 200"
            raise RuntimeError(msg)
        figures["aiohttp"] = (result["cpu"] / rows, rows / result["wall"])
        # For the split only: AlloClient alone over allo-batch's aiohttp transport, measured
        # as the loop is (transports.py's allo-aiohttp variant).
        alone = transport_loop("allo-aiohttp", sb.base_url, rows)
        split = json.loads(alone.stdout)["cpu"] / rows if alone.code == 0 else float("nan")
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
                    "--write-always",
                ),
                env={"ALLO_API_KEY": KEY},
                timeout=1800,
            )
            summary = child.summary()
            sent = summary["requests"]
            if summary["by_status"].get("updated") != rows:
                msg = f"W={workers}: {summary['by_status']} of {rows} rows"
                raise RuntimeError(msg)
            figures[str(workers)] = (child.cpu / sent, summary["achieved_rate"])
    cpu_ratio = figures["8"][0] / figures["aiohttp"][0]
    pool_ratio = figures["64"][1] / figures["8"][1]
    return [
        Outcome(
            f"client CPU per request, {rows // 1000}k PATCHes of 2 KB, unlimited, W=8",
            f"{cpu_ratio:.2f} x a bare aiohttp loop, same concurrency",
            "<= 2.5",
            cpu_ratio <= 2.5,
            f"{figures['8'][0] * 1e6:.0f} vs {figures['aiohttp'][0] * 1e6:.0f} CPU-us/request; "
            f"{figures['8'][1]:.0f} vs {figures['aiohttp'][1]:.0f} req/s; AlloClient alone "
            f"{split * 1e6:.0f} CPU-us/request",
        ),
        Outcome(
            "throughput, concurrency 64 vs 8",
            f"{pool_ratio:.2f}",
            ">= 0.9",
            pool_ratio >= 0.9,
            f"{figures['64'][1]:.0f} vs {figures['8'][1]:.0f} req/s",
        ),
    ]


def dry_run(path: Path) -> ChildRun:
    """``run --dry-run`` of a file, unpinned (as users run it), checked."""
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
    return child


PYARROW_READ = "import sys, pyarrow.csv as c; print(c.read_csv(sys.argv[1]).num_rows)"


def memory(folder: Path, quick: bool) -> list[Outcome]:
    """Peak RSS of the whole ``run --dry-run``; on the 10M-row file also the time of the dry
    run, of ``allo-batch validate`` and of reading it with pyarrow alone.

    ``validate`` and the pyarrow read alternate three times (medians); the pyarrow read is a
    whole process too (``pyarrow.csv.read_csv``: all columns, multithreaded, the fastest way
    pyarrow reads the file).
    """
    scale = 10 if quick else 1
    inputs = [
        ("1M rows x 2 KB, CSV", folder / "m1.csv", 1_000_000, 2048, 700),
        ("1M rows x 2 KB, Parquet, 125k-row groups", folder / "m1.parquet", 1_000_000, 2048, 900),
        ("10M short rows, CSV", folder / "m10.csv", 10_000_000, 20, 500),
    ]
    outcomes, peaks = [], {}
    for label, path, rows, width, budget in inputs:
        rows //= scale
        write_corrections(path, rows, content_bytes=width)
        child = dry_run(path)
        peaks[path.name] = child.max_rss_mb
        outcomes.append(
            Outcome(
                f"peak RSS, run --dry-run, {label}{' /10' if quick else ''}",
                f"{child.max_rss_mb:.0f} MB",
                f"<= {budget} MB",
                child.max_rss_mb <= budget,
                f"{child.wall:.1f} s",
            )
        )
        if path.name == "m10.csv":
            outcomes.extend(ten_million(path, rows, child))
        path.unlink()
    ratio = peaks["m10.csv"] / peaks["m1.csv"]
    outcomes.insert(
        3, Outcome("peak RSS, 10M rows / 1M rows", f"{ratio:.2f}", "<= 1.2", ratio <= 1.2)
    )
    return outcomes


def ten_million(path: Path, rows: int, dry: ChildRun) -> list[Outcome]:
    """Dry run vs ``validate`` vs pyarrow on the same 10M-row file (see :func:`memory`)."""
    checks, reads = [], []
    for _ in range(3):
        check = run_child(allo_batch("validate", str(path)), timeout=600, pinned=False)
        if check.code != 0 or f"{rows} rows" not in check.stdout:
            msg = f"validate: exit {check.code}: {check.stdout[-500:]} {check.stderr[-1000:]}"
            raise RuntimeError(msg)
        checks.append(check)
        read = run_child([sys.executable, "-c", PYARROW_READ, str(path)], timeout=600, pinned=False)
        if read.code != 0 or read.stdout.strip() != str(rows):
            msg = f"pyarrow read: exit {read.code}: {read.stderr[-1000:]}"
            raise RuntimeError(msg)
        reads.append(read)
    check_wall = statistics.median(c.wall for c in checks)
    read_wall = statistics.median(r.wall for r in reads)
    check_rss = max(c.max_rss_mb for c in checks)
    label = f"{rows // 1_000_000}M" if rows >= 1_000_000 else f"{rows // 1000}k"
    return [
        Outcome(
            f"validation of {label} rows (whole `allo-batch validate`)",
            f"{check_wall:.2f} s",
            "<= 5 s",
            check_wall <= 5.0,
            f"median of 3; {check_rss:.0f} MB",
        ),
        Outcome(
            f"`validate`, {label} short rows, vs reading the file with pyarrow alone",
            f"{check_wall / read_wall:.2f} x",
            "<= 2",
            check_wall / read_wall <= 2.0,
            f"{check_wall:.2f} vs {read_wall:.2f} s, medians of 3 alternated; "
            f"pyarrow {max(r.max_rss_mb for r in reads):.0f} MB",
        ),
        Outcome(
            f"`run --dry-run`, {label} short rows, vs `validate` of the same file",
            f"{dry.wall / check_wall:.2f} x",
            "<= 2",
            dry.wall / check_wall <= 2.0,
            f"{dry.wall:.2f} vs {check_wall:.2f} s",
        ),
    ]


def big_run(folder: Path, quick: bool) -> list[Outcome]:
    """A real 1M x 2 KB run with reads and before-images against a fast sandbox key, then the
    same command again (nothing left to send): the peak RSS of each, unpinned."""
    rows = 100_000 if quick else 1_000_000
    source = write_corrections(folder / "big.csv", rows, content_bytes=2048)
    output = folder / "big.results.parquet"
    args = run_args(source, output, "", "--rate", "10000000")
    with sandbox(source, write_rate=10_000_000, read_rate=10_000_000) as sb:
        args[args.index("--base-url") + 1] = sb.base_url
        first = run_child(args, env={"ALLO_API_KEY": KEY}, timeout=2400, pinned=False)
        summary = first.summary()
        again = run_child(args, env={"ALLO_API_KEY": KEY}, timeout=1200, pinned=False)
        rerun = again.summary()
        refused = sb.counters().get("rate_limited", 0)
    images = len(list(Path(str(output) + ".before").glob("*")))
    updated = summary["by_status"].get("updated", 0)
    label = "1M" if rows == 1_000_000 else f"{rows // 1000}k"
    ratio = again.max_rss_mb / first.max_rss_mb
    return [
        Outcome(
            f"peak RSS, real run, {label} rows x 2 KB, reads and before-images",
            f"{first.max_rss_mb:.0f} MB",
            "<= 840 MB",
            first.max_rss_mb <= 840 and updated == rows and summary["exit_code"] == 0,
            f"{updated}/{rows} updated, {summary['reads']} reads, {refused} 429s, "
            f"{first.wall:.0f} s, {summary['achieved_rate']:.0f} writes/s; "
            f"{images} before-image files",
        ),
        Outcome(
            "peak RSS, rerun with nothing to send after that run",
            f"{ratio:.2f} x the run's",
            "<= 1.2",
            ratio <= 1.2 and rerun["requests"] == 0 and rerun["exit_code"] == 0,
            f"{again.max_rss_mb:.0f} vs {first.max_rss_mb:.0f} MB; {rerun['requests']} writes, "
            f"{again.wall:.1f} s",
        ),
    ]


def look(folder: Path, quick: bool) -> list[Outcome]:
    """Issue 13: 10k rows of which the sandbox already holds half; the default run (reads
    first, writes only what differs) vs ``--write-always``, same key limit (200/s). The rows
    name no template (each call has one summary), so the reads are certain.

    The sandbox's world file cannot hold contents, so each of the two sandboxes is first given
    the even rows by a run with another, unlimited key (``--blind``); the measured runs use the
    benchmark key. Each measured run's reads and writes are the sandbox's own counts for it.
    """
    limit, rows = 200, 2_000 if quick else 10_000
    generated = write_corrections(folder / "generated.csv", rows, content_bytes=300)
    # Rows without template_key: a read is certain only for a call's only summary (look.py);
    # a row naming a template is written whatever the read shows.
    frame = pl.read_csv(generated, infer_schema=False).select("call_id", "content")
    source, half = folder / "look.csv", folder / "half.csv"
    frame.write_csv(source)
    frame.gather_every(2).write_csv(half)
    world = folder / "world.json"
    seeder = "ak_bench_seeder"
    world.write_text(
        json.dumps(
            {"keys": [{"key": seeder, "write_per_second": 10_000_000, "read_per_second": 10_000}]}
        )
    )
    measured: dict[str, tuple[ChildRun, dict[str, Any], dict[str, int]]] = {}
    for name, extra in (("look", ()), ("always", ("--write-always",))):
        with sandbox(source, write_rate=limit, read_rate=limit, world=world) as sb:
            seed = run_child(
                run_args(half, folder / f"{name}.half.results.csv", sb.base_url, "--blind"),
                env={"ALLO_API_KEY": seeder},
                timeout=600,
            )
            if seed.summary()["by_status"].get("updated") != (rows + 1) // 2:
                msg = f"seeding half the rows failed: {seed.summary()['by_status']}"
                raise RuntimeError(msg)
            before = sb.counters()
            child = run_child(
                run_args(source, folder / f"{name}.results.csv", sb.base_url, *extra),
                env={"ALLO_API_KEY": KEY},
                timeout=rows / limit * 3 + 120,
            )
            after = sb.counters()
        counts = {k: after.get(k, 0) - before.get(k, 0) for k in ("patch", "batch", "rate_limited")}
        measured[name] = (child, child.summary(), counts)
    (fast, fast_summary, fast_counts), (slow, slow_summary, slow_counts) = (
        measured["look"],
        measured["always"],
    )
    ratio = fast.wall / slow.wall
    refused = fast_counts["rate_limited"] + slow_counts["rate_limited"]
    share = fast_counts["batch"] / max(1, fast_counts["patch"])
    right = (
        fast_summary["by_status"] == {"updated": rows // 2, "unchanged": (rows + 1) // 2}
        and slow_summary["by_status"].get("updated") == rows
    )
    return [
        Outcome(
            f"{rows // 1000}k rows, half already right, vs --write-always (limit {limit}/s)",
            f"{ratio:.2f} x the time; {refused} 429s; reads {share * 100:.1f} % of writes",
            "<= 0.55; 0; <= 2 %",
            ratio <= 0.55 and refused == 0 and share <= 0.02 and right,
            f"{fast.wall:.1f} vs {slow.wall:.1f} s; {fast_counts['patch']} writes + "
            f"{fast_counts['batch']} reads vs {slow_counts['patch']} + {slow_counts['batch']}; "
            f"{fast_summary['by_status']}",
        )
    ]


def help_speed(folder: Path, quick: bool) -> list[Outcome]:
    """``allo-batch --help`` wall time over ``python -c pass`` (and, for context, over
    ``python -c "import click"``), medians of interleaved runs."""
    script = Path(sys.executable).with_name("allo-batch")
    bare, clicked, helped = [], [], []
    for _ in range(15):
        bare.append(run_child([sys.executable, "-c", "pass"], timeout=60).wall)
        clicked.append(run_child([sys.executable, "-c", "import click"], timeout=60).wall)
        helped.append(run_child([str(script), "--help"], timeout=60).wall)
    bare_ms, click_ms, help_ms = (statistics.median(x) * 1000 for x in (bare, clicked, helped))
    ratio = help_ms / bare_ms
    return [
        Outcome(
            "`allo-batch --help` / `python -c pass`",
            f"{ratio:.2f}",
            "<= 3",
            ratio <= 3.0,
            f'{help_ms:.0f} vs {bare_ms:.0f} ms; for context `python -c "import click"` is '
            f"{click_ms:.0f} ms, {click_ms / bare_ms:.2f} x pass, and --help "
            f"{help_ms / click_ms:.2f} x it",
        )
    ]


SCENARIOS: dict[str, Scenario] = {
    "help": help_speed,
    "memory": memory,
    "spent": spent_key,
    "pace100": pacing(100, 60, "latency=50ms,jitter=20ms", "latency 50 +- 20 ms", 0.995),
    "pace1000": pacing(1000, 60, "latency=10ms,jitter=10ms", "latency 0-20 ms", 0.98),
    "cpu": client_cpu,
    "look": look,
    "tworuns": two_runs,
    "pace5": pacing(5, 300, "latency=50ms,jitter=20ms", "latency 50 +- 20 ms", 0.995),
    "bigrun": big_run,
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
