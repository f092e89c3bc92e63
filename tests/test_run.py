"""`allo-batch run` end to end: the CLI against a sandbox on 127.0.0.1, proven from its state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from allo_batch.record import sidecar_path
from allo_batch.sandbox import PERSONAS, ApiKey, World, build_world
from allo_batch.sandbox.world import load_world_file
from tests.helpers import KEY, PERSONA_NAMES, WRONG_KEY, SandboxFactory, invoke, sha

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"

# What the sandbox world of sample_data/ makes the API answer for the rows that pass local checks.
EXPECTED_API_REFUSALS = {
    "cll-900001": "SUMMARY_TEMPLATE_KEY_REQUIRED",
    "cll-900002": "SUMMARY_TEMPLATE_NOT_FOUND",
    "cll-900003": "SUMMARY_TEMPLATE_NOT_FOUND",
    "cll-999999": "CONVERSATION_ITEM_NOT_FOUND",
}


def sample_world(write_rate: int) -> World:
    world = load_world_file(SAMPLE / "world.json")
    world.add_key(ApiKey(key=KEY, write_per_second=write_rate))
    return world


def check_end_state(results: pl.DataFrame, state: dict[str, Any], source: Path) -> dict[str, int]:
    """Every valid row landed exactly once in the right place (in this run, or in an earlier
    run of the same output when this one is a rerun); every other row has its code. Returns
    the result file's count of rows by status."""
    rows = pl.read_csv(source, infer_schema=False)
    landed = {(s["call_id"], s["template_key"]): s for s in state["summaries"] if s["writes"]}
    assert results.height == rows.height
    assert results["row"].to_list() == list(range(rows.height))
    done = results.filter((pl.col("status") == "updated") | (pl.col("reason") == "landed_earlier"))
    written = {}
    for row in done.iter_rows(named=True):
        content = rows["content"][row["row"]]
        assert row["content_sha256"] == sha(content)
        written[row["call_id"]] = row
    # Each summary that changed was written exactly once, with the content of its row(s).
    assert len(landed) == len(written) == 279
    for (call_id, _template), summary in landed.items():
        assert summary["writes"] == 1, call_id
        assert summary["content_sha256"] == written[call_id]["content_sha256"]
        assert summary["version"] == written[call_id]["version"] == 2
    codes = dict(
        results.filter(pl.col("status").is_in(["invalid", "failed"]))
        .select("call_id", "error_code")
        .drop_nulls("call_id")
        .iter_rows()
    )
    for call_id, code in EXPECTED_API_REFUSALS.items():
        assert codes[call_id] == code
    assert codes["msg-000042"] == "INVALID_ITEM_ID"
    assert codes["cll-000502"] == "INVALID_REQUEST_BODY"
    assert codes["cll-000503"] == "INVALID_REQUEST_BODY"
    assert codes["cll-000011"] == "DUPLICATE_ROW"
    counts = dict(results.group_by("status").len().iter_rows())
    # 279 rows landed plus one exact repeat of one of them; a rerun reports landed rows skipped.
    assert counts.get("updated", 0) + counts.get("skipped", 0) == 280
    assert (counts["invalid"], counts["failed"]) == (8, 4)
    assert set(counts) <= {"updated", "skipped", "invalid", "failed"}
    return counts


def left_by_a_500(output: Path) -> int:
    """Rows of a result file that a 500 saying "not retryable" left for a rerun: failed by a
    PATCH's 500, or not sent because a batch read's 500 stopped the run."""
    results = pl.read_csv(output, infer_schema_length=None)
    failed = (pl.col("status") == "failed") & (pl.col("error_code") == "INTERNAL_SERVER_ERROR")
    return results.filter(failed | (pl.col("status") == "not_sent")).height


SAMPLE_FAULTS = "latency=5ms,jitter=5ms,500=0.05,502=0.03,503=0.05,drop=0.03"


@pytest.mark.parametrize("persona", PERSONA_NAMES)
@pytest.mark.parametrize(
    "faults",
    [pytest.param(None, id="no-faults"), pytest.param(SAMPLE_FAULTS, id="faults")],
)
def test_sample_corrections_land_exactly_once(
    sandbox_factory: SandboxFactory, tmp_path: Path, faults: str | None, persona: str
) -> None:
    """The sample file's valid rows land once each, through injected 500, 502, 503 and dropped
    connections; refusals carry the API's codes; exit 1; no 429."""
    output = tmp_path / "out.results.csv"
    retries_500 = PERSONAS[persona].retryable_500 is not False
    with sandbox_factory(
        sample_world(200), api_key=KEY, faults=faults, seed=11, persona=persona
    ) as sandbox:
        args = ["run", str(SAMPLE / "corrections.csv"), "--base-url", sandbox.base_url]
        args += ["-o", str(output), "--json", "--max-attempts", "8"]
        runs = [invoke(args)]
        # Under retryable_500=False an injected 500 ends its row on this run (the API said a
        # retry cannot succeed): a PATCH's 500 fails the row, a batch read's 500 stops the run
        # (exit 3, the rest not_sent). A rerun sends those rows again: rerun (bounded) until
        # none is left. Every other persona retries a 500 within the run.
        for _ in range(10):
            if retries_500 or not left_by_a_500(output):
                break
            runs.append(invoke(args))
        state = sandbox.state()
    summaries = [json.loads(run.stdout) for run in runs]
    assert runs[-1].exit_code == 1, runs[-1].output
    for run, summary in zip(runs, summaries, strict=True):
        if run.exit_code == 3:
            assert not retries_500
            assert (
                summary["stopped_reason"] == "batch read failed: INTERNAL_SERVER_ERROR (HTTP 500)"
            )
    assert (
        sum(s["rate_limited"] for s in summaries) == 0 == state["counters"].get("rate_limited", 0)
    )
    counts = check_end_state(
        pl.read_csv(output, infer_schema_length=None), state, SAMPLE / "corrections.csv"
    )
    if len(runs) == 1:
        assert counts == {"updated": 279, "skipped": 1, "invalid": 8, "failed": 4}
    if faults:
        assert sum(s["requests"] for s in summaries) > 283  # retries on top of 283 rows
        assert sum(v for k, v in state["counters"].items() if k.startswith("fault_")) > 0
        # With 5 % of the writes answered 500, a persona that says "not retryable" costs reruns.
        assert (len(runs) > 1) is not retries_500
    else:
        assert len(runs) == 1


def test_rerun_sends_nothing_and_carries_versions(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A second run with the same output sends no request; skipped rows keep their versions."""
    source = tmp_path / "in.csv"
    source.write_text("call_id,content\ncll-1,one\ncll-2,two\n")
    output = tmp_path / "in.results.parquet"
    world = build_world(api_key=KEY, write_rate=100, seed_pairs=[("cll-1", None), ("cll-2", None)])
    with sandbox_factory(world, api_key=KEY) as sandbox:
        args = ["run", str(source), "--base-url", sandbox.base_url, "-o", str(output), "--json"]
        first = invoke(args)
        second = invoke(args)
        state = sandbox.state()
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert json.loads(second.stdout)["requests"] == 0
    assert state["counters"]["writes_applied"] == 2
    again = pl.read_parquet(output)
    assert again["status"].to_list() == ["skipped", "skipped"]
    assert again["version"].to_list() == [2, 2]
    # An edited row goes again; the other stays skipped.
    source.write_text("call_id,content\ncll-1,one\ncll-2,two edited\n")
    with sandbox_factory(world, api_key=KEY) as sandbox:
        third = invoke(["run", str(source), "--base-url", sandbox.base_url, "-o", str(output)])
    assert third.exit_code == 0
    assert pl.read_parquet(output)["status"].to_list() == ["skipped", "updated"]


def test_a_call_given_with_and_without_a_template_is_not_written_twice(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """cll-1 has one completed summary: a row without template_key updates it, and so does
    the row naming its template. With different contents, which one the summary would end
    with depends on which write lands last: both rows are DUPLICATE_ROW and neither is sent.
    With the same content (cll-2) both are fine. Exit 1, cll-3 written."""
    source = tmp_path / "in.csv"
    source.write_text(
        "call_id,template_key,content\n"
        "cll-1,,one\ncll-2,MARKDOWN_CLASSIC,two\ncll-1,MARKDOWN_CLASSIC,uno\n"
        "cll-2,,two\ncll-3,,three\n"
    )
    output = tmp_path / "in.results.csv"
    world = build_world(api_key=KEY, write_rate=100)
    for call_id in ("cll-1", "cll-2", "cll-3"):
        world.add_call(call_id, ["MARKDOWN_CLASSIC"])
    with sandbox_factory(world, api_key=KEY) as sandbox:
        run = invoke(["run", str(source), "--base-url", sandbox.base_url, "-o", str(output)])
        written = {s["call_id"] for s in sandbox.state()["summaries"] if s["writes"]}
    assert run.exit_code == 1
    results = pl.read_csv(output)
    assert results["status"].to_list() == ["invalid", "updated", "invalid", "updated", "updated"]
    assert results["error_code"].to_list() == ["DUPLICATE_ROW", None, "DUPLICATE_ROW", None, None]
    assert written == {"cll-2", "cll-3"}


@pytest.mark.parametrize("persona", PERSONA_NAMES)
def test_pacing_at_a_low_limit_gives_zero_429s(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str
) -> None:
    """At a 4/s key limit read from /me, 20 rows with 6 workers get no 429 from the sandbox,
    whether it counts in fixed or sliding windows and whichever budget its batch reads spend
    (the client paces reads with the write budget, so they never push a write into a 429)."""
    source = tmp_path / "in.ndjson"
    source.write_text(
        "".join(json.dumps({"call_id": f"cll-{i}", "content": f"c{i}"}) + "\n" for i in range(20))
    )
    world = build_world(
        api_key=KEY, write_rate=4, seed_pairs=[(f"cll-{i}", None) for i in range(20)]
    )
    faults = "latency=30ms,jitter=20ms"
    with sandbox_factory(world, api_key=KEY, faults=faults, persona=persona) as sandbox:
        output = str(tmp_path / "r.ndjson")
        args = ["run", str(source), "--base-url", sandbox.base_url, "-o", output]
        result = invoke([*args, "--concurrency", "6", "--json"])
        counters = sandbox.state()["counters"]
    assert result.exit_code == 0, result.output
    assert counters["writes_applied"] == 20
    assert counters.get("rate_limited", 0) == 0
    summary = json.loads(result.stdout)
    assert (summary["rate_limit"], summary["rate_limited"]) == (4, 0)


@pytest.mark.parametrize("persona", PERSONA_NAMES)
def test_only_a_refused_prefix_costs_one_more_request_and_the_form_is_recorded(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str
) -> None:
    """Every row lands whichever Authorization form the API takes; an API that refuses the
    documented ``Api-Key <key>`` (secondhand: bare key only) costs exactly one more /me and one
    401, and the sidecar records the form kept."""
    source = tmp_path / "in.csv"
    source.write_text("call_id,content\n" + "".join(f"cll-{i},fix {i}\n" for i in range(10)))
    output = tmp_path / "out.csv"
    world = build_world(
        api_key=KEY, write_rate=100, seed_pairs=[(f"cll-{i}", None) for i in range(10)]
    )
    with sandbox_factory(world, api_key=KEY, persona=persona) as sandbox:
        result = invoke(["run", str(source), "--base-url", sandbox.base_url, "-o", str(output)])
        counters = sandbox.state()["counters"]
    bare_only = PERSONAS[persona].auth == "bare"
    assert result.exit_code == 0, result.output
    assert counters["writes_applied"] == 10
    assert counters["me"] == (2 if bare_only else 1)
    assert counters.get("unauthorized", 0) == (1 if bare_only else 0)
    sidecar = json.loads(sidecar_path(output).read_text())
    form = "bare" if bare_only else "prefixed"
    assert sidecar["auth_form"] == sidecar["summary"]["auth_form"] == form
    # Every later request used the form /me settled on.
    assert counters[f"auth_{form}"] == counters["requests"] - counters.get("unauthorized", 0)


def test_the_key_never_appears_in_any_output(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Not on stdout/stderr, not in the result file, sidecar or journal, even on refusals."""
    source = tmp_path / "in.csv"
    source.write_text("call_id,content\ncll-1,one\ncll-404,two\nmsg-1,three\n")
    world = build_world(api_key=KEY, write_rate=100, seed_pairs=[("cll-1", None)])
    output = tmp_path / "in.results.csv"
    with sandbox_factory(world, api_key=KEY, faults="500=0.3", seed=2) as sandbox:
        ok = invoke(["run", str(source), "--base-url", sandbox.base_url, "-o", str(output)])
        bad = invoke(
            ["run", str(source), "--base-url", sandbox.base_url, "-o", str(tmp_path / "b.csv")],
            key=WRONG_KEY,
        )
    texts = [ok.output, bad.output, *(p.read_text() for p in tmp_path.iterdir() if p.is_file())]
    assert ok.exit_code == 1 and bad.exit_code == 3
    for text in texts:
        assert KEY not in text
        assert WRONG_KEY not in text


@pytest.mark.parametrize("persona", PERSONA_NAMES)
def test_revoked_or_wrong_key_stops_at_once_with_exit_3(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str
) -> None:
    """401 at /me: nothing is sent, every row is not_sent, exit 3, whichever key form the API
    takes."""
    source = tmp_path / "in.csv"
    source.write_text("call_id,content\ncll-1,one\ncll-2,two\n")
    output = tmp_path / "r.csv"
    with sandbox_factory(build_world(api_key=KEY), api_key=KEY, persona=persona) as sandbox:
        result = invoke(
            ["run", str(source), "--base-url", sandbox.base_url, "-o", str(output)], key="ak_nope"
        )
        counters = sandbox.state()["counters"]
    assert result.exit_code == 3
    # An API that takes only the bare key refuses the documented form before looking at the
    # key (UNAUTHORIZED); the client tries the bare form once (API_KEY_INVALID), and reports
    # the first of the two 401s.
    bare_only = PERSONAS[persona].auth == "bare"
    assert ("UNAUTHORIZED" if bare_only else "API_KEY_INVALID") in result.output
    assert counters["me"] == 2  # any refused Api-Key form is followed by the bare key, once
    assert counters.get("writes_applied", 0) == 0
    assert pl.read_csv(output)["status"].to_list() == ["not_sent", "not_sent"]


def test_missing_scope_is_refused_before_sending(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A key without CONVERSATIONS_WRITE (per /me) stops the run before any PATCH."""
    source = tmp_path / "in.csv"
    source.write_text("call_id,content\ncll-1,one\n")
    world = build_world(api_key="ak_full")
    world.add_key(ApiKey(key=KEY, scopes=("CONVERSATIONS_READ",)))
    with sandbox_factory(world, api_key="ak_full") as sandbox:
        result = invoke(
            ["run", str(source), "--base-url", sandbox.base_url, "-o", str(tmp_path / "r.csv")]
        )
        counters = sandbox.state()["counters"]
    assert result.exit_code == 3
    assert "CONVERSATIONS_WRITE" in result.output
    assert "status_403" not in counters and counters.get("writes_applied", 0) == 0


def test_max_errors_stops_the_run(sandbox_factory: SandboxFactory, tmp_path: Path) -> None:
    """After N failed rows the run stops with exit 3; the rest are not_sent."""
    source = tmp_path / "in.csv"
    source.write_text("call_id,content\n" + "".join(f"cll-missing{i},x\n" for i in range(30)))
    output = tmp_path / "r.csv"
    with sandbox_factory(build_world(api_key=KEY, write_rate=200), api_key=KEY) as sandbox:
        result = invoke(
            [
                "run",
                str(source),
                "--base-url",
                sandbox.base_url,
                "-o",
                str(output),
                "--max-errors",
                "3",
                "--concurrency",
                "1",
            ]
        )
    assert result.exit_code == 3
    statuses = pl.read_csv(output)["status"].to_list()
    assert statuses.count("failed") == 3
    assert statuses.count("not_sent") == 27


def test_dry_run_sends_nothing_and_writes_the_plan(tmp_path: Path) -> None:
    """--dry-run needs no key and no network; valid rows are not_sent 'would be sent'."""
    output = tmp_path / "plan.csv"
    result = invoke(
        ["run", str(SAMPLE / "corrections.parquet"), "--dry-run", "-o", str(output)], key=None
    )
    assert result.exit_code == 1  # the sample has invalid rows
    plan = pl.read_csv(output, infer_schema_length=None)
    assert plan.height == 292
    assert plan.filter(pl.col("status") == "not_sent").height == 283
    assert set(plan["status"]) == {"not_sent", "invalid", "skipped"}


def test_sandbox_flag_runs_against_an_embedded_simulator(tmp_path: Path) -> None:
    """--sandbox seeds a simulator from the input: every valid row lands, exit 0."""
    source = tmp_path / "in.csv"
    source.write_text("call_id,template_key,content\ncll-1,,a\ncll-2,MARKDOWN_SHORT_CALL,b\n")
    result = invoke(
        [
            "run",
            str(source),
            "--sandbox",
            "--sandbox-rate",
            "50",
            "-o",
            str(tmp_path / "r.csv"),
            "--json",
        ],
        key=None,
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["by_status"] == {"updated": 2}
