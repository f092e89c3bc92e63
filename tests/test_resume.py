"""Crash-safe reruns (issue 4): real `allo-batch run` processes killed, interrupted and refused.

Each test starts the sandbox in this process on 127.0.0.1, runs the CLI as a child process
against it, and proves the outcome from the sandbox's own inspection endpoint: every valid row
ends with its content, nothing is applied twice unless its answer was lost in flight (and then it
is counted), and the final result file has exactly one true row per input row.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import polars as pl
import pytest

from allo_batch.constants import Code
from allo_batch.lock import OutputLock, lock_path
from allo_batch.record import journal_path, read_before_images, sidecar_path
from allo_batch.sandbox.app import _Refusal
from tests.helpers import (
    KEY,
    PERSONA_NAMES,
    SPARE_KEY,
    TEMPLATES,
    SandboxFactory,
    invoke,
    sha,
    world_for,
)

INVALID_ROWS = {7: ("msg-000007", "INVALID_ITEM_ID"), 19: ("cll-000019", "INVALID_REQUEST_BODY")}
RUN_TIMEOUT = 60.0


def write_input(path: Path, rows: int, *, edit: int = 0, invalid: bool = True) -> pl.DataFrame:
    """``rows`` corrections; ``edit`` changes every content (same keys); two invalid rows."""
    frame = pl.DataFrame(
        {
            "call_id": [f"cll-{i:06d}" for i in range(rows)],
            "template_key": [TEMPLATES[i % 2] for i in range(rows)],
            "content": [
                f"## Summary {i}\nedit {edit}: {'corrected text ' * (i % 7 + 1)}"
                for i in range(rows)
            ],
        }
    )
    if invalid:
        for row, (call_id, _code) in INVALID_ROWS.items():
            content = "" if call_id.startswith("cll-") else frame["content"][row]
            frame = frame.with_columns(
                pl.when(pl.int_range(pl.len()) == row)
                .then(pl.lit(call_id))
                .otherwise(pl.col("call_id"))
                .alias("call_id"),
                pl.when(pl.int_range(pl.len()) == row)
                .then(pl.lit(content))
                .otherwise(pl.col("content"))
                .alias("content"),
            )
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    else:
        frame.write_csv(path)
    return frame


def start_run(args: list[str], *, key: str = KEY) -> subprocess.Popen[str]:
    env = {**os.environ, "ALLO_API_KEY": key}
    return subprocess.Popen(
        [sys.executable, "-m", "allo_batch", "run", *args, "--no-progress", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    out, err = process.communicate(timeout=RUN_TIMEOUT)
    summary = json.loads(out) if out.strip() else {}
    return process.returncode, summary, err


def wait_for_writes(sandbox: Any, at_least: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if sandbox.app.counters.get("writes_applied", 0) >= at_least:
            return
        time.sleep(0.02)
    pytest.fail(f"the run never reached {at_least} writes (exit {process.poll()})")


def journal_sends(journal: Path) -> int:
    """Requests a run has journaled as sent so far."""
    return journal.read_bytes().count(b'"e":"sent"') if journal.exists() else 0


def in_doubt_sends(journal: Path) -> Counter[tuple[str, str]]:
    """Per target, requests of killed runs that never got an answer, read from the journal."""
    doubt: Counter[tuple[str, str]] = Counter()
    run: list[dict[str, Any]] = []
    lines = journal.read_bytes().splitlines() if journal.exists() else []
    for raw in [*lines, b'{"e":"start"}']:
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # a torn last line
        if record.get("e") == "start":
            answered = {(r["call_id"], r["content_sha256"]) for r in run if r["e"] == "result"}
            for r in run:
                if r["e"] == "sent" and (r["call_id"], r["content_sha256"]) not in answered:
                    doubt[(r["call_id"], r["template_key"])] += 1
            run = []
        else:
            run.append(record)
    return doubt


def cut_off_in_flight(results: pl.DataFrame) -> tuple[pl.DataFrame, Counter[tuple[str, str]]]:
    """Rows a clean stop cut off in flight (they may have landed), and their targets."""
    cut_off = results.filter((pl.col("status") == "not_sent") & (pl.col("attempts") > 0))
    return cut_off, Counter(zip(cut_off["call_id"], cut_off["template_key"], strict=True))


def check_final(
    output: Path,
    frame: pl.DataFrame,
    state: dict[str, Any],
    doubt: Counter[tuple[str, str]],
) -> None:
    """One true row per input row; every valid row's content landed; extra writes were in doubt."""
    results = pl.read_csv(output, infer_schema_length=None)
    assert results["row"].to_list() == list(range(frame.height))
    assert results["call_id"].to_list() == frame["call_id"].to_list()
    summaries = {(s["call_id"], s["template_key"]): s for s in state["summaries"]}
    for row in results.iter_rows(named=True):
        if row["row"] in INVALID_ROWS:
            assert row["status"] == "invalid"
            assert row["error_code"] == INVALID_ROWS[row["row"]][1]
            continue
        target = (row["call_id"], row["template_key"])
        summary = summaries[target]
        assert row["status"] in ("updated", "skipped"), row
        assert row["content_sha256"] == sha(frame["content"][row["row"]])
        assert summary["content_sha256"] == row["content_sha256"], target
        assert summary["version"] == row["version"], target
        # Applied once, plus at most once per request whose answer was lost in a killed run.
        assert 1 <= summary["writes"] <= 1 + doubt[target], (target, summary["writes"])
    invalid_targets = {(c, t) for c, t in summaries if int(c[4:]) in INVALID_ROWS}
    assert all(summaries[t]["writes"] == 0 for t in invalid_targets)
    assert not journal_path(output).exists()
    assert not lock_path(output).exists()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("persona", PERSONA_NAMES)
def test_kill_9_at_random_moments_then_rerun_until_done(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str, seed: int
) -> None:
    """Runs killed with SIGKILL at random moments, then rerun to the end: every valid row holds
    its content, written once plus at most once per request whose answer was lost, whatever
    the persona (every row names a template, so a lagging read changes no decision: such
    rows are always written)."""
    chance = random.Random(seed)
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    frame = write_input(source, 240)
    world = world_for(frame, keys=(KEY, SPARE_KEY), write_rate=100)
    doubt: Counter[tuple[str, str]] = Counter()
    faults = "latency=40ms,jitter=30ms"
    with sandbox_factory(world, api_key=KEY, faults=faults, seed=seed, persona=persona) as sb:
        args = [str(source), "-o", str(output), "--base-url", sb.base_url]
        kills = 0
        epoch: Counter[tuple[str, str]] = Counter()
        for attempt in range(7):  # bounded: at most six kills, then a run to the end
            # The journal holds every run since the last one that finished (and deleted it);
            # a run can finish and be killed just before it exits.
            if not journal_path(output).exists():
                doubt += epoch
            epoch = in_doubt_sends(journal_path(output))
            process = start_run(args)
            if attempt < 6:
                try:
                    process.wait(timeout=chance.uniform(0.3, 1.8))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate(timeout=RUN_TIMEOUT)
                    kills += 1
                    continue
            code, summary, err = finish(process)
            break
        doubt += epoch
        assert code == 1, err  # the two invalid rows
        assert summary["by_status"].get("failed", 0) == 0
        assert summary["by_status"].get("not_sent", 0) == 0
        # Rows whose answers were lost are counted; some may have landed by a later request.
        assert summary["in_doubt_resent"] <= len(epoch)
        state = sb.state()
        # A rerun after a finished run sends nothing.
        code, again, err = finish(start_run(args))
        assert code == 1, err
        assert again["requests"] == 0
        assert again["by_status"]["skipped"] == frame.height - len(INVALID_ROWS)
        after = sb.state()
        assert after["summaries"] == state["summaries"]
        assert after["counters"]["writes_applied"] == state["counters"]["writes_applied"]
    assert kills >= 1
    check_final(output, frame, state, doubt)
    extra = sum(s["writes"] - 1 for s in state["summaries"] if s["writes"] > 1)
    assert extra <= sum(doubt.values())
    images = read_before_images(output)
    imaged = set(zip(images["call_id"], images["template_key"], strict=True))
    landed = {(s["call_id"], s["template_key"]) for s in state["summaries"] if s["writes"]}
    assert landed <= imaged  # no landed write without its before-image, killed or not


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_130_and_a_rerun_finishes(
    sandbox_factory: SandboxFactory, tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM or SIGINT mid-run: exit 130 with every row accounted for; the rerun resends only the
    rows cut off in flight and the rest."""
    source, output = tmp_path / "in.parquet", tmp_path / "out.csv"
    frame = write_input(source, 300)
    world = world_for(frame, keys=(KEY, SPARE_KEY), write_rate=60)
    with sandbox_factory(world, api_key=KEY, faults="latency=30ms") as sb:
        process = start_run([str(source), "-o", str(output), "--base-url", sb.base_url])
        wait_for_writes(sb, 40, process)
        process.send_signal(signum)
        code, summary, err = finish(process)
        assert code == 130, err
        assert signum.name in summary["stopped_reason"]
        stopped = pl.read_csv(output, infer_schema_length=None)
        assert stopped.height == frame.height  # complete: every row is accounted for
        assert not journal_path(output).exists()
        assert not lock_path(output).exists()
        counts = dict(stopped.group_by("status").len().iter_rows())
        assert counts["not_sent"] > 0 and counts["updated"] >= 40
        landed = sb.app.counters["writes_applied"]
        cut_off, doubt = cut_off_in_flight(stopped)

        code, summary, err = finish(
            start_run([str(source), "-o", str(output), "--base-url", sb.base_url])
        )
        assert code == 1, err
        assert summary["in_doubt_resent"] == cut_off.height
        assert summary["by_status"]["skipped"] == counts["updated"]
        assert summary["requests"] == frame.height - len(INVALID_ROWS) - counts["updated"]
        state = sb.state()
    assert landed >= counts["updated"]
    check_final(output, frame, state, doubt)


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_and_stays_consistent(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A second Ctrl-C does not wait out the grace period: requests in flight are cut off and
    recorded as may have landed."""
    source, output = tmp_path / "in.csv", tmp_path / "out.ndjson"
    frame = write_input(source, 60, invalid=False)
    world = world_for(frame, keys=(KEY, SPARE_KEY), write_rate=50)
    # Every answer takes 20 s: the first Ctrl-C waits out its 5 s grace, the second must not.
    # --blind: the look stage's batch read would take 20 s too before any write went out.
    with sandbox_factory(world, api_key=KEY, faults="latency=20s") as sb:
        args = [str(source), "-o", str(output), "--base-url", sb.base_url, "--blind"]
        process = start_run(args)
        journal = journal_path(output)
        deadline = time.monotonic() + 30
        while journal_sends(journal) < 5:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"the run never sent 5 requests (exit {process.wait(10)})")
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert process.poll() is None  # still in its grace period
        second = time.monotonic()
        process.send_signal(signal.SIGINT)
        code, summary, err = finish(process)
        took = time.monotonic() - second
    assert code == 130, err
    assert took < 4.0, f"the second Ctrl-C took {took:.1f} s to stop the run"
    results = pl.read_ndjson(output)
    assert results.height == frame.height
    assert set(results["status"]) == {"not_sent"}
    cut_off = results.filter(pl.col("attempts") > 0)
    assert cut_off.height >= 1
    assert set(cut_off["message"]) == {"stopped while in flight; may have landed"}
    assert summary["rows"] == frame.height


def check_refused_rows(results: pl.DataFrame, reason: str) -> None:
    """The rows of a run stopped by a refused key. The 401 reaches whichever request comes
    first: a PATCH, whose row records the refusal (retryable, since another key may land it),
    or a batch read of the look stage, which reads ahead of the writes and records no row;
    either way the rows left are not_sent and name the stop."""
    refused = results.filter(pl.col("error_code") == "API_KEY_REVOKED")
    assert refused["retryable"].to_list() == [True] * refused.height
    if "on a batch read" in reason:
        assert reason == "the API refused the key on a batch read: API_KEY_REVOKED (HTTP 401)"
    else:
        assert reason == "the API refused the key: API_KEY_REVOKED (HTTP 401)"
        assert refused.height >= 1
    unsent = results.filter((pl.col("status") == "not_sent") & (pl.col("attempts") == 0))
    assert set(unsent["message"]) <= {f"not sent: the run stopped ({reason})"}
    assert results.filter(pl.col("status") == "updated").height >= 1


@pytest.mark.slow
@pytest.mark.parametrize("persona", PERSONA_NAMES)
def test_key_revoked_mid_run_stops_with_3_and_another_key_finishes(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str
) -> None:
    """A key revoked mid-run (401) stops the run at once with exit 3, every row accounted
    for; a run with another key sends the rest, each valid row landing once (the same under
    every persona: the key form found by /me does not change what a 401 means)."""
    source, output = tmp_path / "in.csv", tmp_path / "out.parquet"
    frame = write_input(source, 200)
    world = world_for(frame, keys=(KEY, SPARE_KEY), write_rate=80)
    with sandbox_factory(world, api_key=KEY, faults="latency=20ms", persona=persona) as sb:
        process = start_run([str(source), "-o", str(output), "--base-url", sb.base_url])
        wait_for_writes(sb, 30, process)
        httpx.post(f"{sb.base_url}/_sandbox/revoke", json={"key": KEY}, timeout=10)
        code, summary, err = finish(process)
        assert code == 3, err
        assert "API_KEY_REVOKED" in summary["stopped_reason"]
        stopped = pl.read_parquet(output)
        assert stopped.height == frame.height
        assert not journal_path(output).exists()
        _, doubt = cut_off_in_flight(stopped)
        check_refused_rows(stopped, summary["stopped_reason"])

        code, summary, err = finish(
            start_run([str(source), "-o", str(output), "--base-url", sb.base_url], key=SPARE_KEY)
        )
        assert code == 1, err
        state = sb.state()
    final = tmp_path / "final.csv"
    pl.read_parquet(output).write_csv(final)
    check_final(final, frame, state, doubt)


def test_a_key_refused_on_a_batch_read_stops_the_run_and_a_rerun_finishes(
    sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 401 on a batch read (the look stage reads ahead of the writes) stops the run as one on
    a PATCH does: exit 3, a reason naming the read, every row accounted for, and the rows it
    left unsent land once on a rerun."""
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    frame = write_input(source, 250)
    with sandbox_factory(world_for(frame, write_rate=200), api_key=KEY) as sb:
        reads = sb.app._batch
        calls = Counter[str]()

        def refuse_the_second_read(request: Any) -> Any:
            calls["batch"] += 1
            if calls["batch"] == 2:
                raise _Refusal(401, Code.API_KEY_REVOKED, "This API key was revoked.")
            return reads(request)

        monkeypatch.setattr(sb.app, "_batch", refuse_the_second_read)
        args = ["run", str(source), "-o", str(output), "--base-url", sb.base_url, "--json"]
        stopped = invoke([*args, "--no-progress"])
        assert stopped.exit_code == 3, stopped.output
        reason = json.loads(stopped.stdout)["stopped_reason"]
        assert reason == "the API refused the key on a batch read: API_KEY_REVOKED (HTTP 401)"
        results = pl.read_csv(output, infer_schema_length=None)
        assert results["row"].to_list() == list(range(frame.height))
        check_refused_rows(results, reason)
        assert results.filter(pl.col("error_code") == "API_KEY_REVOKED").height == 0
        assert results.filter(pl.col("status") == "not_sent").height >= 100  # batch 2 on
        _, doubt = cut_off_in_flight(results)

        monkeypatch.undo()
        finished = invoke([*args, "--no-progress"])
        assert finished.exit_code == 1, finished.output  # the two invalid rows
        state = sb.state()
    check_final(output, frame, state, doubt)


def test_a_second_run_on_the_same_output_is_refused_with_3(tmp_path: Path) -> None:
    """A run on an output another run holds exits 3 naming the holder's pid, and touches nothing."""
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    write_input(source, 10)
    with OutputLock(output):
        result = invoke(["run", str(source), "-o", str(output), "--dry-run"], key=None)
        assert result.exit_code == 3
        assert f"another allo-batch run (pid {os.getpid()} on" in result.output
        assert str(output) in result.output
    assert not output.exists()
    assert not lock_path(output).exists()  # the holder removed its lock on release


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    """The lock file of a killed run is taken over with a warning, and removed at the end."""
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    write_input(source, 10, invalid=False)
    # A run killed with -9 leaves its lock file; the kernel dropped its flock when it died.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    lock_path(output).write_text(json.dumps({"pid": int(dead.stdout), "host": "h"}))
    result = invoke(["run", str(source), "-o", str(output), "--dry-run"], key=None)
    assert result.exit_code == 0, result.output
    assert f"took over the lock of {output} left by pid {int(dead.stdout)}" in result.output
    assert output.exists()
    assert not lock_path(output).exists()


def test_two_locks_on_one_output_exclude_each_other(tmp_path: Path) -> None:
    """Two locks on one output exclude each other; the lock file is owner-only."""
    output = tmp_path / "out.csv"
    first = OutputLock(output)
    first.acquire()
    assert oct(lock_path(output).stat().st_mode & 0o777) == "0o600"
    with pytest.raises(Exception, match="another allo-batch run"):
        OutputLock(output).acquire()
    first.release()
    with OutputLock(output) as again:
        assert again.took_over is None


def test_a_different_input_is_refused_unless_force(tmp_path: Path) -> None:
    """Results of another input in the output: exit 2 naming it, the output untouched; --force
    merges."""
    first, second, output = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "out.csv"
    write_input(first, 20)
    write_input(second, 25)
    assert invoke(["run", str(first), "-o", str(output), "--dry-run"], key=None).exit_code == 1
    before = output.read_bytes()
    refused = invoke(["run", str(second), "-o", str(output), "--dry-run"], key=None)
    assert refused.exit_code == 2
    assert f"{output} holds results of another input: {first.resolve()} (20 rows)" in (
        refused.output
    )
    assert "--force" in refused.output
    assert output.read_bytes() == before  # untouched
    forced = invoke(["run", str(second), "-o", str(output), "--dry-run", "--force"], key=None)
    assert forced.exit_code == 1, forced.output
    assert pl.read_csv(output).height == 25
    facts = json.loads(sidecar_path(output).read_text())
    assert facts["input"]["path"] == str(second.resolve())


def test_the_same_rows_edited_moved_or_converted_are_the_same_input(tmp_path: Path) -> None:
    """Content corrected in place, a moved file or another format of the same rows is the same
    input."""
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    write_input(source, 20)
    assert invoke(["run", str(source), "-o", str(output), "--dry-run"], key=None).exit_code == 1
    write_input(source, 20, edit=1)  # every content corrected in place
    assert invoke(["run", str(source), "-o", str(output), "--dry-run"], key=None).exit_code == 1
    converted = tmp_path / "moved" / "in.parquet"
    converted.parent.mkdir()
    write_input(converted, 20, edit=1)
    result = invoke(["run", str(converted), "-o", str(output), "--dry-run"], key=None)
    assert result.exit_code == 1, result.output


def test_a_journal_of_another_input_is_refused_too(tmp_path: Path) -> None:
    """A killed first run leaves only its journal; its start line names its input."""
    first, second, output = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "out.csv"
    write_input(first, 20)
    write_input(second, 20, invalid=False)
    facts = {"path": str(first), "rows": 20, "keys_sha256": "0" * 64}
    journal_path(output).write_text(json.dumps({"e": "start", "input": facts}) + '\n{"e":"se')
    refused = invoke(["run", str(second), "-o", str(output), "--dry-run"], key=None)
    assert refused.exit_code == 2
    assert "holds results of another input" in refused.output


def test_journal_and_results_are_owner_only(tmp_path: Path) -> None:
    """The journal, the result file and its temporary file are owner-only (0600)."""
    from allo_batch.models import RowResult
    from allo_batch.record import Journal, OrderedResults

    output = tmp_path / "out.csv"
    journal = Journal(journal_path(output))
    journal.start({"path": "x", "rows": 1, "keys_sha256": "0"})
    writer = OrderedResults(output)
    writer.add(
        RowResult(
            row=0,
            call_id="cll-1",
            template_key=None,
            status="not_sent",
            content_sha256="0",
            attempts=0,
        )
    )
    assert journal_path(output).stat().st_mode & 0o777 == 0o600
    assert writer.temp.stat().st_mode & 0o777 == 0o600
    writer.finish()
    journal.close()
    assert output.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_signal_outside_the_send_phase_exits_130_and_restores_handlers(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signal before sending exits 130 with one line (text or JSON) and restores the handlers it
    replaced."""
    from allo_batch.cli import _exit_130_on_signals
    from allo_batch.report import RunConsole

    before = signal.getsignal(signal.SIGTERM)
    console = RunConsole(log_format, as_json=False)
    with pytest.raises(SystemExit) as stopped, _exit_130_on_signals(console):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this at once
    assert stopped.value.code == 130
    assert signal.getsignal(signal.SIGTERM) is before
    told = capsys.readouterr().err
    if log_format == "json":
        event = json.loads(told)
        assert (event["event"], event["exit_code"]) == ("stop", 130)
        assert event["reason"] == "interrupted by SIGTERM; a rerun resumes from here"
    else:
        assert told == "allo-batch: interrupted by SIGTERM; a rerun resumes from here\n"


def test_the_journal_is_synced_within_a_second_even_when_no_answer_comes(tmp_path: Path) -> None:
    """A request sent just after a sync, then a long wait for its answer, is still on disk."""
    from allo_batch.models import PlannedRequest
    from allo_batch.pipeline import _tick
    from allo_batch.record import Recorder
    from allo_batch.report import NullReporter
    from allo_batch.send import SendStats

    recorder = Recorder(tmp_path / "out.csv", {}, journaled=True)
    recorder.sync()
    recorder.sending(PlannedRequest(0, "cll-1", None, "0" * 64, b"{}"), "req_000000000001")
    assert recorder.unsynced  # the 1 s since the last sync has not passed

    class Quiet:
        stats = SendStats()

        def unreachable_for(self) -> None:
            return None

    async def watch() -> None:
        with anyio.move_on_after(1.2):
            await _tick(NullReporter(), recorder, Quiet())  # type: ignore[arg-type]

    anyio.run(watch)
    assert not recorder.unsynced
    recorder.abandon()


def test_a_second_signal_or_a_keyboard_interrupt_does_not_cut_the_clean_up_short(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """polars turns a SIGINT into a KeyboardInterrupt of its own, and Python then runs the
    handler for the same signal: the first interruption is the only one raised (further signals
    are ignored while the clean-up runs), and a KeyboardInterrupt exits 130 too."""
    from allo_batch.cli import _exit_130_on_signals, _interrupt, _Interrupted

    before = signal.getsignal(signal.SIGINT)
    cleaned = []
    with pytest.raises(SystemExit) as stopped, _exit_130_on_signals():
        with pytest.raises(_Interrupted):
            _interrupt(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        try:
            raise KeyboardInterrupt  # as polars raises it for a SIGINT
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # ignored: the clean-up runs to its end
            time.sleep(0.05)
            cleaned.append(True)
    assert stopped.value.code == 130 and cleaned == [True]
    # The handler itself, run for the SIGINT polars already raised as KeyboardInterrupt, at
    # the first line of the clean-up (before the handlers were set to ignore): no raise.
    before_term = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            _interrupt(signal.SIGINT, None)
            cleaned.append(True)
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGTERM, before_term)
    assert cleaned == [True, True]
    assert signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err == "allo-batch: interrupted by SIGINT\n"


SLOW_READS = """
import sys, time
from pathlib import Path
import allo_batch.read as read
real = read._Suffixed._read
def slow(self, size):
    print("reading", file=sys.stderr, flush=True)
    time.sleep(0.02)  # pyarrow's readahead is inside a read whenever the process ends
    return real(self, size)
read._Suffixed._read = slow
from allo_batch.cli import main
"""


def test_the_process_ends_cleanly_while_pyarrow_still_reads_an_input(tmp_path: Path) -> None:
    """pyarrow reads CSV and NDJSON through Python streams from its own threads: one still in a
    read when the interpreter finalizes aborts the process (exit 134) or hangs it. The command
    line ends without finalizing, whatever is left reading."""
    source = tmp_path / "in.csv"
    write_input(source, 60_000, invalid=False)
    script = SLOW_READS + (
        "batches = read.iter_batches(read.open_input(Path(sys.argv[1]), 'csv'), 1000)\n"
        "next(batches)  # left reading ahead, as a stop mid-file leaves it\n"
        "sys.argv = ['allo-batch', '--version']\n"
        "main()\n"
    )
    for _ in range(3):
        ended = subprocess.run(
            [sys.executable, "-c", script, str(source)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (ended.returncode, ended.stdout) == (0, "allo-batch, version 0.1.0\n"), ended.stderr


def test_ctrl_c_during_validate_exits_130_with_one_line(tmp_path: Path) -> None:
    """``validate`` (and ``diff``, ``report``) end on SIGINT or SIGTERM as ``run`` does: exit
    130 and one line, not click's "Aborted!" and exit 1 (which means "some rows invalid")."""
    source = tmp_path / "in.csv"
    write_input(source, 60_000, invalid=False)
    script = SLOW_READS + "sys.argv = ['allo-batch', 'validate', sys.argv[1]]\nmain()\n"
    for signum in (signal.SIGINT, signal.SIGTERM):
        process = subprocess.Popen(
            [sys.executable, "-c", script, str(source)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        assert process.stderr.readline() == "reading\n"
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
        told = [line for line in err.splitlines() if line != "reading"]
        name = signal.Signals(signum).name
        assert (process.returncode, out, told) == (130, "", [f"allo-batch: interrupted by {name}"])
