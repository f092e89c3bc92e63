"""Job specs (`run --job`), their two shipped examples, and `--log-format json` (issue 6)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from allo_batch.errors import UsageError
from allo_batch.jobspec import load_spec, plan_files, spec_api_key
from tests.helpers import (
    KEY,
    SandboxFactory,
    check_landed_once,
    corrections,
    invoke,
    world_for,
    written,
)

JOBS = Path(__file__).resolve().parent.parent / "jobs"
DS = "2026-11-23"


def events(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line must be one JSON object."""
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


# -- the spec file -------------------------------------------------------------------------


def write_spec(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('rates = 5\ninput = "a.csv"', ["key 'rates'", "unknown key", "did you mean 'rate'?"]),
        ('bogus = 1\ninput = "a.csv"', ["key 'bogus'", "unknown key", "known keys: "]),
        (
            'rate = "5"\ninput = "a.csv"',
            ["key 'rate'", "expected a number >= 0.0001", "a string ('5')"],
        ),
        ("rate = 0", ["key 'rate'", "expected a number >= 0.0001, not 0"]),
        ("concurrency = 2.5", ["key 'concurrency'", "expected an integer from 1 to 256"]),
        ("concurrency = 300", ["key 'concurrency'", "expected an integer from 1 to 256, not 300"]),
        ("max_errors = true", ["key 'max_errors'", "expected an integer >= 1, not a boolean"]),
        ("input = 5", ["key 'input'", "expected a string, not an integer (5)"]),
        ('input = ["a.csv"]', ["key 'input'", "expected a string, not an array"]),
        ('format = "xlsx"', ["key 'format'", 'expected one of "csv", "parquet", "ndjson"']),
        ('log_format = "yaml"', ["key 'log_format'", 'one of "text", "json"']),
        ('output = "{dt}.csv"', ["key 'output'", "unknown placeholder {dt}", "{ds}", "{stem}"]),
        ('input = "{stem}.csv"', ["key 'input'", "unknown placeholder {stem}"]),
        ('output = "{ds.csv"', ["key 'output'", "literal braces"]),
        ("columns = 3", ["key 'columns'", "expected a table of strings, not an integer"]),
        ('[columns]\nsummary = "x"', ["key 'columns.summary'", "unknown field", "content"]),
        ("[columns]\ncontent = 7", ["key 'columns.content'", "expected the file's column name"]),
        (
            'api_key_env = "A"\napi_key_file = "k"',
            ["key 'api_key_file'", "api_key_env or api_key_file, not both"],
        ),
        ("rate = 5\nrate = 6\n", ["not valid TOML", "line 2"]),
        ("started = 2026-11-23", ["key 'started'", "unknown key"]),
        ('finish_by = "tomorrow"', ["key 'finish_by'", "'tomorrow' is no time", "HH:MM"]),
    ],
)
def test_a_bad_spec_is_refused_naming_file_key_and_type(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    """A bad spec exits 2 naming the file, the key and the type it expected."""
    spec = write_spec(tmp_path, text)
    result = invoke(["run", "--job", str(spec)])
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert str(spec) in result.stderr


def test_the_key_itself_is_never_accepted_in_a_spec(tmp_path: Path) -> None:
    """A spec holding the key itself is refused (exit 2) without echoing it."""
    spec = write_spec(tmp_path, f'input = "a.csv"\napi_key = "{KEY}"\n')
    result = invoke(["run", "--job", str(spec)])
    assert result.exit_code == 2
    assert "never holds the key itself" in result.stderr
    assert "api_key_env" in result.stderr
    assert KEY not in result.stderr + result.stdout


def test_a_spec_naming_an_unset_key_variable_is_refused(tmp_path: Path) -> None:
    """The key comes from the spec's variable or file; an unset variable is refused by name."""
    spec = load_spec(write_spec(tmp_path, 'api_key_env = "ALLO_NIGHTLY_KEY"'))
    with pytest.raises(UsageError, match="the environment variable ALLO_NIGHTLY_KEY is not set"):
        spec_api_key(spec, env={})
    key = spec_api_key(spec, env={"ALLO_NIGHTLY_KEY": " ak_x "})
    assert key is not None
    assert key.reveal() == "ak_x"
    (tmp_path / "key").write_text("ak_from_file\n")
    from_file = spec_api_key(load_spec(write_spec(tmp_path, 'api_key_file = "key"')), env={})
    assert from_file is not None
    assert from_file.reveal() == "ak_from_file"


def test_placeholders_and_relative_paths_resolve_beside_the_spec(tmp_path: Path) -> None:
    """Placeholders fill in and relative paths resolve beside the spec; a glob needs {stem} in its
    output."""
    drops = tmp_path / "drops" / DS
    drops.mkdir(parents=True)
    for name in ("b-part.csv", "a-part.csv"):
        corrections(2).write_csv(drops / name)
    (drops / "notes.txt").write_text("not an input")
    spec = load_spec(
        write_spec(
            tmp_path,
            'input = "drops/{ds}/*-part.csv"\noutput = "out/{ds_nodash}/{job}-{stem}.csv"\n',
            name="nightly.toml",
        )
    )
    planned = plan_files(spec, ds=dt.date(2026, 11, 23))
    assert [(p.input, p.output) for p in planned] == [
        (drops / "a-part.csv", tmp_path / "out/20261123/nightly-a-part.csv"),
        (drops / "b-part.csv", tmp_path / "out/20261123/nightly-b-part.csv"),
    ]
    assert plan_files(spec, ds=dt.date(2026, 11, 24)) == []
    no_stem = load_spec(write_spec(tmp_path, 'input = "drops/{ds}/*.csv"\noutput = "r.csv"'))
    with pytest.raises(UsageError, match=r"matches 2 files, so the output needs \{stem\}"):
        plan_files(no_stem, ds=dt.date(2026, 11, 23))


def test_a_glob_that_matches_the_job_s_own_result_files_leaves_them_out(tmp_path: Path) -> None:
    """input "d/*.csv" and output "d/{stem}.results.csv": the rerun took a.results.csv for an
    input of its own, and every rerun was refused (exit 2). Result files are left out."""
    drops = tmp_path / "d"
    drops.mkdir()
    corrections(2).write_csv(drops / "a.csv")
    (drops / "a.results.csv").write_text("row,call_id\n")
    spec = load_spec(write_spec(tmp_path, 'input = "d/*.csv"\noutput = "d/{stem}.results.csv"\n'))
    planned = plan_files(spec, ds=dt.date(2026, 11, 23))
    assert [(p.input, p.output) for p in planned] == [(drops / "a.csv", drops / "a.results.csv")]


def test_the_shipped_examples_load_and_plan() -> None:
    """jobs/nightly.toml and jobs/backfill.toml load and plan as documented."""
    nightly = load_spec(JOBS / "nightly.toml")
    assert nightly.get("api_key_env") == "ALLO_API_KEY"
    assert nightly.get("columns") == {"call_id": "conversation_id", "content": "corrected_summary"}
    override = Path("/tmp/x/corrections-1.csv")
    (planned,) = plan_files(nightly, ds=dt.date(2026, 11, 23), input_override=override)
    assert planned.output == Path("/srv/allo/results/2026-11-23/corrections-1.results.parquet")
    backfill = load_spec(JOBS / "backfill.toml")
    with pytest.raises(UsageError, match="cannot read the API key file"):
        spec_api_key(backfill, env={})
    assert plan_files(backfill, ds=dt.date(2026, 11, 23)) == []  # its input is not in the repo


# -- runs ----------------------------------------------------------------------------------


def test_nightly_example_runs_against_the_sandbox(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """The nightly spec as shipped (its column names, its key variable, its JSON logs), with
    only the file paths and the base URL given on the command line."""
    frame = corrections(8)
    drop = tmp_path / "corrections-1.csv"
    frame.rename({"call_id": "conversation_id", "content": "corrected_summary"}).write_csv(drop)
    output = tmp_path / "results" / "corrections-1.results.parquet"
    with sandbox_factory(world_for(frame), api_key=KEY) as sandbox:
        args = ["run", "--job", str(JOBS / "nightly.toml"), "--ds", DS, str(drop), "-o"]
        args += [str(output), "--base-url", sandbox.base_url, "--rate", "40"]
        result = invoke(args)
        assert result.exit_code == 0, result.stderr
        check_landed_once(sandbox, frame)
        log = events(result.stderr)
        assert [e["event"] for e in log] == ["start", "summary"]
        assert {e["job"] for e in log} == {"nightly"}
        assert {e["ds"] for e in log} == {DS}
        assert log[0]["rows"] == 8
        assert log[1]["by_status"] == {"updated": 8}
        assert log[1]["rate_limit"] == 40  # --rate overrides the spec's 4
        again = invoke(args)
        assert again.exit_code == 0
        assert events(again.stderr)[-1]["requests"] == 0
        check_landed_once(sandbox, frame)
    results = pl.read_parquet(output)  # the rerun's: landed earlier, version carried over
    assert results["status"].to_list() == ["skipped"] * 8
    assert results["version"].to_list() == [2] * 8


def test_backfill_example_runs_against_the_sandbox(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """The backfill spec runs with its key file, leaving the rate to /v2/api/me."""
    frame = corrections(6, start=100)
    source = tmp_path / "short-calls.parquet"
    frame.write_parquet(source)
    key_file = tmp_path / "backfill.key"
    key_file.write_text(KEY + "\n")
    output = tmp_path / "short-calls.results.parquet"
    with sandbox_factory(world_for(frame), api_key=KEY) as sandbox:
        args = ["run", "--job", str(JOBS / "backfill.toml"), str(source), "-o", str(output)]
        args += ["--api-key-file", str(key_file), "--base-url", sandbox.base_url, "--json"]
        result = invoke(args, key="")
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["by_status"] == {"updated": 6}
        assert summary["rate_limit"] == 50  # the spec leaves the rate to /v2/api/me
        check_landed_once(sandbox, frame)


def test_a_dry_run_of_a_spec_needs_no_key(tmp_path: Path) -> None:
    """`run --job jobs/backfill.toml --dry-run`, as the example suggests, before its key exists."""
    source = tmp_path / "short-calls.parquet"
    corrections(4).write_parquet(source)
    output = tmp_path / "plan.csv"
    args = ["run", "--job", str(JOBS / "backfill.toml"), str(source), "-o", str(output)]
    result = invoke([*args, "--dry-run", "--json"], key="")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["by_status"] == {"not_sent": 4}
    refused = invoke(args, key="")
    assert refused.exit_code == 2
    assert "/etc/allo-batch/backfill.key: cannot read the API key file" in refused.stderr


def two_parts(folder: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``part-1.csv`` (3 rows) and ``part-2.csv`` (4 rows) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    first, second = corrections(3), corrections(4, start=50)
    first.write_csv(folder / "part-1.csv")
    second.write_csv(folder / "part-2.csv")
    return first, second


def test_a_glob_makes_one_run_per_file_and_an_empty_day_can_be_skipped(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A glob makes one run and one result file per match; no match is exit 0 under
    if_no_input=skip, 2 under fail."""
    first, second = two_parts(tmp_path / "drops" / DS)
    with sandbox_factory(world_for(first, second), api_key=KEY) as sandbox:
        spec = write_spec(
            tmp_path,
            f'input = "drops/{{ds}}/part-*.csv"\noutput = "results/{{ds}}/{{stem}}.csv"\n'
            f'base_url = "{sandbox.base_url}"\nrate = 40\nif_no_input = "skip"\n',
        )
        result = invoke(["run", "--job", str(spec), "--ds", DS, "--json"])
        assert result.exit_code == 0, result.stderr
        summaries = [json.loads(line) for line in result.stdout.splitlines()]
        assert [s["by_status"] for s in summaries] == [{"updated": 3}, {"updated": 4}]
        check_landed_once(sandbox, pl.concat([first, second]))
        for name, frame in (("part-1", first), ("part-2", second)):
            results = pl.read_csv(tmp_path / "results" / DS / f"{name}.csv")
            assert results["call_id"].to_list() == frame["call_id"].to_list()
        empty = invoke(["run", "--job", str(spec), "--ds", "2026-11-24"])
        assert empty.exit_code == 0
        assert "no input file matches" in empty.stderr
    spec.write_text(spec.read_text().replace('"skip"', '"fail"'))
    failed = invoke(["run", "--job", str(spec), "--ds", "2026-11-24"])
    assert failed.exit_code == 2
    assert "no input file matches" in failed.stderr


def test_a_stop_ends_the_job_before_its_next_file(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A refused key stops the first file with 3; the second is not started, and says so."""
    first, second = two_parts(tmp_path)
    with sandbox_factory(world_for(first, second), api_key=KEY) as sandbox:
        spec = write_spec(
            tmp_path,
            f'input = "part-*.csv"\noutput = "{{stem}}.results.csv"\n'
            f'base_url = "{sandbox.base_url}"\nlog_format = "json"\n',
        )
        result = invoke(["run", "--job", str(spec)], key="ak_not_a_key")
        assert result.exit_code == 3
        assert written(sandbox) == {}
    log = events(result.stderr)
    assert [e["event"] for e in log] == ["start", "summary", "stop", "skip"]
    assert log[-1]["exit_code"] == 3
    assert log[-1]["reason"] == f"not started after the stop above: {tmp_path / 'part-2.csv'}"
    assert (tmp_path / "part-1.results.csv").exists()
    assert not (tmp_path / "part-2.results.csv").exists()


def test_a_job_of_several_files_sends_nothing_when_one_input_is_refused(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Exit 2 means that nothing was sent: every file is opened before the first is sent, so a
    file refused (here a semicolon-separated export) stops the job before the good ones, with
    one line for it and one for the files left."""
    first, second = two_parts(tmp_path)
    (tmp_path / "part-3.csv").write_text("call_id;template_key;content\ncll-1;;x\n")
    with sandbox_factory(world_for(first, second), api_key=KEY) as sandbox:
        spec = write_spec(
            tmp_path,
            f'input = "part-*.csv"\noutput = "{{stem}}.results.csv"\n'
            f'base_url = "{sandbox.base_url}"\nlog_format = "json"\n',
        )
        result = invoke(["run", "--job", str(spec)])
        assert result.exit_code == 2, result.stderr
        assert written(sandbox) == {}
    log = events(result.stderr)
    assert [(e["event"], e["exit_code"]) for e in log] == [("stop", 2), ("skip", 2)]
    assert str(tmp_path / "part-3.csv") in log[0]["reason"]
    left = f"{tmp_path / 'part-1.csv'}, {tmp_path / 'part-2.csv'}"
    assert (
        log[1]["reason"] == f"not started as an input above is refused (nothing was sent): {left}"
    )
    assert not list(tmp_path.glob("*.results.csv"))


def test_an_output_folder_that_cannot_be_made_is_exit_2(tmp_path: Path) -> None:
    """An output folder that cannot be made is exit 2 naming it."""
    corrections(1).write_csv(tmp_path / "in.csv")
    (tmp_path / "blocked").write_text("a file where the folder should be")
    spec = write_spec(tmp_path, 'input = "in.csv"\noutput = "blocked/{ds}/out.csv"\n')
    result = invoke(["run", "--job", str(spec), "--dry-run"])
    assert result.exit_code == 2
    assert "blocked/" in result.stderr
    assert "cannot make the output folder" in result.stderr


def test_ds_needs_a_job_and_a_run_needs_an_input(tmp_path: Path) -> None:
    """--ds needs --job, and a run needs an input."""
    assert "give INPUT, or --job" in invoke(["run"]).stderr
    only_ds = invoke(["run", str(tmp_path / "a.csv"), "--ds", DS])
    assert only_ds.exit_code == 2
    assert "--ds only applies with --job" in only_ds.stderr


# -- JSON logs ------------------------------------------------------------------------------


def test_json_logs_report_progress_stops_and_summary_without_content_or_key(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """JSON logs: start, progress, warning, stop and summary events, never content or the key."""
    frame = corrections(12, prefix="SECRET-CONTENT")
    source = tmp_path / "in.csv"
    frame.write_csv(source)
    output = tmp_path / "out.csv"
    with sandbox_factory(world_for(frame, write_rate=6), api_key=KEY) as sandbox:
        spec = write_spec(
            tmp_path,
            f'output = "out.csv"\nbase_url = "{sandbox.base_url}"\nlog_interval = 0.5\n'
            'log_format = "json"\n',
        )
        result = invoke(["run", "--job", str(spec), str(source)])
        assert result.exit_code == 0, result.stderr
        log = events(result.stderr)
        kinds = [e["event"] for e in log]
        assert kinds[0] == "start"
        assert kinds[-1] == "summary"
        assert kinds.count("progress") >= 2  # 12 rows at 6/s, a line every 0.5 s
        progress = [e for e in log if e["event"] == "progress"]
        assert all(p["rows"] == 12 and 0 <= p["done"] <= 12 for p in progress)
        assert all(e["ts"].endswith("Z") for e in log)
        assert log[-1]["exit_code"] == 0
        # A different input into the same output: refused, as a `stop` event.
        other = tmp_path / "other.csv"
        corrections(2, start=900).write_csv(other)
        refused = invoke(["run", "--job", str(spec), str(other)])
        assert refused.exit_code == 2
        (stop,) = events(refused.stderr)
        assert stop["event"] == "stop"
        assert stop["exit_code"] == 2
        assert "holds results of another input" in stop["reason"]
        # --force turns it into a warning event, then a run.
        forced = invoke(["run", "--job", str(spec), str(other), "--force", "--dry-run"])
        kinds = [e["event"] for e in events(forced.stderr)]
        assert kinds[0] == "warning"
        assert kinds[-1] == "summary"
        sandbox.app.world.revoked.add(KEY)
        stopped = invoke(["run", "--job", str(spec), str(source), "-o", str(tmp_path / "b.csv")])
        assert stopped.exit_code == 3
        last = events(stopped.stderr)[-2:]
        assert [e["event"] for e in last] == ["summary", "stop"]
        assert last[1]["exit_code"] == 3
    every = result.stderr + refused.stderr + forced.stderr + stopped.stderr
    assert "SECRET-CONTENT" not in every
    assert KEY not in every
    assert output.exists()


def test_two_inputs_sharing_a_stem_are_refused_before_either_runs(tmp_path: Path) -> None:
    """``a.csv`` and ``a.ndjson`` under ``{stem}`` would write one result file: the second run
    was refused as another input after the first had sent. Exit 2 before anything."""
    drops = tmp_path / "drops"
    drops.mkdir()
    frame = pl.DataFrame({"call_id": ["cll-1"], "content": ["x"]})
    frame.write_csv(drops / "a.csv")
    frame.write_ndjson(drops / "a.ndjson")
    spec = write_spec(tmp_path, 'input = "drops/a.*"\noutput = "results/{stem}.csv"\n')
    result = invoke(["run", "--job", str(spec), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "a.csv and" in result.stderr and "a.ndjson would both write" in result.stderr
    assert not (tmp_path / "results").exists()
