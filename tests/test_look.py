"""Know before you write: reads ahead of the writes, before-images, rows already right left
alone, end to end against the sandbox on 127.0.0.1 and proven from its own record."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest

from allo_batch.constants import WRITE_SCOPE
from allo_batch.look import Current, read_current
from allo_batch.record import before_dir, read_before_images, read_results
from allo_batch.sandbox import ApiKey, build_world
from allo_batch.sandbox.personas import PERSONAS, BatchMissing, BatchOrder
from allo_batch.sandbox.world import World
from tests.helpers import KEY, PERSONA_NAMES, SANDBOX_KEY, SandboxFactory, invoke, sha


def corrections(path: Path, rows: int) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "call_id": [f"cll-{i:06d}" for i in range(rows)],
            "content": [f"## Corrected summary {i}\nFollow-up booked." for i in range(rows)],
        }
    )
    frame.write_csv(path)
    return frame


def world_with_half_right(frame: pl.DataFrame, *, rate: int = 400) -> tuple[World, dict[str, str]]:
    """Every call exists with one summary; the even rows already hold their corrected text."""
    world = build_world(seed_pairs=[(c, None) for c in frame["call_id"]])
    world.add_key(ApiKey(key=KEY, write_per_second=rate, read_per_second=rate))
    before = {}
    for index, (call_id, content) in enumerate(frame.select("call_id", "content").iter_rows()):
        summary = next(iter(world.calls[call_id].values()))
        if index % 2 == 0:
            summary.content = content
        before[call_id] = summary.content
    return world, before


def summary_json(output: str) -> dict[str, Any]:
    return json.loads(output.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("persona", PERSONA_NAMES)
def test_rows_already_right_are_not_written_and_the_rest_keep_before_images(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str
) -> None:
    """Half of 2,000 rows already hold their content: exactly 1,000 PATCHes, 1,000 unchanged,
    exit 0, 0 x 429 whichever bucket the batch read counts against, a before-image of every
    written row holding what the target held, reads about 1 % of the writes.

    The same under every persona: nothing was written to these targets within ``read_lag``,
    so a lagging read shows what they hold; reads are matched by id whatever their order;
    every id exists, so a persona that refuses a batch for an unknown id refuses none."""
    source = tmp_path / "fixes.csv"
    frame = corrections(source, 2000)
    world, before = world_with_half_right(frame)
    output = tmp_path / "out.parquet"
    with sandbox_factory(world, api_key=KEY, persona=persona) as sandbox:
        result = invoke(
            ["run", str(source), "-o", str(output), "--base-url", sandbox.base_url, "--json"]
        )
        state = sandbox.state()
    assert result.exit_code == 0, result.output
    summary = summary_json(result.stdout)
    assert summary["by_status"] == {"updated": 1000, "unchanged": 1000}
    assert summary["rate_limited"] == 0
    assert state["counters"]["patch"] == 1000
    assert summary["reads"] <= 0.03 * summary["requests"] + 2
    written = {s["call_id"] for s in state["summaries"] if s["writes"]}
    assert written == set(frame["call_id"][1::2])
    results = read_results(output)
    assert results.filter(pl.col("status") == "unchanged")["call_id"].to_list() == list(
        frame["call_id"][::2]
    )
    images = read_before_images(output)
    assert images.height == 1000
    assert images["certain"].all()
    assert dict(images.select("call_id", "content").iter_rows()) == {
        c: before[c] for c in frame["call_id"][1::2]
    }
    assert before_dir(output).stat().st_mode & 0o777 == 0o700
    for path in before_dir(output).iterdir():
        assert path.stat().st_mode & 0o777 == 0o600


def test_before_images_never_reach_the_result_file_or_the_output(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Customer content lives only in the owner-only before-images."""
    source = tmp_path / "fixes.csv"
    frame = corrections(source, 40)
    world, before = world_with_half_right(frame)
    output = tmp_path / "out.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        result = invoke(["run", str(source), "-o", str(output), "--base-url", sandbox.base_url])
    assert result.exit_code == 0
    text = output.read_text() + result.output + output.with_name("out.csv.run.json").read_text()
    for content in before.values():
        assert content not in text


def test_a_rerun_without_the_result_file_costs_reads_not_writes(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A new worker that lost the result file: everything is already right, nothing is sent."""
    source = tmp_path / "fixes.csv"
    frame = corrections(source, 300)
    world, _ = world_with_half_right(frame)
    with sandbox_factory(world, api_key=KEY) as sandbox:
        first = invoke(
            ["run", str(source), "-o", str(tmp_path / "a.csv"), "--base-url", sandbox.base_url]
        )
        patches = sandbox.state()["counters"]["patch"]
        again = invoke(
            [
                "run",
                str(source),
                "-o",
                str(tmp_path / "b.csv"),
                "--base-url",
                sandbox.base_url,
                "--json",
            ]
        )
        state = sandbox.state()
    assert (first.exit_code, again.exit_code) == (0, 0)
    assert state["counters"]["patch"] == patches == 150
    assert summary_json(again.stdout)["by_status"] == {"unchanged": 300}


def test_write_always_writes_every_row(sandbox_factory: SandboxFactory, tmp_path: Path) -> None:
    """--write-always: no row is skipped, and before-images are still kept."""
    source = tmp_path / "fixes.csv"
    frame = corrections(source, 60)
    world, _ = world_with_half_right(frame)
    output = tmp_path / "out.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        result = invoke(
            [
                "run",
                str(source),
                "-o",
                str(output),
                "--base-url",
                sandbox.base_url,
                "--write-always",
                "--json",
            ]
        )
        assert sandbox.state()["counters"]["patch"] == 60
    assert summary_json(result.stdout)["by_status"] == {"updated": 60}
    assert read_before_images(output).height == 60


def test_a_key_without_read_scope_is_refused_unless_blind(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """No CONVERSATIONS_READ: exit 3 with what to do; --blind writes without reading."""
    source = tmp_path / "fixes.csv"
    frame = corrections(source, 20)
    world, _ = world_with_half_right(frame)
    world.add_key(ApiKey(key="ak_write_only", scopes=(WRITE_SCOPE,), write_per_second=100))
    with sandbox_factory(world, api_key=KEY) as sandbox:
        refused = invoke(
            ["run", str(source), "-o", str(tmp_path / "a.csv"), "--base-url", sandbox.base_url],
            key="ak_write_only",
        )
        blind = invoke(
            [
                "run",
                str(source),
                "-o",
                str(tmp_path / "b.csv"),
                "--base-url",
                sandbox.base_url,
                "--blind",
                "--json",
            ],
            key="ak_write_only",
        )
        counters = sandbox.state()["counters"]
    assert refused.exit_code == 3
    assert "lacks the CONVERSATIONS_READ scope" in refused.stderr
    assert "--blind" in refused.stderr
    assert blind.exit_code == 0
    assert summary_json(blind.stdout)["by_status"] == {"updated": 20}
    assert counters.get("batch", 0) == 0
    assert not before_dir(tmp_path / "b.csv").exists()


def test_a_dry_run_with_a_key_counts_what_would_change(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """run --dry-run reads the targets and says how many rows would change; writes nothing."""
    source = tmp_path / "fixes.csv"
    frame = corrections(source, 50)
    world, _ = world_with_half_right(frame)
    with sandbox_factory(world, api_key=KEY) as sandbox:
        result = invoke(
            [
                "run",
                str(source),
                "-o",
                str(tmp_path / "plan.csv"),
                "--base-url",
                sandbox.base_url,
                "--dry-run",
                "--json",
            ]
        )
        counters = sandbox.state()["counters"]
    summary = summary_json(result.stdout)
    assert summary["changes"] == {"changed": 25, "unchanged": 25}
    assert counters.get("patch", 0) == 0
    assert summary["by_status"] == {"not_sent": 50}
    assert result.exit_code == 0


def test_rows_naming_a_template_are_written_with_an_uncertain_before_image(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A read shows one summary per call: for a row naming a template it cannot be tied to
    that template, so the row is written even when the read matches, and its image is uncertain."""
    world = build_world()
    world.add_call("cll-two", ["MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"])
    world.calls["cll-two"]["MARKDOWN_CLASSIC"].content = "same text"
    world.add_key(ApiKey(key=KEY, write_per_second=50))
    source = tmp_path / "two.csv"
    pl.DataFrame(
        {"call_id": ["cll-two"], "template_key": ["MARKDOWN_CLASSIC"], "content": ["same text"]}
    ).write_csv(source)
    output = tmp_path / "out.csv"
    with sandbox_factory(world, api_key=KEY) as sandbox:
        result = invoke(["run", str(source), "-o", str(output), "--base-url", sandbox.base_url])
        assert sandbox.state()["counters"]["patch"] == 1
    assert result.exit_code == 0
    assert read_before_images(output)["certain"].to_list() == [False]


@pytest.mark.parametrize("persona", PERSONA_NAMES)
@pytest.mark.parametrize("expects", ["the summary the read shows", "the target's own"])
def test_an_expectation_on_a_template_a_read_cannot_show_is_never_taken_as_met(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str, expects: str
) -> None:
    """A read shows one summary of a two-template call, whichever each persona shows. A row
    naming the other template with expected_sha256 was checked against the summary shown: an
    expectation that did not hold let the write through (a lost update), and one that held
    was refused. Neither can be known: the row is a conflict (reason uncertain), not written."""
    world = build_world()
    world.add_call("cll-two", ["MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"])
    for template in ("MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"):
        world.calls["cll-two"][template].content = f"{template} text"
    world.add_key(ApiKey(key=KEY, write_per_second=50))
    expected = {"the summary the read shows": "MARKDOWN_CLASSIC text"}.get(
        expects, "MARKDOWN_SHORT_CALL text"
    )
    source = tmp_path / "cas.csv"
    pl.DataFrame(
        {
            "call_id": ["cll-two"],
            "template_key": ["MARKDOWN_SHORT_CALL"],
            "content": ["new"],
            "expected_sha256": [sha(expected)],
        }
    ).write_csv(source)
    output = tmp_path / "out.csv"
    with sandbox_factory(world, api_key=KEY, persona=persona) as sandbox:
        result = invoke(["run", str(source), "-o", str(output), "--base-url", sandbox.base_url])
        patches = sandbox.state()["counters"].get("patch", 0)
    assert patches == 0
    assert result.exit_code == 1, result.output
    row = read_results(output).row(0, named=True)
    assert (row["status"], row["reason"]) == ("conflict", "uncertain")
    assert "expected_sha256 cannot be checked" in row["message"]


@pytest.mark.parametrize("order", ["input", "shuffled"])
@pytest.mark.parametrize("missing", ["omit", "error"])
def test_reads_are_matched_by_id_whatever_the_api_does(
    sandbox_factory: SandboxFactory, order: BatchOrder, missing: BatchMissing
) -> None:
    """Any order, duplicates, unknown ids left out or refusing the whole batch: each call gets
    what it holds, unknown ones are not_found, and a refused batch costs only a few reads."""
    from allo_batch.client import AlloClient
    from allo_batch.config import Secret

    world = build_world(
        seed_pairs=[(f"cll-{i}", None) for i in range(150)],
        api_key=SANDBOX_KEY,
        write_rate=1000,
        read_rate=1000,
    )
    for i in range(150):
        next(iter(world.calls[f"cll-{i}"].values())).content = f"text {i}"
    behaviour = dataclasses.replace(
        PERSONAS["documented"],
        batch_order=order,
        batch_missing=missing,
    )
    ids = [f"cll-{i}" for i in range(150)] + ["cll-nope", "cll-3"]
    with sandbox_factory(world, api_key=SANDBOX_KEY, persona=behaviour) as sandbox:

        async def go() -> dict[str, Current]:
            import httpx

            async with httpx.AsyncClient() as http:
                client = AlloClient(http, sandbox.base_url, Secret(SANDBOX_KEY))
                return await read_current(client.read_items, ids)

        found = anyio.run(go)
        batches = sandbox.state()["counters"]["batch"]
    assert found["cll-nope"] == Current("not_found")
    assert all(found[f"cll-{i}"] == Current("summary", f"text {i}") for i in range(150))
    assert batches <= (2 if missing == "omit" else 2 + 2 * 7)


def test_before_images_are_on_disk_before_their_rows_are_sent(tmp_path: Path) -> None:
    """The order the pipeline relies on: the look stage keeps a chunk's images, then releases
    its rows; a row is never handed on before its image was written."""
    from allo_batch.look import CallFacts, Looked, Looker
    from allo_batch.models import PlannedRequest

    events: list[str] = []

    async def read(ids: Any) -> Any:
        class Answer:
            kind = "ok"
            http_status = 200
            error_code = None
            items = tuple({"id": i, "summary": "old"} for i in ids)

        return Answer()

    def keep(items: list[Looked]) -> None:
        events.extend(f"kept {i.request.row}" for i in items)

    looker = Looker(read, CallFacts(set(), set()), settle=lambda r: None, keep=keep)
    chunk = [PlannedRequest(i, f"cll-{i}", None, sha(f"new {i}"), b"{}") for i in range(3)]

    async def go() -> None:
        for request in await looker.look_at(chunk):
            events.append(f"sent {request.row}")

    anyio.run(go)
    assert events == ["kept 0", "kept 1", "kept 2", "sent 0", "sent 1", "sent 2"]
    assert os.getpid()  # (the durable write itself is covered by the kill -9 test)


@pytest.mark.parametrize(("persona", "lagging"), [("documented", False), ("awkward", True)])
def test_verify_reads_landed_targets_back_and_resends_nothing(
    sandbox_factory: SandboxFactory, tmp_path: Path, persona: str, lagging: bool
) -> None:
    """--verify reads every written target back: none differ when reads are current; when
    reads lag (the awkward persona, its 1.5 s made 60 s so that no machine is slow enough to
    read after the lag) every written row is listed, and nothing is sent again."""
    source = tmp_path / "fixes.csv"
    frame = corrections(source, 30)
    world, _ = world_with_half_right(frame)
    output = tmp_path / "out.csv"
    behaviour = dataclasses.replace(PERSONAS[persona], read_lag=60.0) if lagging else persona
    with sandbox_factory(world, api_key=KEY, persona=behaviour) as sandbox:
        result = invoke(
            [
                "run",
                str(source),
                "-o",
                str(output),
                "--base-url",
                sandbox.base_url,
                "--verify",
                "--json",
            ]
        )
        patches = sandbox.state()["counters"]["patch"]
    summary = summary_json(result.stdout)
    assert result.exit_code == 0, result.output
    assert patches == 15
    assert summary["verified"] == 15
    sidecar = json.loads(output.with_name("out.csv.run.json").read_text())
    if lagging:
        assert summary["verify_differs"] == 15
        assert "--verify:" in result.stderr
        assert {r["call_id"] for r in sidecar["verify"]["rows"]} == set(frame["call_id"][1::2])
    else:
        assert summary["verify_differs"] == 0
    # report of the result file gives the run's figures back, those of reading included
    reported = json.loads(invoke(["report", str(output), "--json"]).stdout)
    for name in ("verified", "verify_differs", "reads", "changes", "auth_form", "requests"):
        assert reported[name] == summary[name], name
