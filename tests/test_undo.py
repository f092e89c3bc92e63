"""``undo``: put back before-images where the target still holds what the run wrote, end to end
against the sandbox, and after ``kill -9`` at random moments during a run and during an undo."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import polars as pl
import pytest

from allo_batch.record import journal_path, read_before_images, read_results, result_schema
from allo_batch.sandbox import PERSONAS, ApiKey, RunningSandbox, build_world
from allo_batch.sandbox.world import World
from tests.helpers import KEY, PERSONA_NAMES, SandboxFactory, authorization, invoke

READ_LAG_MARGIN = 0.5  # seconds on top of a persona's read_lag, for a loaded test machine


def setup(tmp_path: Path, rows: int, *, rate: int = 500) -> tuple[Path, World, dict[str, str]]:
    """A corrections file and a world whose calls hold other text (their originals)."""
    source = tmp_path / "fixes.csv"
    pl.DataFrame(
        {
            "call_id": [f"cll-{i:05d}" for i in range(rows)],
            "content": [f"corrected {i}" for i in range(rows)],
        }
    ).write_csv(source)
    world = build_world(seed_pairs=[(f"cll-{i:05d}", None) for i in range(rows)])
    world.add_key(ApiKey(key=KEY, write_per_second=rate, read_per_second=rate))
    originals = {}
    for i in range(rows):
        summary = next(iter(world.calls[f"cll-{i:05d}"].values()))
        summary.content = f"original {i}"
        originals[f"cll-{i:05d}"] = summary.content
    return source, world, originals


def edit(sandbox: RunningSandbox, call_id: str, text: str, persona: str = "documented") -> None:
    """Someone else changes a summary, through the API like anyone would."""
    answer = httpx.patch(
        f"{sandbox.base_url}/v2/api/conversations/items/{call_id}/summary",
        json={"content": text},
        headers=authorization(KEY, persona),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text


def held(sandbox: RunningSandbox) -> dict[str, str]:
    """What each call's summary holds now, straight from the sandbox's world."""
    return {c: next(iter(t.values())).content for c, t in sandbox.app.world.calls.items()}


def wait_for_reads_to_show_the_writes(persona: str) -> None:
    """Sleep until the persona's reads show every write made so far (``read_lag`` + margin)."""
    lag = PERSONAS[persona].read_lag
    if lag:
        time.sleep(lag + READ_LAG_MARGIN)


@pytest.mark.parametrize("persona", PERSONA_NAMES)
def test_undo_restores_what_nobody_touched_and_reports_the_rest_as_conflicts(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str
) -> None:
    """200 rows written, each with a before-image of what it replaced; someone edits 20
    targets; undo restores exactly the other 180, leaves the 20 as conflict (exit 1);
    --dry-run said so first; undoing the undo writes the run's content back."""
    source, world, originals = setup(tmp_path, 200)
    results = tmp_path / "run.csv"
    with sandbox_factory(world, api_key=KEY, persona=persona) as sandbox:
        url = sandbox.base_url
        assert invoke(["run", str(source), "-o", str(results), "--base-url", url]).exit_code == 0
        edited = {f"cll-{i:05d}" for i in random.Random(5).sample(range(200), 20)}
        for call_id in sorted(edited):
            edit(sandbox, call_id, "edited by a human", persona)
        # Under read_lag > 0 a read made now still shows the targets as they were before the
        # run, the human edits included: the conflicts could not be told apart yet. Wait
        # read_lag plus a margin (an undo right after a run still restores: see
        # test_an_undo_right_after_a_run_restores_even_when_reads_lag).
        wait_for_reads_to_show_the_writes(persona)
        patches = sandbox.state()["counters"]["patch"]
        preview = invoke(["undo", str(results), "--base-url", url, "--dry-run", "--json"])
        assert sandbox.state()["counters"]["patch"] == patches  # a dry run writes nothing
        undone = invoke(["undo", str(results), "--base-url", url, "--json"])
        now = held(sandbox)
        wait_for_reads_to_show_the_writes(persona)
        redo = invoke(
            ["undo", str(results.with_name("run.csv.undo.parquet")), "--base-url", url, "--json"]
        )
        after_redo = held(sandbox)
    images = read_before_images(results)
    assert dict(images.select("call_id", "content").iter_rows()) == originals
    assert images["certain"].all()
    dry = json.loads(preview.stdout)
    assert dry["by_status"] == {"not_sent": 180, "conflict": 20}
    summary = json.loads(undone.stdout)
    assert undone.exit_code == 1
    assert summary["by_status"] == {"updated": 180, "conflict": 20}
    for call_id, original in originals.items():
        assert now[call_id] == ("edited by a human" if call_id in edited else original)
    assert "200 rows to put back" in undone.stderr  # 20 of them turn out to be conflicts
    conflicts = read_results(results.with_name("run.csv.undo.parquet")).filter(
        pl.col("status") == "conflict"
    )
    assert set(conflicts["call_id"]) == edited
    assert redo.exit_code == 0, redo.output
    assert json.loads(redo.stdout)["by_status"] == {"updated": 180}
    assert all(
        after_redo[f"cll-{i:05d}"].startswith("corrected")
        for i in range(200)
        if f"cll-{i:05d}" not in edited
    )


def test_undo_leaves_uncertain_images_alone_unless_asked(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A row naming the template of a two-template call has an uncertain before-image: undo
    counts it as left out, and --include-uncertain tries it."""
    world = build_world()
    world.add_call("cll-two", ["MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"])
    world.add_key(ApiKey(key=KEY, write_per_second=50))
    source = tmp_path / "two.csv"
    pl.DataFrame(
        {"call_id": ["cll-two"], "template_key": ["MARKDOWN_SHORT_CALL"], "content": ["new"]}
    ).write_csv(source)
    results = tmp_path / "run.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        url = sandbox.base_url
        assert invoke(["run", str(source), "-o", str(results), "--base-url", url]).exit_code == 0
        plain = invoke(["undo", str(results), "--base-url", url, "--json"])
        wider = invoke(
            [
                "undo",
                str(results),
                "-o",
                str(tmp_path / "u2.csv"),
                "--base-url",
                url,
                "--include-uncertain",
                "--json",
            ]
        )
    assert "left out: 1 before-image uncertain" in plain.stderr
    assert json.loads(plain.stdout)["rows"] == 0
    assert json.loads(wider.stdout)["rows"] == 1


RUN_TIMEOUT = 120


def start(command: str, args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "ALLO_API_KEY": KEY}
    return subprocess.Popen(
        [sys.executable, "-m", "allo_batch", command, *args, "--no-progress", "--json"]
        if command == "run"
        else [sys.executable, "-m", "allo_batch", command, *args, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after_writes(
    sandbox: RunningSandbox, process: subprocess.Popen[str], at_least: int
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if sandbox.app.counters.get("writes_applied", 0) >= at_least:
            break
        time.sleep(0.01)
    time.sleep(random.Random(at_least).uniform(0, 0.2))
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.communicate(timeout=RUN_TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_during_a_run_and_an_undo_still_leaves_every_target_accounted_for(
    sandbox_factory: SandboxFactory, tmp_path: Path, seed: int
) -> None:
    """Every write that landed has its before-image even when the run is killed at random;
    an undo killed at random and rerun restores every target or reports it."""
    rng = random.Random(seed)
    source, world, originals = setup(tmp_path, 300, rate=100)
    results = tmp_path / "run.parquet"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        url = sandbox.base_url
        args = [str(source), "-o", str(results), "--base-url", url]
        for _ in range(2):
            kill_after_writes(sandbox, start("run", args), rng.randint(20, 250))
            landed = {s["call_id"] for s in sandbox.state(written_only=True)["summaries"]}
            imaged = set(read_before_images(results)["call_id"])
            assert landed <= imaged  # no landed write without its before-image
        finished = start("run", args)
        finished.communicate(timeout=RUN_TIMEOUT)
        assert finished.returncode == 0
        assert all(v.startswith("corrected") for v in held(sandbox).values())
        before_undo = sandbox.app.counters.get("writes_applied", 0)
        undo_args = [str(results), "--base-url", url]
        kill_after_writes(sandbox, start("undo", undo_args), before_undo + rng.randint(10, 200))
        rerun = start("undo", undo_args)
        out, err = rerun.communicate(timeout=RUN_TIMEOUT)
        now = held(sandbox)
    assert rerun.returncode == 0, err
    assert json.loads(out)["exit_code"] == 0
    assert now == originals
    undo_results = read_results(results.with_name("run.parquet.undo.parquet"))
    assert set(undo_results["status"]) <= {"updated", "skipped", "unchanged"}
    assert undo_results.height == 300


def test_an_undo_right_after_a_run_restores_even_when_reads_lag(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """With reads 1.5 s behind (awkward), a read right after the run still shows the original:
    the undo must write it back anyway, never settle such a row as unchanged."""
    source, world, originals = setup(tmp_path, 40)
    results = tmp_path / "run.csv"
    with sandbox_factory(world, api_key=KEY, persona="awkward") as sandbox:
        url = sandbox.base_url
        auth = ["--base-url", url]
        assert invoke(["run", str(source), "-o", str(results), *auth]).exit_code == 0
        undone = invoke(["undo", str(results), *auth, "--json"])
        now = held(sandbox)
    assert undone.exit_code == 0, undone.output
    assert json.loads(undone.stdout)["by_status"] == {"updated": 40}
    assert now == originals


def test_undo_keeps_an_edit_made_between_a_stopped_run_and_its_rerun(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A run keeps the before-images of a whole chunk before sending it, then stops at its
    deadline with rows of that chunk unwritten. Someone edits one of those targets; the rerun
    writes over the edit. Undo puts back what the rerun replaced, the edit, not the stopped
    run's image of a target it never wrote; the targets the first run wrote get their
    originals back."""
    source, world, originals = setup(tmp_path, 40, rate=10)
    results = tmp_path / "run.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        url = sandbox.base_url
        deadline = datetime.now().astimezone() + timedelta(seconds=1.5)
        args = ["run", str(source), "-o", str(results), "--base-url", url]
        stopped = invoke([*args, "--finish-by", deadline.isoformat()])
        assert stopped.exit_code == 3, stopped.output
        first = read_results(results)
        unwritten = first.filter(pl.col("status") != "updated")["call_id"].to_list()
        assert unwritten, "the run wrote every row before its deadline"
        imaged = set(read_before_images(results)["call_id"])
        assert set(unwritten) <= imaged  # the case at hand: images of rows never written
        edited = unwritten[-1]
        time.sleep(1.1)  # the person's edit spends the key's budget too: a window's worth
        edit(sandbox, edited, "edited by a human between the runs")
        assert invoke(args).exit_code == 0
        undone = invoke(["undo", str(results), "--base-url", url, "--json"])
        now = held(sandbox)
    assert undone.exit_code == 0, undone.output
    assert json.loads(undone.stdout)["by_status"] == {"updated": 40}
    assert now == {**originals, edited: "edited by a human between the runs"}


def test_the_image_put_back_is_the_one_before_our_first_write_or_before_someone_elses() -> None:
    """Images of one target from successive runs (content found -> content about to write):
    a later image that shows one of our earlier writes keeps the earliest image; one that
    shows anything else (someone changed the target between our runs) is what our later write
    replaced, and is put back instead."""
    from allo_batch.record import before_schema
    from allo_batch.undo import _first_images

    def image(call: str, found: str | None, written: str, run: int) -> dict[str, object]:
        return {
            "row": 0,
            "call_id": call,
            "template_key": None,
            "found": "summary" if found else "no_summary",
            "content": found,
            "content_sha256": found and f"sha of {found}",
            "written_sha256": f"sha of {written}",
            "certain": True,
            "run": f"run {run}",
            "seq": 0,
        }

    chains: dict[str, list[tuple[str | None, str]]] = {
        "ours landed": [("A", "X"), ("X", "Y")],
        "ours twice": [("A", "X"), ("X", "Y"), ("Y", "Z")],
        "never written, then edited": [("A", "X"), ("H", "X")],
        "unchanged between runs": [("A", "X"), ("A", "X")],
        "edited after two runs": [("A", "X"), ("A", "X"), ("H", "Y")],
        "created by us": [(None, "X"), ("X", "Y")],
        "once": [("A", "X")],
    }
    images = [
        image(call, found, written, run)
        for call, chain in chains.items()
        for run, (found, written) in enumerate(chain)
    ]
    chosen = _first_images(pl.DataFrame(images, schema=before_schema()))
    assert dict(chosen.select("call_id", "content").iter_rows()) == {
        "ours landed": "A",
        "ours twice": "A",
        "never written, then edited": "H",
        "unchanged between runs": "A",
        "edited after two runs": "H",
        "created by us": None,
        "once": "A",
    }


def test_a_run_into_a_result_file_an_undo_put_back_is_refused(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A canary lands 3 rows, undo puts them back: the result file still says they landed, so
    a run into it would skip them as done (exit 0 with the targets not holding their
    content). It is refused instead, and a run into a new output writes all 10."""
    source, world, originals = setup(tmp_path, 10)
    results = tmp_path / "run.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        url = sandbox.base_url
        run = ["run", str(source), "--base-url", url, "--json"]
        assert invoke([*run, "-o", str(results), "--limit", "3"]).exit_code == 0
        preview = invoke(["undo", str(results), "--base-url", url, "--dry-run"])
        assert preview.exit_code == 0, preview.output
        assert invoke([*run, "-o", str(results), "--limit", "4"]).exit_code == 0  # still fine
        undone = invoke(["undo", str(results), "--base-url", url])
        assert undone.exit_code == 0, undone.output
        assert held(sandbox) == originals, undone.output
        refused = invoke([*run, "-o", str(results)])
        fresh = invoke([*run, "-o", str(tmp_path / "again.csv")])
        now = held(sandbox)
    assert refused.exit_code == 2
    assert "an undo of its writes began" in refused.stderr
    assert "new --output" in refused.stderr
    assert fresh.exit_code == 0, fresh.output
    assert json.loads(fresh.stdout)["by_status"] == {"updated": 10}
    assert all(now[call].startswith("corrected") for call in originals)


@pytest.mark.parametrize("own", ["results", "sidecar", "journal", "undo input", "before-images"])
def test_undo_refuses_to_write_its_results_over_the_runs_own_files(
    tmp_path: Path, own: str
) -> None:
    """``undo RESULTS -o RESULTS`` replaced the run's record with the undo's outcomes."""
    results = tmp_path / "run.csv"
    pl.DataFrame(schema=result_schema()).write_csv(results)
    target = {
        "results": results,
        "sidecar": tmp_path / "run.csv.run.json",
        "journal": journal_path(results),
        "undo input": tmp_path / "run.csv.undo.input.parquet",
        "before-images": tmp_path / "run.csv.before" / "x.parquet",
    }[own]
    refused = invoke(["undo", str(results), "-o", str(target), "--base-url", "http://127.0.0.1:9"])
    assert refused.exit_code == 2, refused.output
    assert "own files" in refused.stderr
    assert results.read_text().count("\n") == 1  # the header, untouched


def test_an_undo_that_sent_nothing_leaves_the_result_file_open_to_runs(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """An undo without a key (or whose API is down) stops before its first write: the run's
    result file still says what its targets hold, so a run into it is not refused, where the
    mark the undo left said an undo had begun."""
    source, world, _originals = setup(tmp_path, 4)
    results = tmp_path / "run.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        url = sandbox.base_url
        run = ["run", str(source), "-o", str(results), "--base-url", url]
        assert invoke([*run, "--limit", "2"]).exit_code == 0
        keyless = invoke(["undo", str(results), "--base-url", url], key=None)
        assert keyless.exit_code == 2, keyless.output
        down = invoke(
            ["undo", str(results), "--base-url", "http://127.0.0.1:9", "--max-outage", "1"]
        )
        assert down.exit_code == 3, down.output
        rest = invoke([*run, "--json"])
    assert rest.exit_code == 0, rest.output
    assert json.loads(rest.stdout)["by_status"] == {"skipped": 2, "updated": 2}
    assert "undone_by" not in json.loads((tmp_path / "run.csv.run.json").read_text())


def test_rows_found_already_right_are_not_said_to_be_written_without_an_image(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Two targets already hold their correction: the run writes nothing to them (unchanged),
    and a rerun carries them over as skipped. The undo leaves them out, and does not say they
    were written without a before-image (which would read as an unguarded overwrite)."""
    source, world, _originals = setup(tmp_path, 6)
    for i in (1, 4):
        next(iter(world.calls[f"cll-{i:05d}"].values())).content = f"corrected {i}"
    results = tmp_path / "run.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        run = ["run", str(source), "-o", str(results), "--base-url", sandbox.base_url, "--json"]
        first = invoke(run)
        again = invoke(run)
        planned = invoke(["undo", str(results), "--base-url", sandbox.base_url, "--dry-run"])
    assert json.loads(first.stdout)["by_status"] == {"updated": 4, "unchanged": 2}
    assert json.loads(again.stdout)["by_status"] == {"skipped": 6}
    assert planned.exit_code == 0, planned.output
    assert "4 rows to put back" in planned.output
    assert "2 without a before-image (found already right, --blind, or an older version)" in (
        planned.output
    )
    assert "written without" not in planned.output
