"""`allo-batch diff`: what a run would change, read from the API and previewed, sending nothing;
the HTML page is self-contained, owner-only, escaped, and renders in a browser."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from allo_batch.sandbox import ApiKey, build_world
from tests.helpers import KEY, SandboxFactory, invoke, png_facts, screenshot


def setup(tmp_path: Path) -> tuple[Path, object]:
    """Six rows: two already right, two to change, one unknown call, one invalid."""
    rows = [
        ("cll-1", "## Summary\nCustomer asked for a refund.\nRefund approved."),
        ("cll-2", "## Summary\nSame as ever."),
        ("cll-3", "## Summary\nBooked a demo <script>alert(1)</script>."),
        ("cll-4", "## Summary\nAlready right."),
        ("cll-nope", "## Summary\nNo such call."),
        ("msg-1", "an SMS id"),
    ]
    source = tmp_path / "fixes.csv"
    pl.DataFrame(rows, schema=["call_id", "content"], orient="row").write_csv(source)
    world = build_world(seed_pairs=[(f"cll-{i}", None) for i in range(1, 5)])
    world.add_key(ApiKey(key=KEY, write_per_second=100, read_per_second=100))
    current = {
        "cll-1": "## Summary\nCustomer asked for a refund.\nRefund refused.",
        "cll-2": "## Summary\nSame as ever.",
        "cll-3": "## Summary\nBooked a call.",
        "cll-4": "## Summary\nAlready right.",
    }
    for call_id, text in current.items():
        next(iter(world.calls[call_id].values())).content = text
    return source, world


def test_diff_previews_every_row_and_sends_nothing(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Counts per change, one preview row per input row (no content), the first unified diffs."""
    source, world = setup(tmp_path)
    preview = tmp_path / "preview.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        result = invoke(
            ["diff", str(source), "-o", str(preview), "--base-url", sandbox.base_url, "--show", "1"]
        )
        counters = sandbox.state()["counters"]
    assert result.exit_code == 0, result.output
    assert counters.get("patch", 0) == 0
    frame = pl.read_csv(preview)
    assert frame["change"].to_list() == [
        "changed", "unchanged", "changed", "unchanged", "not_found", "invalid",
    ]  # fmt: skip
    assert frame["similarity"][1] == 1.0
    assert 0.8 < frame["similarity"][0] < 1.0
    assert "Refund" not in preview.read_text()  # the preview holds no content
    assert "  changed     2" in result.stdout
    assert "-Refund refused." in result.stdout and "+Refund approved." in result.stdout
    assert "Booked a call" not in result.stdout  # --show 1: only the first diff


def test_diff_html_is_self_contained_private_escaped_and_renders(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """One page, no network resource, owner-only (it holds content), hostile text escaped; a
    headless Chromium screenshot of it is not blank."""
    source, world = setup(tmp_path)
    page = tmp_path / "review.html"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        result = invoke(
            ["diff", str(source), "-o", str(tmp_path / "p.csv"), "--base-url", sandbox.base_url,
             "--html", str(page), "--show", "0"]
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    # --show says how many diffs to print; the page holds every changed row (up to
    # PAGE_ROWS), and the command says where it is.
    assert "Refund" not in result.stdout
    assert f"  page:    {page} (side-by-side diffs of 2 rows)" in result.stdout
    html = page.read_text()
    assert page.stat().st_mode & 0o777 == 0o600
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", html)
    assert "@import" not in html and "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count('<table class="diff"') == 2
    png = tmp_path / "diff.png"
    screenshot(page, png, tmp_path / "profile", size=(1200, 900))
    width, height, colours = png_facts(png.read_bytes())
    assert (width, height) == (1200, 900)
    assert colours > 20


def test_diff_against_an_unreachable_api_says_so_at_once(tmp_path: Path) -> None:
    """A person waits for `diff`: nothing listening means exit 3 in one line, not a wait of
    --max-outage."""
    source, _world = setup(tmp_path)
    result = invoke(["diff", str(source), "--base-url", "http://127.0.0.1:9"])
    assert result.exit_code == 3
    assert result.stderr.strip() == "allo-batch: cannot reach http://127.0.0.1:9 (CONNECTION_ERROR)"


def test_diff_never_writes_over_the_input_or_a_run_s_files(tmp_path: Path) -> None:
    """The preview file and the page may replace neither the input nor a run's result file or
    its state (a result file holds what landed): exit 2, before anything is read, each file
    as it was."""
    source, _world = setup(tmp_path)
    result_file = tmp_path / "results.csv"
    ran = invoke(["run", str(source), "--dry-run", "-o", str(result_file)], key=None)
    assert ran.exit_code == 1, ran.output  # the SMS id is invalid
    state = result_file.with_name("results.csv.run.json")
    files = [source, result_file, state]
    before = [path.read_bytes() for path in files]
    cases = [
        (["--html", str(source)], "--html", "that is the input"),
        (["--html", str(tmp_path / "fixes.preview.csv")], "--html", "that is the preview file"),
        (["--html", str(result_file)], "--html", "that is a run's result file"),
        (["--html", str(state)], "--html", "results.csv.run.json: that is"),
        (["-o", str(result_file)], "--output", "that is a run's result file"),
        (["-o", str(tmp_path / "." / "fixes.csv")], "--output", "that is the input"),
    ]
    for args, option, says in cases:
        refused = invoke(["diff", str(source), *args, "--base-url", "http://127.0.0.1:9"])
        assert refused.exit_code == 2, (args, refused.output)
        assert says in refused.output and f"{option} " in refused.output, refused.output
        assert "name a new file" in refused.output
    assert [path.read_bytes() for path in files] == before
    assert not (tmp_path / "fixes.preview.csv").exists()
