"""``allo-batch undo``: put back what a run and its reruns replaced, where nobody changed it since.

The undo is itself a run: this module turns a result file and its before-images into a
corrections file (the before-image as ``content``, what the run wrote as ``expected_sha256``),
and the ordinary pipeline sends it, paced, journaled, resumable, with its own result file and
before-images (so an undo can be undone). The look stage leaves a target alone as ``conflict``
when it no longer holds what the run wrote (``--force`` drops that check).

Which before-image: the earliest one of the target among the runs of this output (the content
it held before the first of them changed it), unless someone else changed the target between
two of our runs (:func:`_first_images`). Rows the undo cannot restore are counted, not
sent: the run never wrote them (``unchanged``, ``failed``, ...), their before-image is uncertain
(``--include-uncertain`` includes them), or the target had no summary before (nothing to put
back: the API cannot delete a summary).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from allo_batch.errors import UsageError
from allo_batch.models import NO_TEMPLATE
from allo_batch.record import (
    before_dir,
    journal_path,
    open_private,
    read_before_images,
    read_results,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

if TYPE_CHECKING:
    import polars as pl


@dataclass(slots=True)
class UndoPlan:
    """The corrections file an undo sends, and what it leaves out."""

    input: Path
    output: Path
    restorable: int = 0
    left_out: dict[str, int] = field(default_factory=dict)
    # The output holds an earlier undo of the same result file, planned when other rows had
    # been written: its rows merge (what it restored is matched by target and content).
    merge: bool = False

    def lines(self) -> list[str]:
        """What the undo will try, for a person."""
        text = [f"undo: {self.restorable} rows to put back ({self.input.name})"]
        reasons = {
            "uncertain": "before-image uncertain (use --include-uncertain)",
            "no_before_image": "no summary before the run (nothing to put back)",
            "no_image_kept": (
                "without a before-image (found already right, --blind, or an older version)"
            ),
        }
        text += [f"  left out: {n} {reasons[r]}" for r, n in self.left_out.items() if n]
        return text


def undo_paths(results: Path, output: Path | None = None) -> tuple[Path, Path]:
    """The undo's own input (owner-only: it holds content) and result file."""
    base = results.with_name(results.name + ".undo")
    return base.with_name(base.name + ".input.parquet"), output or base.with_suffix(
        base.suffix + ".parquet"
    )


def plan_undo(
    results: Path,
    *,
    output: Path | None = None,
    include_uncertain: bool = False,
    force: bool = False,
) -> UndoPlan:
    """Write the undo's corrections file for ``results`` and say what it leaves out."""
    import polars as pl

    if not results.is_file():
        msg = f"{results}: no such result file"
        raise UsageError(msg)
    source, target = undo_paths(results, output)
    _check_own_files(results, target)
    frame = read_results(results)
    images = _first_images(read_before_images(results))
    written = _written_targets(frame)
    # A row found already right may hold our own write: one that landed in flight before a
    # kill and was read back by the rerun. Its before-image says a run of ours meant to write it.
    ours = _unchanged_targets(frame).join(images, on=["call_id", "_target"], how="inner")
    joined = pl.concat(
        [written.join(images, on=["call_id", "_target"], how="left"), ours], how="vertical"
    ).unique(subset=["call_id", "_target"], keep="first", maintain_order=True)
    plan = UndoPlan(source, target, merge=_an_earlier_undo(target, source))
    no_image = joined.filter(pl.col("found").is_null())
    no_before = joined.filter(pl.col("found").is_not_null() & (pl.col("found") != "summary"))
    with_image = joined.filter(pl.col("found") == "summary")
    uncertain = with_image.filter(~pl.col("certain"))
    chosen = with_image if include_uncertain else with_image.filter(pl.col("certain"))
    plan.left_out = {
        "no_image_kept": no_image.height,
        "no_before_image": no_before.height,
        "uncertain": 0 if include_uncertain else uncertain.height,
    }
    plan.restorable = chosen.height
    corrections = chosen.sort("row").select(
        "call_id",
        "template_key",
        pl.col("content"),
        (pl.lit(None, pl.String) if force else pl.col("written_sha256")).alias("expected_sha256"),
    )
    _write_private(corrections, source)
    return plan


def _check_own_files(results: Path, target: Path) -> None:
    """Refuse an undo result file that is one of the run's own files: the undo would replace
    the very record of what it puts back."""
    own = {results, sidecar_path(results), journal_path(results), undo_paths(results)[0]}
    where = target.resolve()
    if where in {path.resolve() for path in own} or before_dir(results).resolve() in where.parents:
        msg = (
            f"--output {target}: that is one of {results.name}'s own files; give the undo a "
            "result file of its own (default: <RESULTS>.undo.parquet)"
        )
        raise UsageError(msg)


def _an_earlier_undo(output: Path, source: Path) -> bool:
    """Whether ``output`` holds the results of an undo made from ``source`` (the same result
    file's undo input, perhaps planned when it held fewer rows)."""
    seen = read_sidecar(output).get("input")
    path = seen.get("path") if isinstance(seen, dict) else None
    return isinstance(path, str) and Path(path).resolve() == source.resolve()


def mark_undone(results: Path, undo_results: Path) -> None:
    """Say in ``results``' sidecar, before the undo sends anything, that an undo of it began:
    the rows it records as landed may not hold their content any more, so a run must not
    take them as done (:func:`allo_batch.pipeline` refuses to run into it)."""
    facts = read_sidecar(results)
    facts["undone_by"] = str(undo_results)
    write_sidecar(results, facts)


def unmark_if_nothing_sent(results: Path, undo_results: Path) -> None:
    """Take :func:`mark_undone` back when the undo sent nothing and carries nothing landed: it
    stopped before its first write (no key, a refused key, an unreachable API), so ``results``
    still says what its targets hold. A journal left means it was cut off: the mark stays."""
    import polars as pl

    if journal_path(undo_results).exists():
        return
    if undo_results.exists():
        sent = (pl.col("attempts") > 0) | pl.col("version").is_not_null()
        if read_results(undo_results).filter(sent).height:
            return
    facts = read_sidecar(results)
    facts.pop("undone_by", None)
    if facts:
        write_sidecar(results, facts)
    else:  # made by mark_undone alone
        sidecar_path(results).unlink(missing_ok=True)


def _written_targets(frame: pl.DataFrame) -> pl.DataFrame:
    """Targets the run and its reruns wrote, with the last content hash written to each."""
    import polars as pl

    carried = pl.col("version").is_not_null() | (pl.col("reason") == "landed_earlier")
    landed = (pl.col("status") == "updated") | (
        (pl.col("status") == "skipped") & carried.fill_null(False)
    )
    return _targets(frame, landed)


def _unchanged_targets(frame: pl.DataFrame) -> pl.DataFrame:
    """Targets a run found already holding their content, in :func:`_written_targets`' form."""
    import polars as pl

    return _targets(frame, pl.col("status") == "unchanged")


def _targets(frame: pl.DataFrame, which: pl.Expr) -> pl.DataFrame:
    """The last row of each target among the rows ``which`` selects, with its content hash."""
    import polars as pl

    return (
        frame.filter(which & pl.col("call_id").is_not_null())
        .with_columns(pl.col("template_key").fill_null(NO_TEMPLATE).alias("_target"))
        .unique(subset=["call_id", "_target"], keep="last", maintain_order=True)
        .select(
            "row",
            "call_id",
            "template_key",
            "_target",
            pl.col("content_sha256").alias("written_sha256"),
        )
    )


def _first_images(images: pl.DataFrame) -> pl.DataFrame:
    """Each target's before-image: what it held before the first of our runs changed it.

    That is the earliest image (runs sort in time; ``seq`` orders within one), unless a later
    run found the target holding something else that none of our earlier runs meant to write:
    then someone changed it between our runs, and what they wrote is what our later write
    replaced. Either the earlier run never wrote it (a run keeps the images of a whole chunk
    before sending it, and may stop before the end), or its write was overwritten since; in
    both cases putting the earliest image back would destroy the other person's edit.
    """
    import polars as pl

    target = ["call_id", "_target"]
    ordered = (
        images.sort("run", "seq")
        .with_columns(pl.col("template_key").fill_null(NO_TEMPLATE).alias("_target"))
        .with_columns(pl.int_range(pl.len()).over(target).alias("_at"))
    )
    # Worked out on the hashes alone: the images' contents are not copied by the joins.
    slim = ordered.select(*target, "_at", "content_sha256", "written_sha256")
    # Images that show a content one of our earlier runs meant to write to the same target.
    earlier_write = slim.select(
        *target, pl.col("written_sha256").alias("content_sha256"), pl.col("_at").alias("_by")
    )
    ours = (
        slim.join(earlier_write, on=[*target, "content_sha256"])
        .filter(pl.col("_by") < pl.col("_at"))
        .select(*target, "_at")
        .unique()
        .with_columns(pl.lit(True).alias("_ours"))
    )
    changed = pl.col("content_sha256").ne_missing(pl.col("content_sha256").shift(1).over(target))
    starts = (pl.col("_at") == 0) | (changed & pl.col("_ours").is_null())
    start = (
        slim.join(ours, on=[*target, "_at"], how="left", maintain_order="left")
        .select(starts)
        .to_series()
    )
    return (
        ordered.filter(start)
        .unique(subset=target, keep="last", maintain_order=True)
        .select("call_id", "_target", "found", "content", "certain")
    )


def _write_private(frame: pl.DataFrame, path: Path) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    fd = open_private(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as handle:
        frame.write_parquet(handle)
    os.replace(temp, path)
