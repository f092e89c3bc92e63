"""Hostile ids, key files and links, runs that must never lose history, clear exits, outages:
each class with the exit code and the exact message a user sees."""

from __future__ import annotations

import errno
import json
import math
import os
import threading
import time
from hashlib import sha256
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from allo_batch.cli import cli
from allo_batch.errors import ExitCode
from allo_batch.record import Journal, journal_path, read_before_images, read_results
from allo_batch.sandbox import ApiKey, build_world
from allo_batch.sandbox.world import World
from allo_batch.send import percentile_ms
from tests.helpers import SandboxFactory

KEY = "ak_hardening_key_88d2"


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    environment = {"ALLO_API_KEY": KEY} if env is None else env
    return CliRunner().invoke(cli, args, env=environment, catch_exceptions=False)


def world_of(*call_ids: str, rate: int = 200) -> World:
    world = build_world(seed_pairs=[(c, None) for c in call_ids])
    world.add_key(ApiKey(key=KEY, write_per_second=rate, read_per_second=rate))
    return world


def write(path: Path, call_ids: list[str], prefix: str = "fix") -> Path:
    pl.DataFrame({"call_id": call_ids, "content": [f"{prefix} {c}" for c in call_ids]}).write_csv(
        path
    )
    return path


@pytest.mark.parametrize(
    "hostile",
    [
        "cll-x/../../../../../v2/api/webhooks/wh-1#",
        "cll-x?id=1",
        "cll-x/summary",
        "cll-x%2F..%2Fme",
        "cll-..",
    ],
)
def test_a_call_id_travels_as_one_encoded_path_segment(
    sandbox_factory: SandboxFactory, tmp_path: Path, hostile: str
) -> None:
    """A path-traversing id addresses a call with that literal id (404), never another route."""
    source = write(tmp_path / "in.csv", [hostile, "cll-ok"])
    with sandbox_factory(world_of("cll-ok"), api_key=KEY) as sandbox:
        result = invoke(
            [
                "run",
                str(source),
                "-o",
                str(tmp_path / "r.csv"),
                "--base-url",
                sandbox.base_url,
                "--blind",
            ]
        )
        counters = sandbox.state()["counters"]
    assert result.exit_code == 1
    rows = read_results(tmp_path / "r.csv")
    assert rows["error_code"].to_list() == ["CONVERSATION_ITEM_NOT_FOUND", None]
    assert counters["patch"] == 2
    assert counters.get("unknown_route", 0) == counters.get("wrong_method", 0) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# my key\nak_live_abcdef\n", "has 2 non-blank lines; it must hold the key alone"),
        ("ak_live_abcdef\nak_live_second\n", "has 2 non-blank lines"),
        ("ak_live_abc def\n", "white space or control characters; it is refused"),
        ("ak_live_abc\tdef\n", "white space or control characters"),
        ("\n\n", "the API key file is empty"),
    ],
)
def test_a_key_file_is_one_line_and_never_echoed(tmp_path: Path, text: str, message: str) -> None:
    """A comment, a second line or white space inside: exit 2, the file named, the key not."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    key_file = tmp_path / "key"
    key_file.write_text(text)
    key_file.chmod(0o600)
    result = invoke(["run", str(source), "--api-key-file", str(key_file)], env={})
    assert result.exit_code == 2
    assert message in result.stderr
    assert f"{key_file}:" in result.stderr
    for secret in ("ak_live_abcdef", "ak_live_second", "ak_live_abc"):
        assert secret not in result.output


def test_a_key_file_others_can_read_is_used_with_a_warning(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """As ssh does: a group- or world-readable key file gets a warning (and CRLF is fine)."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\r\n")
    key_file.chmod(0o644)
    with sandbox_factory(world_of("cll-1"), api_key=KEY) as sandbox:
        result = invoke(
            ["run", str(source), "--api-key-file", str(key_file), "--base-url", sandbox.base_url],
            env={},
        )
    assert result.exit_code == 0, result.output
    assert "readable by others (mode 0o644); chmod 600 it" in result.stderr
    assert KEY not in result.output


@pytest.mark.parametrize("sidecar", ["journal", "lock"])
def test_a_planted_link_beside_the_output_is_refused(tmp_path: Path, sidecar: str) -> None:
    """<output>.journal or .lock as a symbolic link: exit 2, and its target is untouched."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    output = tmp_path / "out.csv"
    target = tmp_path / "precious"
    target.write_text("keep\n")
    link = journal_path(output) if sidecar == "journal" else output.with_name("out.csv.lock")
    link.symlink_to(target)
    result = invoke(["run", str(source), "-o", str(output), "--base-url", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert f"{link}: is a symbolic link; allo-batch does not write through links" in result.stderr
    assert target.read_text() == "keep\n"


def test_no_sequence_of_runs_drops_a_landed_row(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Full run, --limit 5, --dry-run, full run again: landed rows keep their version and
    status, and the last run sends nothing (400 rows, 400 writes in all)."""
    ids = [f"cll-{i:04d}" for i in range(400)]
    source = write(tmp_path / "in.csv", ids)
    output = tmp_path / "out.csv"
    with sandbox_factory(world_of(*ids, rate=1000), api_key=KEY) as sandbox:
        url = sandbox.base_url
        common = ["run", str(source), "-o", str(output), "--base-url", url, "--json"]
        assert invoke(common).exit_code == 0
        versions = read_results(output)["version"].to_list()
        canary = invoke([*common, "--limit", "5"])
        dry = invoke([*common, "--dry-run"])
        last = invoke(common)
        writes = sandbox.state()["counters"]["writes_applied"]
    for run in (canary, dry, last):
        assert run.exit_code == 0, run.output
        assert json.loads(run.stdout)["by_status"] == {"skipped": 400}
    assert read_results(output)["version"].to_list() == versions == [2] * 400
    assert writes == 400


def test_a_canary_judges_duplicates_over_the_whole_input(tmp_path: Path) -> None:
    """Row 1 and row 6 give one target two contents: the full run refuses both (validate says
    so), so a --limit 3 canary must not write row 1, though its conflict comes after the limit."""
    source = tmp_path / "in.csv"
    pl.DataFrame(
        {
            "call_id": ["cll-0", "cll-1", "cll-2", "cll-3", "cll-4", "cll-5", "cll-1", "cll-2"],
            "content": ["a", "first", "same", "d", "e", "f", "second", "same"],
        }
    ).write_csv(source)
    output = tmp_path / "out.csv"
    canary = invoke(["run", str(source), "-o", str(output), "--dry-run", "--limit", "3"], env={})
    assert canary.exit_code == 1, canary.output
    rows = read_results(output)
    assert rows["error_code"].to_list()[:3] == [None, "DUPLICATE_ROW", None]
    assert rows["reason"].to_list()[2:] == ["dry_run", *["limit"] * 5]
    checked = invoke(["validate", str(source)], env={})
    assert checked.exit_code == 1 and "2 invalid" in checked.output


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".ndjson"])
@pytest.mark.parametrize("content", [b"", b"call_id,content\n"])
def test_an_empty_job_is_a_valid_job_for_every_command(
    tmp_path: Path, suffix: str, content: bytes
) -> None:
    """0 bytes, or a header only: exit 0, and the result file is read by a rerun and report."""
    source = tmp_path / "in.csv"
    source.write_bytes(content)
    output = tmp_path / f"out{suffix}"
    args = ["run", str(source), "-o", str(output), "--dry-run"]
    first = invoke(args, env={})
    again = invoke(args, env={})
    report = invoke(["report", str(output)], env={})
    assert (first.exit_code, again.exit_code, report.exit_code) == (0, 0, 0), report.output
    assert "0 rows" in report.output


def test_a_missing_output_folder_is_made_and_an_impossible_one_is_exit_2(tmp_path: Path) -> None:
    """-o into a new folder works; under a file it is exit 2 naming the folder."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    made = invoke(
        ["run", str(source), "-o", str(tmp_path / "new" / "deep" / "r.csv"), "--dry-run"], env={}
    )
    assert made.exit_code == 0, made.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused = invoke(["run", str(source), "-o", str(blocker / "r.csv"), "--dry-run"], env={})
    assert refused.exit_code == 2
    assert f"{blocker}: cannot make the output folder" in refused.stderr


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_folder_as_input_is_named_as_a_folder(tmp_path: Path, command: str) -> None:
    """Not "cannot tell the format from the extension (none)": the folder is named as one."""
    folder = tmp_path / "exports"
    folder.mkdir()
    extra = ["--dry-run"] if command == "run" else []
    result = invoke([command, str(folder), *extra], env={})
    assert result.exit_code == 2
    assert f"{folder}: is a folder; name an input file in it" in result.stderr


def test_the_output_cannot_be_the_input(tmp_path: Path) -> None:
    """-o naming the input file itself is refused before anything is read or written."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    result = invoke(["run", str(source), "-o", str(source), "--dry-run"], env={})
    assert result.exit_code == 2
    assert f"--output {source} is the input file itself" in result.stderr
    assert source.read_text().startswith("call_id,content")


def test_max_errors_says_how_many_rows_actually_failed(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """The stop message counts the rows that failed, including those finishing in flight."""
    source = write(tmp_path / "in.csv", [f"cll-missing-{i}" for i in range(40)])
    with sandbox_factory(world_of("cll-other", rate=1000), api_key=KEY) as sandbox:
        result = invoke(
            [
                "run",
                str(source),
                "-o",
                str(tmp_path / "r.csv"),
                "--base-url",
                sandbox.base_url,
                "--blind",
                "--max-errors",
                "3",
                "--json",
            ]
        )
    summary = json.loads(result.stdout)
    failed = summary["by_status"]["failed"]
    assert result.exit_code == 3
    assert failed >= 3
    assert summary["stopped_reason"] == f"{failed} rows failed (--max-errors 3)"


def test_a_bug_exits_70_with_one_line_and_a_saved_traceback_and_loses_nothing(
    sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error mid-run: exit 70 (not 1, which means 'rows failed'), one line that
    names the saved traceback, the journal kept; the rerun resumes and sends only the rest."""
    from allo_batch import record

    ids = [f"cll-{i:03d}" for i in range(60)]
    source = write(tmp_path / "in.csv", ids)
    output = tmp_path / "out.csv"
    real = record.Recorder.finished
    seen = {"n": 0}

    def flaky(self: record.Recorder, result: Any) -> None:
        seen["n"] += 1
        if seen["n"] == 30:
            raise RuntimeError("a bug in the recorder")
        real(self, result)

    monkeypatch.setattr("allo_batch.cli._crash_folder", lambda: tmp_path)
    with sandbox_factory(world_of(*ids), api_key=KEY) as sandbox:
        args = ["run", str(source), "-o", str(output), "--base-url", sandbox.base_url]
        monkeypatch.setattr(record.Recorder, "finished", flaky)
        crashed = invoke(args)
        monkeypatch.setattr(record.Recorder, "finished", real)
        assert journal_path(output).exists()
        landed = sandbox.state()["counters"]["writes_applied"]
        rerun = invoke([*args, "--json"])
        writes = sandbox.state()["counters"]["writes_applied"]
    assert crashed.exit_code == ExitCode.INTERNAL
    assert int(ExitCode.INTERNAL) == 70
    [line] = crashed.stderr.strip().splitlines()[-1:]
    assert line.startswith("allo-batch: internal error (")
    saved = Path(line.split("Traceback saved to ")[1].split(";")[0])
    assert saved.parent == tmp_path
    assert "a bug in the recorder" in saved.read_text()
    assert saved.stat().st_mode & 0o777 == 0o600
    assert "Traceback (most recent call last)" not in crashed.stderr
    assert rerun.exit_code == 0
    assert writes - landed <= 60 - 29 + 8  # the rest, plus at most the requests then in flight


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_bug_under_json_logs_ends_with_a_json_stop_event(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``--log-format json`` every stderr line of ``run`` is a JSON object, a bug's last
    word too: a ``stop`` event with exit code 70 that names the saved traceback. A command
    without a console (``validate``) says it in one plain line."""
    from allo_batch import validate

    source = write(tmp_path / "in.csv", ["cll-001", "cll-002"])

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in validation")

    monkeypatch.setattr(validate, "validate_batch", broken)
    monkeypatch.setattr("allo_batch.pipeline.validate_batch", broken)
    monkeypatch.setattr("allo_batch.cli._crash_folder", lambda: tmp_path)
    if command == "run":
        args = ["run", str(source), "--dry-run", "-o", str(tmp_path / "out.csv")]
        crashed = invoke([*args, "--log-format", "json"], env={"ALLO_API_KEY": ""})
    else:
        crashed = invoke(["validate", str(source)], env={})
    assert crashed.exit_code == ExitCode.INTERNAL
    lines = crashed.stderr.strip().splitlines()
    if command == "run":
        events = [json.loads(line) for line in lines]  # every line, the last one too
        assert (events[-1]["event"], events[-1]["exit_code"]) == ("stop", 70)
        said = events[-1]["reason"]
    else:
        said = lines[-1].removeprefix("allo-batch: ")
    assert said.startswith("internal error (RuntimeError); this is a bug, not your data")
    saved = Path(said.split("Traceback saved to ")[1].split(";")[0])
    assert saved.parent == tmp_path
    assert "a bug in validation" in saved.read_text()


@pytest.mark.parametrize(
    ("words", "said"),
    [
        (["run", "{source}", "--rate", "0", "--log-format", "json"], "'--rate'"),
        (["run", "{source}", "--log-format=json", "--concurrency", "x"], "'--concurrency'"),
        (["--debug", "nosuch", "--log-format", "json"], "No such command 'nosuch'"),
        (["run", "{source}", "--rate", "0"], None),
    ],
)
def test_a_command_line_mistake_under_json_logs_is_a_json_stop_event(
    tmp_path: Path, words: list[str], said: str | None
) -> None:
    """click printed its usage error as text even under ``--log-format json``, the one line of
    such a log that was not JSON. Now it is a ``stop`` event with exit 2; without JSON logs,
    click's own text as before."""
    source = write(tmp_path / "in.csv", ["cll-001"])
    result = invoke([word.format(source=source) for word in words])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    if said is None:
        assert lines[-1] == "Error: Invalid value for '--rate': 0.0 is not in the range x>=0.0001."
        return
    events = [json.loads(line) for line in lines]
    assert [(e["event"], e["exit_code"]) for e in events] == [("stop", 2)]
    assert said in events[0]["reason"]


def test_a_ten_second_outage_is_ridden_out(sandbox_factory: SandboxFactory, tmp_path: Path) -> None:
    """The API refuses connections for 10 s mid-run (a deploy): the run waits, says so, and
    finishes with exit 0, every row landed once (or resent only if it was in flight)."""
    ids = [f"cll-{i:03d}" for i in range(120)]
    source = write(tmp_path / "in.csv", ids)
    output = tmp_path / "out.csv"
    with sandbox_factory(world_of(*ids, rate=10), api_key=KEY) as sandbox:

        def restart() -> None:
            deadline = time.monotonic() + 20
            while sandbox.app.counters.get("writes_applied", 0) < 30:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)
            sandbox.outage(10)

        outage = threading.Thread(target=restart)
        outage.start()
        result = invoke(
            [
                "run",
                str(source),
                "-o",
                str(output),
                "--base-url",
                sandbox.base_url,
                "--blind",
                "--json",
                "--log-format",
                "json",
                "--log-interval",
                "1",
            ]
        )
        outage.join(timeout=30)
        state = sandbox.state()
    assert result.exit_code == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["by_status"] == {"updated": 120}
    writes = [s["writes"] for s in state["summaries"]]
    assert all(w >= 1 for w in writes)
    assert sum(writes) <= 120 + 2  # at most the requests in flight when the port closed
    notes = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any("API unreachable for" in (n.get("note") or "") for n in notes)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "ndjson"])
def test_names_with_glob_characters_are_files_not_patterns(
    sandbox_factory: SandboxFactory, tmp_path: Path, fmt: str
) -> None:
    """polars reads ``*``, ``?`` and ``[...]`` as patterns: an input, result file or
    before-image folder named with them was "not found" (exit 70 after the writes, on every
    rerun) or, with a look-alike beside it, another file was read in its place. Every command
    takes such names literally, in each format."""
    folder = tmp_path / "drop [1]"
    folder.mkdir()
    ids = ["cll-1", "cll-2", "cll-3"]
    frame = pl.DataFrame({"call_id": ids, "content": [f"fix {c}" for c in ids]})
    source, output = folder / f"in[1]?.{fmt}", folder / f"out*[1].{fmt}"
    for path in (source, folder / f"in1x.{fmt}"):  # the look-alike matches the pattern
        getattr(frame, f"write_{fmt}")(path)
    getattr(frame.head(1), f"write_{fmt}")(folder / f"outX1.{fmt}")  # so does this one
    with sandbox_factory(world_of(*ids), api_key=KEY) as sandbox:
        args = ["run", str(source), "-o", str(output), "--base-url", sandbox.base_url, "--json"]
        first, rerun = invoke(args), invoke(args)
        writes = sandbox.state()["counters"]["writes_applied"]
    assert first.exit_code == 0, first.output
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.stdout)["by_status"] == {"skipped": 3}
    assert writes == 3
    assert read_results(output)["status"].to_list() == ["skipped"] * 3
    assert read_before_images(output)["call_id"].to_list() == ids
    report = invoke(["report", str(output), "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["rows"] == 3
    checked = invoke(["validate", str(source)])
    assert checked.exit_code == 0, checked.output
    assert "3 rows" in checked.output


def test_expected_sha256_is_checked_before_anything_is_sent(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """``expected_sha256`` in either case of hex compares equal; one that is no SHA-256 is an
    invalid row (it could never match); with --blind, which reads nothing to compare, the
    column is exit 2 before anything is sent."""
    world = world_of("cll-1", "cll-2", "cll-3")
    held = {c: next(iter(world.calls[c].values())).content for c in ("cll-1", "cll-2", "cll-3")}
    digest = {c: sha256(text.encode()).hexdigest() for c, text in held.items()}
    source = tmp_path / "in.csv"
    pl.DataFrame(
        {
            "call_id": ["cll-1", "cll-2", "cll-3"],
            "content": ["fix 1", "fix 2", "fix 3"],
            "expected_sha256": [digest["cll-1"].upper(), "nothex", "0" * 64],
        }
    ).write_csv(source)
    output = tmp_path / "out.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        args = ["run", str(source), "-o", str(output), "--base-url", sandbox.base_url]
        blind = invoke([*args, "--blind"])
        assert blind.exit_code == 2, blind.output
        assert "column expected_sha256 needs a read of each target" in blind.output
        assert not output.exists()
        ran = invoke(args)
        writes = sandbox.state()["counters"]["writes_applied"]
    assert ran.exit_code == 1, ran.output
    results = read_results(output)
    assert results["status"].to_list() == ["updated", "invalid", "conflict"]
    assert results["error_code"][1] == "INVALID_REQUEST_BODY"
    assert results["message"][1] == (
        "column expected_sha256: 'nothex' is not a SHA-256 (64 hex digits)"
    )
    assert "left alone (undo --force" in results["message"][2]
    assert writes == 1
    checked = invoke(["validate", str(source)])
    assert checked.exit_code == 1
    assert "column expected_sha256: 'nothex'" in checked.output


def test_sandbox_options_need_sandbox_and_an_exported_ds_needs_a_job(tmp_path: Path) -> None:
    """--sandbox-world and its kin without --sandbox would be dropped and the run sent to the
    real API: exit 2 before anything. ALLO_BATCH_DS exported in a shell is for job runs: a
    plain run ignores it (a --ds typed without --job is still exit 2)."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    for option in (["--sandbox-faults", "500=1"], ["--sandbox-rate", "9"], ["--sandbox-seed", "1"]):
        refused = invoke(["run", str(source), "--base-url", "http://127.0.0.1:9", *option])
        assert refused.exit_code == 2, refused.output
        assert f"{option[0]} only applies with --sandbox" in refused.output
    assert not (tmp_path / "in.results.parquet").exists()
    env = {"ALLO_BATCH_DS": "2026-01-01"}
    dry = invoke(["run", str(source), "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    typed = invoke(["run", str(source), "--dry-run", "--ds", "2026-01-01"], env={})
    assert typed.exit_code == 2
    assert "--ds only applies with --job" in typed.output


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--rate", "inf", "expected a number >= 0.0001, not inf"),
        ("--rate", "nan", "expected a number >= 0.0001, not nan"),
        ("--rate", "1e-300", "expected a number >= 0.0001, not 1e-300"),
        ("--timeout", "inf", "expected a number > 0, not inf"),
        ("--max-outage", "-inf", "expected a number >= 0, not -inf"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(
    tmp_path: Path, option: str, value: str, says: str
) -> None:
    """An infinite or vanishing number was an internal error (exit 70) deep in the pacer or
    the client; it is exit 2 naming the option, on the command line and in a job spec."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    typed = invoke(["run", str(source), "--dry-run", option, value])
    assert typed.exit_code == 2, typed.output
    assert option in typed.output and value in typed.output  # click's own words
    spec = tmp_path / "job.toml"
    number = {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(value, value)
    spec.write_text(f'input = "{source.name}"\n{option[2:].replace("-", "_")} = {number}\n')
    specced = invoke(["run", "--job", str(spec), "--dry-run"])
    assert specced.exit_code == 2, specced.output
    assert says in specced.output


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"ALLO_API_KEY": "ak_PRÖBE_1", "ALLO_BASE_URL": "http://127.0.0.1:9"},
            "ALLO_API_KEY: the API key holds characters other than ASCII; it is refused",
        ),
        (
            {"ALLO_API_KEY": KEY, "ALLO_BASE_URL": "http://user:hunter2@127.0.0.1:9"},
            "--base-url: a user name or password in the URL is refused; give only the host",
        ),
        (
            {"ALLO_API_KEY": KEY, "ALLO_BASE_URL": "http://127.0.0.1:99999"},
            "the port must be a number from 0 to 65535",
        ),
    ],
)
def test_a_key_or_base_url_that_cannot_be_used_is_exit_2(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    """A key a header cannot carry, a URL with a password or an impossible port: exit 2
    before anything is sent (each was an internal error, exit 70), neither secret echoed."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    result = invoke(["run", str(source)], env=env)
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "PRÖBE" not in result.output and "hunter2" not in result.output


def test_an_id_too_long_for_a_url_fails_its_row_not_the_run(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """The docs bound ids by their prefix only, so a 70,000-character id is valid input; no URL
    can carry it (httpx stops at 65,536). Its row fails with URL_TOO_LONG, not retryable; the
    other rows land; exit 1, not the internal error (70) it was on every rerun."""
    long_id = "cll-" + "a" * 70_000
    source = write(tmp_path / "in.csv", ["cll-1", long_id, "cll-2"])
    output = tmp_path / "out.csv"
    with sandbox_factory(world_of("cll-1", "cll-2"), api_key=KEY) as sandbox:
        args = ["run", str(source), "-o", str(output), "--base-url", sandbox.base_url]
        first, rerun = invoke(args), invoke(args)
        writes = sandbox.state()["counters"]["writes_applied"]
    assert first.exit_code == rerun.exit_code == 1, (first.output, rerun.output)
    results = read_results(output)
    assert results["status"].to_list() == ["skipped", "failed", "skipped"]
    assert results["error_code"][1] == "URL_TOO_LONG"
    assert results["retryable"][1] in (False, "false")
    assert results["message"][1] == (
        "not sent: a 70,040-character path is more than a URL can hold"
    )
    assert writes == 2


@pytest.mark.parametrize("extra", [[], ["--blind"], ["--dry-run"]])
def test_a_base_url_that_is_not_the_api_is_exit_2_before_anything_is_sent(
    sandbox_factory: SandboxFactory, tmp_path: Path, extra: list[str]
) -> None:
    """A base URL with a path after the host: /me answers 404, so every request would be
    refused alike (with --blind, each row failed ENDPOINT_NOT_FOUND): exit 2 at once. A dry
    run plans without reads and says why, as it does whenever the API cannot be read."""
    source = write(tmp_path / "in.csv", ["cll-1", "cll-2"])
    output = tmp_path / "out.csv"
    with sandbox_factory(world_of("cll-1", "cll-2"), api_key=KEY) as sandbox:
        wrong = f"{sandbox.base_url}/v2"
        result = invoke(["run", str(source), "-o", str(output), "--base-url", wrong, *extra])
        counters = sandbox.state()["counters"]
    assert result.exit_code == (0 if extra == ["--dry-run"] else 2), result.output
    assert f"--base-url {wrong}: GET /v2/api/me answered 404" in result.output
    assert counters["requests"] == 1  # /me alone


def test_a_blank_template_is_the_same_input_as_none(tmp_path: Path) -> None:
    """A re-export that quotes an empty template ("") or pads one with blanks is the input the
    result file was made from, as validation reads it; another template is not."""
    output = tmp_path / "out.csv"
    first, same, other = (tmp_path / f"{name}.csv" for name in ("first", "same", "other"))
    first.write_text("call_id,template_key,content\ncll-1,,x\ncll-2,MARKDOWN_CLASSIC,y\n")
    same.write_text('call_id,template_key,content\ncll-1,"",x\ncll-2, MARKDOWN_CLASSIC ,y\n')
    other.write_text("call_id,template_key,content\ncll-1,,x\ncll-2,MARKDOWN_SHORT_CALL,y\n")
    for source, code in ((first, 0), (same, 0), (other, 2)):
        result = invoke(["run", str(source), "--dry-run", "-o", str(output)], env={})
        assert result.exit_code == code, (source.name, result.output)
    assert "holds results of another input" in result.output


def test_a_full_disk_stops_the_run_with_3_and_a_rerun_finishes(
    sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills mid-run (the journal's 40th line): exit 3 with what the machine said,
    not "internal error, a bug" (70); once there is room, a rerun lands the rest, none twice.
    A command that sends nothing says the same with exit 2 (a name too long, here)."""
    ids = [f"cll-{i}" for i in range(60)]
    source, output = write(tmp_path / "in.csv", ids), tmp_path / "out.csv"
    write_line = Journal._write
    lines = iter(range(10**6))

    def fill_up(self: Journal, record: dict[str, Any]) -> None:
        if next(lines) >= 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_line(self, record)

    with sandbox_factory(world_of(*ids), api_key=KEY) as sandbox:
        args = ["run", str(source), "-o", str(output), "--base-url", sandbox.base_url]
        monkeypatch.setattr(Journal, "_write", fill_up)
        stopped = invoke(args)
        monkeypatch.undo()
        finished = invoke([*args, "--json"])
        state = sandbox.state()
    assert stopped.exit_code == 3, stopped.output
    assert "No space left on device; the machine refused it (not a bug" in stopped.output
    assert "a rerun resumes once it is fixed" in stopped.output
    assert finished.exit_code == 0, finished.output
    assert read_results(output)["call_id"].to_list() == ids
    assert sorted(s["writes"] for s in state["summaries"]) == [1] * 60
    named = invoke(["validate", str(tmp_path / ("x" * 300 + ".csv"))])
    assert named.exit_code == 2, named.output
    assert "File name too long; the machine refused it (not a bug, not your data)" in (named.output)


def test_a_disk_full_under_the_before_images_stops_the_run_with_3_and_leaves_no_debris(
    sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second chunk of before-images meets a full disk (its file writes to /dev/full):
    exit 3 with what the machine said, as for the journal (polars' own error about it was
    "internal error, a bug", 70), its temporary file removed, and nothing of that chunk sent;
    a rerun lands the rest, none twice."""
    import allo_batch.record as record

    ids = [f"cll-{i}" for i in range(250)]
    source, output = write(tmp_path / "in.csv", ids), tmp_path / "out.csv"
    opened = record.open_private
    chunks = iter(range(10**6))

    def full_disk(path: Path, flags: int) -> int:
        fd = opened(path, flags)
        if path.name.endswith(".chunk.parquet.tmp") and next(chunks) >= 1:
            os.close(fd)
            return os.open("/dev/full", os.O_WRONLY)
        return fd

    with sandbox_factory(world_of(*ids), api_key=KEY) as sandbox:
        args = ["run", str(source), "-o", str(output), "--base-url", sandbox.base_url]
        monkeypatch.setattr(record, "open_private", full_disk)
        stopped = invoke(args)
        monkeypatch.undo()
        left = sorted(p.name for p in (tmp_path / "out.csv.before").iterdir())
        written_then = sandbox.state()["counters"]["patch"]
        finished = invoke([*args, "--json"])
        state = sandbox.state()
    assert stopped.exit_code == 3, stopped.output
    assert "No space left on device; the machine refused it (not a bug" in stopped.output
    assert not [name for name in left if name.endswith(".tmp")], left
    assert written_then <= 200  # the first chunk's rows at most
    assert finished.exit_code == 0, finished.output
    assert sorted(s["writes"] for s in state["summaries"]) == [1] * 250
    assert set(read_before_images(output)["call_id"]) == set(ids)  # every write has its image


def test_verify_and_blind_together_are_refused(tmp_path: Path) -> None:
    """--verify reads back what was written; --blind reads nothing: the verify was skipped
    without a word. Exit 2, before anything."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    result = invoke(["run", str(source), "--blind", "--verify", "--base-url", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert "--verify reads the written targets back, and --blind reads nothing" in result.output


def test_latency_quantiles_never_cross() -> None:
    """p95 is never below p50, with 1, 2 or many answers (the median of two used to be their
    mean while p95 was the lower one)."""
    for ordered in ([0.010], [0.0019, 0.0022], sorted(i / 1000 for i in range(1, 101))):
        quantiles = [percentile_ms(ordered, q) or math.nan for q in (0.5, 0.95, 0.99)]
        assert quantiles == sorted(quantiles), ordered
        assert all(round(q / 1000, 7) in ordered for q in quantiles)
    assert percentile_ms([0.0019, 0.0022], 0.95) == 2.2


def test_an_output_that_is_a_folder_or_no_result_file_is_named_plainly(tmp_path: Path) -> None:
    """-o naming a folder said polars' "expanded paths were empty"; report of a file that is
    no result file blamed an --output nobody gave."""
    source = write(tmp_path / "in.csv", ["cll-1"])
    (tmp_path / "out.csv").mkdir()
    folder = invoke(["run", str(source), "--dry-run", "-o", str(tmp_path / "out.csv")])
    assert folder.exit_code == 2
    assert f"--output {tmp_path / 'out.csv'} is a folder; name a result file in it" in (
        folder.output
    )
    (tmp_path / "in.csv.gz").write_bytes(b"")
    report = invoke(["report", str(tmp_path / "in.csv.gz")])
    assert report.exit_code == 2
    assert report.output.strip().endswith(
        f"{tmp_path / 'in.csv.gz'}: a result file is named .parquet, .csv or .ndjson"
    )
    assert "--output" not in report.output


@pytest.mark.parametrize("command", ["report", "undo"])
def test_report_or_undo_of_a_run_cut_off_before_its_result_file_says_how_to_finish(
    tmp_path: Path, command: str
) -> None:
    """After ``kill -9`` only the journal is there: "does not exist" sent people looking. The
    message names the journal and the rerun that writes the result file."""
    output = tmp_path / "out.csv"
    journal_path(output).write_text("")
    said = invoke([command, str(output)])
    assert said.exit_code == 2
    assert "is not written yet: a run into it was cut off before the end" in said.stderr
    assert "out.csv.journal" in said.stderr
    journal_path(output).unlink()
    assert "does not exist" in invoke([command, str(output)]).stderr  # no journal: as before


@pytest.mark.parametrize("command", ["diff", "report", "undo"])
def test_commands_of_local_files_say_so_for_an_object_in_a_store(command: str) -> None:
    """diff, report and undo read local files only: an s3:// URI was taken for a path and
    shown as "s3:/bucket/key: no such file"."""
    said = invoke([command, "s3://bucket/in/c.csv"])
    assert said.exit_code == 2
    assert f"s3://bucket/in/c.csv: {command} reads local files only" in said.stderr
