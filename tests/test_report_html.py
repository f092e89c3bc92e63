"""`allo-batch report --failed / --export-failed / --html` on result files of real runs.

The result files come from the real pipeline against the embedded sandbox (the sample data with
an extra column, so "every column" is tested), or are synthesised in the result schema where a
test needs rows no run would make (a hostile call id, a million rows).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner, Result

from allo_batch.cli import cli
from allo_batch.record import result_schema
from tests.helpers import png_facts, screenshot

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(input, result file) of a real run: the sample corrections plus a ``ticket`` column
    and a ``code`` column whose leading zeros must survive, against the sample world."""
    folder = tmp_path_factory.mktemp("run")
    source = folder / "corrections.csv"
    frame = pl.read_csv(SAMPLE / "corrections.csv", infer_schema=False)
    frame.with_columns(
        pl.format("T-{}", pl.int_range(pl.len())).alias("ticket"),
        pl.lit("007").alias("code"),
    ).write_csv(source)
    output = folder / "results.csv"
    ran = invoke(
        "run",
        source,
        "--sandbox",
        "--sandbox-world",
        SAMPLE / "world.json",
        "--sandbox-rate",
        200,
        "-o",
        output,
        "--no-progress",
    )
    assert ran.exit_code == 1, ran.output
    return source, output


def needs_human(output: Path) -> pl.DataFrame:
    results = pl.read_csv(output, infer_schema=False)
    return results.filter(pl.col("status").is_in(["invalid", "failed"]))


# -- --failed ------------------------------------------------------------------------------------


def test_failed_lists_exactly_the_invalid_and_failed_rows(sample_run: tuple[Path, Path]) -> None:
    """The JSON list holds every invalid or failed row, in row order, and nothing else."""
    _source, output = sample_run
    listed = invoke("report", output, "--failed", "--json", "--show", 0)
    assert listed.exit_code == 0
    items = json.loads(listed.stdout)
    expected = needs_human(output)
    assert [item["row"] for item in items] == [int(r) for r in expected["row"]]
    assert [item["error_code"] for item in items] == expected["error_code"].to_list()
    assert {item["status"] for item in items} == {"invalid", "failed"}
    assert all(item["record"] == item["row"] + 1 and item["line"] is None for item in items)


def test_failed_text_is_aligned_and_says_how_many_more(sample_run: tuple[Path, Path]) -> None:
    """Plain text: a headline with the counts, one aligned line per row, then what is left."""
    _source, output = sample_run
    total = needs_human(output).height
    listed = invoke("report", output, "--failed", "--show", 3)
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    assert f"{total} rows need a human: 8 invalid, 4 failed" in lines[0]
    header, rows = lines[1], lines[2:5]
    assert header.split()[:4] == ["ROW", "WHERE", "CALL", "ID"]
    for row in rows:  # every row's CODE column starts where the header's does
        assert row[header.index("CODE") - 1] == " "
        assert row[header.index("CODE")] != " "
    assert f"... and {total - 3} more" in listed.stdout
    assert "record N: the Nth record after the header" in listed.stdout


def test_failed_with_the_input_gives_the_line_each_row_starts_on(
    sample_run: tuple[Path, Path],
) -> None:
    """Sample contents span lines, so line row+2 would be wrong; --input gives the true line,
    checked here against the file's own text."""
    source, output = sample_run
    listed = invoke("report", output, "--failed", "--json", "--show", 0, "--input", source)
    assert listed.exit_code == 0, listed.output
    text = source.read_text().splitlines()
    items = json.loads(listed.stdout)
    assert any(item["line"] != item["row"] + 2 for item in items)
    for item in items:
        assert text[item["line"] - 1].startswith(f"{item['call_id'] or ''},"), item


def test_failed_escapes_control_characters_for_the_terminal(tmp_path: Path) -> None:
    """A call id from the file cannot colour or move the terminal."""
    output = synthetic_results(tmp_path, [{"call_id": "cll-\x1b[31mred", "status": "invalid"}])
    listed = invoke("report", output, "--failed")
    assert "\x1b" not in listed.stdout
    assert "cll-\\x1b[31mred" in listed.stdout


# -- --export-failed -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".ndjson"])
def test_export_failed_writes_those_rows_with_every_column(
    sample_run: tuple[Path, Path], tmp_path: Path, suffix: str
) -> None:
    """The file holds exactly the input's invalid/failed rows, every column as it was, and
    `allo-batch validate` reads it."""
    source, output = sample_run
    fixes = tmp_path / f"fixes{suffix}"
    exported = invoke("report", output, "--export-failed", fixes, "--input", source)
    assert exported.exit_code == 0, exported.output
    assert fixes.stat().st_mode & 0o777 == 0o600
    rows = [int(r) for r in needs_human(output)["row"]]
    original = pl.read_csv(source, infer_schema=False)
    expected = original[rows]
    got = read_any(fixes)
    assert got.columns == ["call_id", "template_key", "content", "ticket", "code"]
    assert got.to_dicts() == expected.to_dicts()
    checked = invoke("validate", fixes)
    assert checked.exit_code == 1  # the invalid rows are still invalid: nothing is fixed yet
    assert f"{fixes}: {len(rows)} rows, 4 valid, 8 invalid" in checked.output


def test_export_failed_takes_content_corrected_in_place(
    sample_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Content edited in the input keeps its fingerprint: the export carries the edit."""
    source, output = sample_run
    edited = tmp_path / "edited.csv"
    frame = pl.read_csv(source, infer_schema=False)
    row = int(needs_human(output)["row"][3])
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == row)
        .then(pl.lit("fixed content"))
        .otherwise(pl.col("content"))
        .alias("content")
    )
    frame.write_csv(edited)
    fixes = tmp_path / "fixes.csv"
    assert invoke("report", output, "--export-failed", fixes, "--input", edited).exit_code == 0
    assert pl.read_csv(fixes, infer_schema=False)["content"][3] == "fixed content"


@pytest.mark.parametrize("change", ["drop_row", "swap_rows", "other_file"])
def test_export_failed_refuses_an_input_that_is_not_the_runs(
    sample_run: tuple[Path, Path], tmp_path: Path, change: str
) -> None:
    """Rows removed, reordered, or another file: exit 2, a clear message, nothing written."""
    source, output = sample_run
    frame = pl.read_csv(source, infer_schema=False)
    other = tmp_path / "other.csv"
    if change == "drop_row":
        frame = frame.slice(1)
    elif change == "swap_rows":
        frame = pl.concat([frame[1:2], frame[0:1], frame[2:]])
    else:
        frame = frame.head(5).with_columns(pl.lit("cll-777").alias("call_id"))
    frame.write_csv(other)
    fixes = tmp_path / "fixes.csv"
    refused = invoke("report", output, "--export-failed", fixes, "--input", other)
    assert refused.exit_code == 2
    assert f"{other} is not the input of {output}" in refused.output
    assert not fixes.exists()


def test_export_failed_needs_the_input_and_a_known_format(
    sample_run: tuple[Path, Path], tmp_path: Path
) -> None:
    source, output = sample_run
    missing = invoke("report", output, "--export-failed", tmp_path / "fixes.csv")
    assert missing.exit_code == 2
    assert "--export-failed needs --input INPUT" in missing.output
    wrong = invoke("report", output, "--export-failed", tmp_path / "fixes.xlsx", "--input", source)
    assert wrong.exit_code == 2
    assert "use a .csv, .parquet or .ndjson file name" in wrong.output
    onto = invoke("report", output, "--export-failed", source, "--input", source)
    assert onto.exit_code == 2
    assert "name a new file" in onto.output


def read_any(path: Path) -> pl.DataFrame:
    if path.suffix == ".csv":
        return pl.read_csv(path, infer_schema=False)
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    return pl.read_ndjson(path)


# -- --html ---------------------------------------------------------------------------------------

REMOTE = re.compile(
    r"""(?:src|href|xlink:href|action)\s*=\s*["']?\s*(?:https?:)?//|@import|url\(|<script|<link""",
    re.IGNORECASE,
)


def test_html_is_self_contained_with_counts_and_a_plot_each(
    sample_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _source, output = sample_run
    page_path = tmp_path / "report.html"
    made = invoke("report", output, "--html", page_path)
    assert made.exit_code == 0, made.output
    page = page_path.read_text()
    assert "http://" not in page and "https://" not in page
    assert not REMOTE.search(page)
    for count, status in ((279, "updated"), (1, "skipped"), (8, "invalid"), (4, "failed")):
        assert f"<div class='n'>{count}</div><div class='l'>{status} ·" in page
    for code, rows in (("INVALID_REQUEST_BODY", 4), ("CONVERSATION_ITEM_NOT_FOUND", 1)):
        assert f"<td class='mono'>{code}</td><td>" in page
        assert re.search(rf"{code}</td><td>\w+</td><td class='num'>{rows}</td>", page)
    assert page.count("<svg class='plot'") == 3
    for title in ("Writes per second", "Latency", "Errors over time"):
        assert f"<figcaption>{title} " in page
    assert "limit 200/s" in page
    assert "Rows that need a human" in page
    assert page.count("<tr><td class='num'>") == needs_human(output).height


def test_html_escapes_every_string_from_the_files(tmp_path: Path) -> None:
    hostile = "cll-<script>alert(1)</script>"
    output = synthetic_results(
        tmp_path,
        [
            {"call_id": hostile, "status": "failed", "error_code": "X'><b>", "message": "<img>"},
            {"call_id": "cll-1", "status": "updated"},
        ],
    )
    page_path = tmp_path / "report.html"
    assert invoke("report", output, "--html", page_path).exit_code == 0
    page = page_path.read_text()
    assert "<script" not in page and "<img" not in page and "X'><b>" not in page
    assert "cll-&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "X&#x27;&gt;&lt;b&gt;" in page


def test_html_of_a_dry_run_says_no_requests_were_sent(tmp_path: Path) -> None:
    output = tmp_path / "plan.parquet"
    planned = invoke("run", SAMPLE / "corrections.csv", "--dry-run", "-o", output)
    assert planned.exit_code == 1
    page_path = tmp_path / "plan.html"
    assert invoke("report", output, "--html", page_path).exit_code == 0
    page = page_path.read_text()
    assert "no requests were sent" in page
    assert "<svg" not in page
    assert "<div class='n'>283</div><div class='l'>not_sent" in page


@pytest.mark.parametrize("sidecar", ["no_timeline", "null_timeline", "none"])
def test_html_of_an_old_or_missing_sidecar(
    sample_run: tuple[Path, Path], tmp_path: Path, sidecar: str
) -> None:
    """An allo-batch older than the timeline, a run that sent nothing, or no sidecar at all:
    the counts, the table and a sentence instead of the plots."""
    _source, output = sample_run
    copy = tmp_path / output.name
    shutil.copy(output, copy)
    facts = json.loads(Path(f"{output}.run.json").read_text())
    if sidecar == "no_timeline":
        del facts["timeline"]
    elif sidecar == "null_timeline":
        facts["timeline"], facts["summary"]["requests"] = None, 0
    if sidecar != "none":
        Path(f"{copy}.run.json").write_text(json.dumps(facts))
    page_path = tmp_path / "report.html"
    assert invoke("report", copy, "--html", page_path).exit_code == 0
    page = page_path.read_text()
    expected = {
        "no_timeline": "sidecar has no timeline",
        "null_timeline": "No requests were sent in this run.",
        "none": "No sidecar (results.csv.run.json)",
    }[sidecar]
    assert expected in page
    assert "<svg" not in page
    assert "<div class='n'>279</div>" in page


def test_html_of_a_million_rows_is_small(tmp_path: Path) -> None:
    """Aggregates and at most 200 listed rows: under 1 MB, even with a full 2048-bucket
    timeline (no timing here: speed is for make bench, never a unit test)."""
    output = million_rows(tmp_path)
    page_path = tmp_path / "big.html"
    made = invoke("report", output, "--html", page_path)
    assert made.exit_code == 0, made.output
    size = page_path.stat().st_size
    assert size < 1_000_000, size
    page = page_path.read_text()
    assert page.count("<svg class='plot'") == 3
    assert page.count("<tr><td class='num'>") == 200
    assert "<div class='n'>10,310</div><div class='l'>failed" in page


def test_html_renders_in_a_headless_browser(sample_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The page, opened by Chromium with no network, gives a screenshot that is not blank."""
    _source, output = sample_run
    page_path = tmp_path / "report.html"
    assert invoke("report", output, "--html", page_path).exit_code == 0
    png = tmp_path / "shot.png"
    screenshot(page_path, png, tmp_path / "profile")
    width, height, colours = png_facts(png.read_bytes())
    assert (width, height) == (1200, 1600)
    assert colours > 50  # text, plots and status colours, not a blank page


# -- synthetic result files ------------------------------------------------------------------------


def synthetic_results(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """A result CSV of ``rows`` (missing columns null), with a sidecar without a timeline."""
    filled = [{**dict.fromkeys(result_schema()), "row": i, **row} for i, row in enumerate(rows)]
    output = folder / "results.csv"
    pl.DataFrame(filled, schema=result_schema()).write_csv(output)
    Path(f"{output}.run.json").write_text(json.dumps({"summary": {"rows": len(rows)}}))
    return output


def million_rows(folder: Path) -> Path:
    """A million-row Parquet result file (1 in 97 rows failed, 1 in 89 invalid) and a sidecar
    with a 2048-bucket timeline of 4-second buckets."""
    n = 1_000_000
    row = pl.col("row")
    status = (
        pl.when(row % 97 == 0)
        .then(pl.lit("failed"))
        .when(row % 89 == 0)
        .then(pl.lit("invalid"))
        .otherwise(pl.lit("updated"))
    )
    frame = (
        pl.DataFrame({"row": pl.int_range(0, n, eager=True)})
        .with_columns(pl.format("cll-{}", row).alias("call_id"), status.alias("status"))
        .with_columns(
            pl.when(pl.col("status") == "failed")
            .then(pl.lit("CONVERSATION_ITEM_NOT_FOUND"))
            .when(pl.col("status") == "invalid")
            .then(pl.lit("INVALID_REQUEST_BODY"))
            .alias("error_code"),
            pl.when(pl.col("status") != "updated").then(pl.lit("refused")).alias("message"),
        )
    )
    schema = result_schema()
    frame = frame.select(
        pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype).alias(name)
        for name, dtype in schema.items()
    )
    output = folder / "big.parquet"
    frame.write_parquet(output)
    buckets = [
        {
            "t": i * 4.0,
            "requests": 480,
            "ok": 470,
            "rate_limited": int(i % 7 == 0),
            "errors": {"HTTP_503": i % 5, "CONVERSATION_ITEM_NOT_FOUND": 5},
            "latency_ms": [20.0 + i % 3, 60.0 + i % 11, 90.0 + i % 101],
        }
        for i in range(2048)
    ]
    sidecar = {
        "input": {"path": "/data/big.parquet", "rows": n, "keys_sha256": "0" * 64},
        "summary": {"rows": n, "requests": 983_040, "rate_limit": 120.0, "exit_code": 1},
        "timeline": {"bucket_seconds": 4.0, "buckets": buckets},
    }
    Path(f"{output}.run.json").write_text(json.dumps(sidecar))
    return output


def test_html_never_writes_over_the_result_file_its_state_or_the_input(
    sample_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """``report --html`` onto the result file, its run facts, the input or another run's result
    file: exit 2 and each file as it was (it held what landed)."""
    source, output = sample_run
    other = tmp_path / "other.csv"
    assert invoke("run", source, "--dry-run", "-o", other).exit_code == 1
    files = [output, output.with_name(output.name + ".run.json"), source, other]
    before = [path.read_bytes() for path in files]
    for page in files:
        refused = invoke("report", output, "--input", source, "--html", page)
        assert refused.exit_code == 2, refused.output
        assert f"--html {page}: that is" in refused.output
    assert [path.read_bytes() for path in files] == before


def test_html_never_writes_over_the_input_the_run_recorded(
    sample_run: tuple[Path, Path],
) -> None:
    """Without ``--input``, the result file's run facts name the input: ``--html`` onto it is
    exit 2, the input as it was."""
    source, output = sample_run
    before = source.read_bytes()
    refused = invoke("report", output, "--html", source)
    assert refused.exit_code == 2, refused.output
    assert f"--html {source}: that is the run's input" in refused.output
    assert source.read_bytes() == before
