"""Plan the time: a dry run says how long the writes take at the key's limit, and --finish-by
stops a run cleanly at its deadline so that the next window's run resumes."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from allo_batch.cli import cli
from allo_batch.config import parse_deadline
from allo_batch.errors import UsageError
from allo_batch.record import read_results
from allo_batch.sandbox import ApiKey, build_world
from allo_batch.sandbox.world import World
from tests.helpers import SandboxFactory

KEY = "ak_deadline_key_0e5c"


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(cli, args, env={"ALLO_API_KEY": KEY}, catch_exceptions=False)


def test_a_deadline_is_iso_8601_or_the_next_hh_mm() -> None:
    """HH:MM is the next such local time; an ISO time without offset is local; junk is exit 2."""
    now = datetime(2026, 11, 25, 22, 30).astimezone()
    assert parse_deadline("06:00", now) == (now + timedelta(hours=7, minutes=30))
    assert parse_deadline("23:00", now) == now.replace(hour=23, minute=0)
    assert parse_deadline("2026-11-26T06:00:00+00:00", now).utcoffset() == timedelta(0)
    assert parse_deadline("2026-11-26T06:00", now).tzinfo is not None
    with pytest.raises(UsageError, match="--finish-by 'tomorrow'"):
        parse_deadline("tomorrow", now)


def calls_at_10_per_second(tmp_path: Path, count: int) -> tuple[Path, World]:
    """``count`` corrections, and a world of their calls whose key writes 10 a second."""
    ids = [f"cll-{i:03d}" for i in range(count)]
    source = tmp_path / "in.csv"
    pl.DataFrame({"call_id": ids, "content": [f"fix {c}" for c in ids]}).write_csv(source)
    world = build_world(seed_pairs=[(c, None) for c in ids])
    world.add_key(ApiKey(key=KEY, write_per_second=10, read_per_second=10))
    return source, world


def test_a_run_that_cannot_finish_says_so_stops_at_the_deadline_and_a_rerun_finishes(
    sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """80 rows at 10/s need 8 s; a deadline 3 s away: warned at the start, writing until the
    deadline and none after it (exit 3, reason named, result file written), and the rerun lands
    the rest, every row once."""
    source, world = calls_at_10_per_second(tmp_path, 80)
    output = tmp_path / "out.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        applied: list[float] = []  # when each write was applied (sandbox side)
        patch = sandbox.app._patch_summary

        def timed_patch(*args: Any) -> Any:
            answer = patch(*args)
            applied.append(time.time())
            return answer

        monkeypatch.setattr(sandbox.app, "_patch_summary", timed_patch)
        # Set once the sandbox is up, so that a slow start does not eat the run's window.
        deadline = datetime.now().astimezone() + timedelta(seconds=3)
        args = ["run", str(source), "-o", str(output), "--base-url", sandbox.base_url, "--json"]
        stopped = invoke([*args, "--finish-by", deadline.isoformat()])
        partial = read_results(output)
        during = list(applied)
        rest = invoke(args)
        state = sandbox.state()
    assert stopped.exit_code == 3
    assert "need about 8 s at 10 writes/s" in stopped.stderr
    summary = json.loads(stopped.stdout)
    assert "--finish-by deadline" in summary["stopped_reason"]
    updated = partial.filter(pl.col("status") == "updated").height
    assert 1 <= updated == len(during) <= 40
    # It wrote until the deadline (at 10/s, a write every 0.1 s), and nothing started after it
    # (those in flight may finish: the sandbox answers at once).
    end = deadline.timestamp()
    assert end - 1.0 <= max(during) <= end + 0.5, max(during) - end
    assert rest.exit_code == 0
    assert json.loads(rest.stdout)["by_status"] == {"skipped": updated, "updated": 80 - updated}
    assert all(s["writes"] == 1 for s in state["summaries"])


def test_a_dry_run_says_how_long_the_writes_would_take(tmp_path: Path) -> None:
    """Without a key: the rows it would send at the default 5/s, or at --rate."""
    ids = [f"cll-{i:03d}" for i in range(600)]
    source = tmp_path / "in.csv"
    pl.DataFrame({"call_id": ids, "content": ["x"] * 600}).write_csv(source)
    result = CliRunner().invoke(
        cli, ["run", str(source), "--dry-run", "--rate", "2"], env={}, catch_exceptions=False
    )
    assert result.exit_code == 0
    assert "writes    would take about 5m00s at 2/s" in result.stderr


def test_a_deadline_already_past_is_called_past_and_nothing_is_sent(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A deadline that passed (an Airflow retry after its window) is shown to the second and
    said to have passed, not "0 s away"; the run stops at once with exit 3, reason deadline,
    every row not_sent, so the next window's run sends them."""
    source, world = calls_at_10_per_second(tmp_path, 5)
    output = tmp_path / "out.csv"
    deadline = (datetime.now().astimezone() - timedelta(minutes=5)).replace(second=7)
    with sandbox_factory(world, api_key=KEY) as sandbox:
        args = ["run", str(source), "-o", str(output), "--base-url", sandbox.base_url, "--json"]
        stopped = invoke([*args, "--finish-by", deadline.replace(microsecond=0).isoformat()])
        patches = sandbox.state()["counters"].get("patch", 0)
    assert stopped.exit_code == 3, stopped.output
    assert f"--finish-by {deadline.isoformat(timespec='seconds')} passed " in stopped.stderr
    assert " ago: the run will stop then" in stopped.stderr
    assert patches == 0
    assert set(read_results(output)["status"]) == {"not_sent"}
