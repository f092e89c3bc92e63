"""``allo-batch diff``: what a run would change, as counts, a preview file, unified diffs and a
side-by-side HTML page for a reviewer.

The preview file has one row per input row and no content (safe to attach to a ticket):
``row, call_id, template_key, change, chars_before, chars_after, similarity, certain``, where
``change`` is ``unchanged``, ``changed``, ``not_found``, ``no_summary``, ``invalid`` or
``repeat`` (the same target and content as an earlier row). The diffs and the HTML page do hold
content: they go to the terminal and to an owner-only file.
"""

from __future__ import annotations

import difflib
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from allo_batch.errors import UsageError

# Above this many characters a side, the similarity is difflib's quick upper bound: the exact
# ratio is quadratic in the worst case and a preview must stay fast.
_EXACT_RATIO_CHARS: Final = 20_000
CHANGES: Final = ("changed", "unchanged", "no_summary", "not_found", "invalid", "repeat")


def preview_schema() -> dict[str, Any]:
    """The preview file's polars schema."""
    import polars as pl

    return {
        "row": pl.Int64,
        "call_id": pl.String,
        "template_key": pl.String,
        "change": pl.String,
        "chars_before": pl.Int64,
        "chars_after": pl.Int64,
        "similarity": pl.Float64,
        "certain": pl.Boolean,
    }


def similarity(before: str | None, after: str) -> float | None:
    """How alike the two texts are, 0 to 1 (None without a before)."""
    if before is None:
        return None
    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    if max(len(before), len(after)) > _EXACT_RATIO_CHARS:
        return round(matcher.quick_ratio(), 4)
    return round(matcher.ratio(), 4)


@dataclass(frozen=True, slots=True)
class Change:
    """One changed row, kept for the diffs shown."""

    row: int
    call_id: str
    template_key: str | None
    before: str
    after: str

    @property
    def title(self) -> str:
        """How the row is named above its diff."""
        template = f" ({self.template_key})" if self.template_key else ""
        return f"row {self.row}: {self.call_id}{template}"

    def unified(self) -> list[str]:
        """The unified diff lines, before → after."""
        return list(
            difflib.unified_diff(
                self.before.splitlines(),
                self.after.splitlines(),
                fromfile=f"{self.call_id} now",
                tofile=f"{self.call_id} after the run",
                lineterm="",
            )
        )


@dataclass(slots=True)
class Preview:
    """What ``diff`` found: counts per change and the first changed rows."""

    output: str
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    shown: list[Change] = field(default_factory=list)
    reads: int = 0
    page: str | None = None  # the HTML page written, if any

    def count(self, change: str) -> None:
        """Count one row."""
        self.counts[change] = self.counts.get(change, 0) + 1
        self.rows += 1

    def summary_lines(self) -> list[str]:
        """The counts, for a person."""
        lines = [f"allo-batch diff: {self.rows} rows ({self.reads} batch reads)"]
        lines += [f"  {c:<11} {self.counts[c]}" for c in CHANGES if self.counts.get(c)]
        lines.append(f"  preview: {self.output}")
        if self.page is not None:
            lines.append(f"  page:    {self.page} (side-by-side diffs of {len(self.shown)} rows)")
        return lines


_STYLE: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1f2328}
h1{font-size:20px}h2{font-size:15px;margin:28px 0 6px}
table.diff{border-collapse:collapse;width:100%;font:12px/1.35 ui-monospace,monospace}
table.diff td{padding:1px 6px;vertical-align:top;white-space:pre-wrap;word-break:break-word}
table.diff td:nth-child(2),table.diff td:nth-child(4){width:50%}
td.diff_header{background:#f6f8fa;color:#57606a;text-align:right;width:2.5em}
th.diff_header{background:#f6f8fa;color:#57606a;text-align:left;padding:2px 6px}
.diff_add{background:#dafbe1}.diff_chg{background:#fff8c5}.diff_sub{background:#ffebe9}
.counts td{padding:2px 12px 2px 0}
"""


# difflib's navigation columns ("next change" links) and their empty column groups: a page of
# many small diffs reads better without them.
_NEXT_LINKS: Final = re.compile(
    r'<t[dh] class="diff_next"[^>]*>.*?</t[dh]>|<colgroup></colgroup>', re.DOTALL
)


# Changed rows a ``diff --html`` page shows, whatever ``--show`` prints: a page to scroll
# through, of a size a browser opens (each row keeps both texts until the page is written).
PAGE_ROWS: Final = 1000


def html_page(preview: Preview) -> str:
    """One self-contained page (no network resource) with side-by-side diffs to scroll."""
    maker = difflib.HtmlDiff(wrapcolumn=80)
    counts = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{preview.counts[c]}</td></tr>"
        for c in CHANGES
        if preview.counts.get(c)
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>allo-batch diff</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>allo-batch diff: {preview.rows} rows</h1>",
        f"<table class='counts'>{counts}</table>",
    ]
    changed = preview.counts.get("changed", 0)
    if len(preview.shown) < changed:
        parts.append(
            f"<p>The first {len(preview.shown)} of {changed} changed rows (the preview file "
            "lists them all):</p>"
        )
    for change in preview.shown:
        parts.append(f"<h2>{html.escape(change.title)}</h2>")
        table = maker.make_table(
            change.before.splitlines(), change.after.splitlines(), "now", "after the run"
        )
        parts.append(_NEXT_LINKS.sub("", table))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(preview: Preview, path: Path) -> None:
    """Write :func:`html_page` owner-only (it holds customer content), never via a link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        msg = f"{path}: cannot write the HTML page ({exc.strerror})"
        raise UsageError(msg) from None
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(html_page(preview))
    preview.page = str(path)
