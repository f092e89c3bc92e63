"""``report --html``: one self-contained HTML page about a run, to read or to attach to a ticket.

Everything is inline: the CSS, and SVG plots drawn here from the sidecar's per-second timeline
(:class:`~allo_batch.send.Timeline`). The page loads nothing (its Content-Security-Policy
forbids it), runs no script, and needs no network: it opens the same on a laptop on a train
and in a mail client that strips scripts. It stays small whatever the run's size: counts and
the timeline are aggregates, and at most :data:`MAX_TABLE_ROWS` rows are listed. The result
file holds no summary content, so the page cannot either. Every string that comes from a file
(call ids, codes, messages, paths) goes through :func:`html.escape`.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from allo_batch.failed import ResultFacts, record_note, where
from allo_batch.models import STATUSES

#: Rows of the "need a human" table; the rest are counted, not listed.
MAX_TABLE_ROWS: Final = 200
_RATE_BINS: Final = 1000  # at most this many steps in the rate plot (about one per pixel)
_ERROR_BARS: Final = 120  # at most this many bars in the errors plot
_TOP_CODES: Final = 6  # codes with their own colour in the errors plot; the rest are "other"
_MESSAGE_CHARS: Final = 400
_ID_CHARS: Final = 32

# Plot geometry, in SVG user units (the SVG scales to the page's width).
_W: Final = 1000
_H: Final = 250
_LEFT: Final = 62
_RIGHT: Final = 18
_TOP: Final = 14
_BOTTOM: Final = 36

_STATUS_COLOURS: Final = {
    "updated": "#2f9e44",
    "unchanged": "#66a80f",
    "skipped": "#74b816",
    "conflict": "#ae3ec9",
    "invalid": "#f08c00",
    "failed": "#e03131",
    "not_sent": "#868e96",
}
_PALETTE: Final = ("#e8590c", "#7048e8", "#0c8599", "#d6336c", "#5c940d", "#1971c2")
_OTHER: Final = "#adb5bd"
_RATE_LIMITED: Final = "#c92a2a"
_REQUESTS: Final = "#1c7ed6"
_LIMIT: Final = "#212529"
_PERCENTILES: Final = (("p50", "#1c7ed6"), ("p95", "#f08c00"), ("p99", "#c92a2a"))


def render(facts: ResultFacts, lines: Mapping[int, int], *, generated: str) -> str:
    """The whole page for ``facts`` (``lines``: input line numbers by row, when known)."""
    run = facts.sidecar.get("summary")
    run = run if isinstance(run, dict) else {}
    body = [
        _header(facts, run, generated),
        _counts(facts),
        _codes(facts),
        _plots(facts, run),
        _needs_table(facts, lines),
        _footer(facts, generated),
    ]
    return _PAGE.format(title=_e(f"allo-batch report: {facts.path.name}"), body="\n".join(body))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


# -- the page's parts -----------------------------------------------------------------------------


def _header(facts: ResultFacts, run: Mapping[str, Any], generated: str) -> str:
    kind = "Dry run" if run.get("dry_run") else "Run"
    items = [f"<li><b>{facts.rows:,}</b> rows</li>"]
    items.extend(f"<li>{text}</li>" for text in _run_facts(run))
    source = facts.input_path
    where_from = f" of <span class='mono'>{_e(source)}</span>" if source else ""
    return (
        f"<header><h1>{kind} report: <span class='mono'>{_e(facts.path.name)}</span></h1>"
        f"<p class='sub'>Result file <span class='mono'>{_e(facts.path)}</span>{where_from}. "
        f"Generated {_e(generated)}.</p>"
        f"<ul class='facts'>{''.join(items)}</ul></header>"
    )


def _run_facts(run: Mapping[str, Any]) -> Iterable[str]:
    """The run's figures from the sidecar, each already escaped HTML."""
    requests = _number(run.get("requests"))
    if requests is not None:
        yield f"<b>{requests:,.0f}</b> requests"
    rate, limit = _number(run.get("achieved_rate")), _number(run.get("rate_limit"))
    if rate is not None:
        of = f" of a {limit:g}/s limit" if limit else ""
        yield f"<b>{rate:.2f}</b>/s{of}"
    limited = _number(run.get("rate_limited"))
    if limited is not None and requests:
        yield f"<b>{limited:,.0f}</b> rate-limited (429)"
    p50, p95 = _number(run.get("latency_p50_ms")), _number(run.get("latency_p95_ms"))
    if p50 is not None:
        yield f"latency p50 <b>{p50:.0f}</b> ms" + (f", p95 <b>{p95:.0f}</b> ms" if p95 else "")
    elapsed = _number(run.get("elapsed_seconds"))
    if elapsed is not None:
        yield f"took <b>{_e(_duration(elapsed))}</b>"
    if isinstance(run.get("exit_code"), int):
        yield f"exit code <b>{run['exit_code']}</b>"
    if run.get("stopped_reason"):
        yield f"<span class='warn'>stopped: {_e(run['stopped_reason'])}</span>"


def _counts(facts: ResultFacts) -> str:
    shown: list[str] = [s for s in STATUSES if facts.by_status.get(s)]
    shown += sorted(s for s in facts.by_status if s not in STATUSES)
    total = max(facts.rows, 1)
    cards, segments = [], []
    for status in shown:
        count, colour = facts.by_status[status], _STATUS_COLOURS.get(status, _OTHER)
        share = 100 * count / total
        cards.append(
            f"<div class='card' style='--c:{colour}'><div class='n'>{count:,}</div>"
            f"<div class='l'>{_e(status)} · {_percent(share)}</div></div>"
        )
        segments.append(
            f"<span style='width:{share:.3f}%;background:{colour}' "
            f"title='{_e(status)}: {count:,}'></span>"
        )
    if not shown:
        return "<section><h2>Rows by status</h2><p class='note'>No rows.</p></section>"
    return (
        "<section><h2>Rows by status</h2>"
        f"<div class='cards'>{''.join(cards)}</div>"
        f"<div class='bar' aria-hidden='true'>{''.join(segments)}</div></section>"
    )


def _codes(facts: ResultFacts) -> str:
    head = "<section><h2>Rows by error code</h2>"
    if not facts.codes:
        return head + "<p class='note'>No row has an error code.</p></section>"
    widest = max(c.rows for c in facts.codes)
    rows = []
    for code in facts.codes:
        colour = _STATUS_COLOURS.get(code.statuses[0], _OTHER) if code.statuses else _OTHER
        rows.append(
            f"<tr><td class='mono'>{_e(code.code)}</td>"
            f"<td>{_e(', '.join(code.statuses))}</td><td class='num'>{code.rows:,}</td>"
            f"<td class='meter-cell'><div class='meter' style='--c:{colour};"
            f"width:{100 * code.rows / widest:.1f}%'></div></td></tr>"
        )
    return (
        head + "<table class='codes'><thead><tr><th>Code</th><th>Status</th>"
        "<th class='num'>Rows</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _plots(facts: ResultFacts, run: Mapping[str, Any]) -> str:
    head = "<section><h2>Over time</h2>"
    timeline = _timeline(facts.sidecar.get("timeline"))
    if run.get("dry_run"):
        return head + "<p class='note'>A dry run: no requests were sent.</p></section>"
    if timeline is None or not timeline.buckets:
        return head + f"<p class='note'>{_e(_no_timeline(facts, run, timeline))}</p></section>"
    limit = _number(run.get("rate_limit"))
    return (
        head
        + _rate_plot(timeline, limit)
        + _latency_plot(timeline)
        + _errors_plot(timeline)
        + "</section>"
    )


def _no_timeline(facts: ResultFacts, run: Mapping[str, Any], timeline: _Timeline | None) -> str:
    if not facts.sidecar:
        return (
            f"No sidecar ({facts.path.name}.run.json) beside the result file, so there are no "
            "figures over time; the counts above come from the result file itself."
        )
    if timeline is not None or not run.get("requests"):
        return "No requests were sent in this run."
    return (
        "This run's sidecar has no timeline (it was written by an allo-batch older than the "
        "timeline), so there are no plots; the counts above come from the result file."
    )


def _needs_table(facts: ResultFacts, lines: Mapping[int, int]) -> str:
    total = facts.needs.height
    head = "<section><h2>Rows that need a human</h2>"
    if not total:
        return head + "<p class='note'>None: no row is invalid or failed.</p></section>"
    rows = facts.needs.head(MAX_TABLE_ROWS).to_dicts()
    body = "".join(_needs_row(row, lines) for row in rows)
    more = total - len(rows)
    after = f"<p class='sub'>… and <b>{more:,}</b> more, not listed here.</p>" if more else ""
    name = _e(facts.path.name)
    note = record_note(facts, lines, len(rows))
    where_note = f" {_e(note[0].upper() + note[1:])}." if note else ""
    return (
        f"{head}<p class='sub'>Invalid or failed rows come back the same on every rerun until "
        f"the input is fixed. <span class='mono'>allo-batch report {name} --failed --show 0</span>"
        f" lists all {total:,}; <span class='mono'>allo-batch report {name} --export-failed "
        f"fixes.csv --input INPUT</span> writes them, every column, as a file to correct and run."
        f"{where_note}</p>"
        "<table class='needs'><thead><tr><th class='num'>Row</th><th>Where</th><th>Call id</th>"
        "<th>Template</th><th>Status</th><th>Code</th><th>Message</th>"
        f"</tr></thead><tbody>{body}</tbody></table>{after}</section>"
    )


def _needs_row(row: Mapping[str, Any], lines: Mapping[int, int]) -> str:
    status = str(row["status"])
    colour = _STATUS_COLOURS.get(status, _OTHER)
    retry = " <span class='sub'>(retryable)</span>" if row["retryable"] else ""
    message = str(row["message"] or "")
    if len(message) > _MESSAGE_CHARS:
        message = message[:_MESSAGE_CHARS] + "…"
    return (
        f"<tr><td class='num'>{row['row']}</td><td class='nowrap'>{_e(where(row['row'], lines))}"
        f"</td>{_id_cell(row['call_id'])}{_id_cell(row['template_key'])}"
        f"<td class='nowrap'><span class='dot' style='--c:{colour}'></span>{_e(status)}{retry}</td>"
        f"{_code_cell(row['error_code'], row['http_status'])}"
        f"<td class='msg'>{_e(message)}</td></tr>"
    )


def _id_cell(value: object) -> str:
    """An identifier on one line, cut to :data:`_ID_CHARS` (the whole of it in the tooltip):
    a long one from a hostile file must not squeeze the table."""
    text = _text(value)
    shown = text if len(text) <= _ID_CHARS else text[: _ID_CHARS - 1] + "…"
    return f"<td class='mono nowrap' title='{_e(text)}'>{_e(shown)}</td>"


def _code_cell(code: object, http_status: object) -> str:
    """The error code, and the HTTP status of the API's answer when there was one."""
    cell = _id_cell(code)
    if http_status is None:
        return cell
    return cell.replace("</td>", f"<div class='sub'>HTTP {_e(http_status)}</div></td>")


def _footer(facts: ResultFacts, generated: str) -> str:
    return (
        f"<footer>Made by <span class='mono'>allo-batch report --html</span> from "
        f"<span class='mono'>{_e(facts.path.name)}</span> at {_e(generated)}. This page loads "
        "nothing from the network, runs no script and holds no summary content.</footer>"
    )


# -- the timeline ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bucket:
    t: float
    requests: int
    rate_limited: int
    errors: dict[str, int]
    latency: tuple[float | None, ...]


@dataclass(frozen=True, slots=True)
class _Timeline:
    width: float
    buckets: list[_Bucket]

    @property
    def span(self) -> float:
        """Seconds from the first answer to the end of the last bucket."""
        return max(b.t for b in self.buckets) + self.width


def _timeline(raw: object) -> _Timeline | None:
    """The sidecar's ``timeline``, checked (the sidecar is a file anyone could have edited)."""
    if not isinstance(raw, dict):
        return None
    width = _number(raw.get("bucket_seconds"))
    buckets = raw.get("buckets")
    if not width or width <= 0 or not isinstance(buckets, list):
        return None
    parsed = [b for b in (_bucket(item) for item in buckets) if b is not None]
    return _Timeline(float(width), sorted(parsed, key=lambda b: b.t))


def _bucket(item: object) -> _Bucket | None:
    if not isinstance(item, dict):
        return None
    t = _number(item.get("t"))
    if t is None or t < 0:
        return None
    errors = item.get("errors")
    errors = errors if isinstance(errors, dict) else {}
    latency = item.get("latency_ms")
    latency = latency if isinstance(latency, list) else []
    return _Bucket(
        t=t,
        requests=int(_number(item.get("requests")) or 0),
        rate_limited=int(_number(item.get("rate_limited")) or 0),
        errors={str(k): int(n) for k, v in errors.items() if (n := _number(v))},
        latency=tuple(_number(v) for v in [*latency, None, None, None][:3]),
    )


@dataclass(slots=True)
class _Bin:
    seconds: float  # the last bin may cover fewer buckets than the others
    requests: int = 0
    rate_limited: int = 0
    errors: Counter[str] = field(default_factory=Counter)


def _binned(timeline: _Timeline, most: int) -> tuple[float, list[_Bin]]:
    """Buckets summed into at most ``most`` bins of equal width (seconds without an answer
    count as zero), and that width."""
    count = math.floor(timeline.span / timeline.width + 1e-9)
    per_bin = max(1, math.ceil(count / most))
    width = timeline.width * per_bin
    bins = [
        _Bin(seconds=timeline.width * min(per_bin, count - start))
        for start in range(0, count, per_bin)
    ]
    for bucket in timeline.buckets:
        into = bins[min(int(bucket.t / width + 1e-9), len(bins) - 1)]
        into.requests += bucket.requests
        into.rate_limited += bucket.rate_limited
        into.errors.update(bucket.errors)
    return width, bins


# -- plots ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Axes:
    """Maps seconds and values to the plot area; ``log`` makes the value axis log10."""

    span: float
    top: float
    bottom: float = 0.0
    log: bool = False

    def x(self, seconds: float) -> float:
        return _LEFT + (_W - _LEFT - _RIGHT) * min(seconds, self.span) / self.span

    def y(self, value: float) -> float:
        if self.log:
            value = math.log10(max(value, 10**self.bottom))
        share = (value - self.bottom) / (self.top - self.bottom)
        return _H - _BOTTOM - (_H - _TOP - _BOTTOM) * min(max(share, 0.0), 1.0)


def _svg(label: str, axes: _Axes, y_ticks: Sequence[tuple[float, str]], marks: str) -> str:
    """An SVG plot: grid, value ticks, time ticks, then the ``marks`` drawn on top."""
    parts = [f"<svg class='plot' viewBox='0 0 {_W} {_H}' role='img' aria-label='{_e(label)}'>"]
    for value, text in y_ticks:
        y = axes.y(value)
        parts.append(
            f"<line class='grid' x1='{_LEFT}' x2='{_W - _RIGHT}' y1='{y:.1f}' y2='{y:.1f}'/>"
            f"<text x='{_LEFT - 8}' y='{y + 4:.1f}' text-anchor='end'>{_e(text)}</text>"
        )
    base = _H - _BOTTOM
    for seconds, text in _time_ticks(axes.span):
        x = axes.x(seconds)
        parts.append(
            f"<line class='tick' x1='{x:.1f}' x2='{x:.1f}' y1='{base}' y2='{base + 5}'/>"
            f"<text x='{x:.1f}' y='{base + 19}' text-anchor='middle'>{_e(text)}</text>"
        )
    parts.append(f"<line class='axis' x1='{_LEFT}' x2='{_W - _RIGHT}' y1='{base}' y2='{base}'/>")
    parts.append(marks)
    parts.append("</svg>")
    return "".join(parts)


def _figure(title: str, caption: str, legend: Sequence[tuple[str, str, str]], svg: str) -> str:
    """A plot with its title, a one-line explanation and an HTML legend of (label, colour,
    kind) where kind is ``box``, ``line`` or ``dash``."""
    keys = "".join(
        f"<li><span class='sw {kind}' style='--c:{colour}'></span>{_e(name)}</li>"
        for name, colour, kind in legend
    )
    return (
        f"<figure><figcaption>{_e(title)} <span class='sub'>{_e(caption)}</span></figcaption>"
        f"<ul class='legend'>{keys}</ul>{svg}</figure>"
    )


def _rate_plot(timeline: _Timeline, limit: float | None) -> str:
    width, bins = _binned(timeline, _RATE_BINS)
    rates = [b.requests / b.seconds for b in bins]
    limited = [b.rate_limited / b.seconds for b in bins]
    top, ticks = _value_ticks(max([*rates, (limit or 0) * 1.08, 1.0]))
    axes = _Axes(span=width * len(bins), top=top)
    marks = [_step_area(axes, rates, width, _REQUESTS)]
    legend = [("requests answered per second", _REQUESTS, "box")]
    if any(limited):
        marks.append(_step_line(axes, limited, width, _RATE_LIMITED))
        legend.append(("429 answers per second", _RATE_LIMITED, "line"))
    if limit:
        y = axes.y(limit)
        marks.append(
            f"<line class='limit' x1='{_LEFT}' x2='{_W - _RIGHT}' y1='{y:.1f}' y2='{y:.1f}' "
            f"stroke='{_LIMIT}'/><text class='label' x='{_W - _RIGHT - 4}' y='{y - 6:.1f}' "
            f"text-anchor='end'>limit {limit:g}/s</text>"
        )
        legend.append((f"the key's write limit, {limit:g}/s", _LIMIT, "dash"))
    caption = (
        "requests answered in each second"
        if width == 1
        else f"requests answered per second, averaged over each {_seconds(width)}"
    ) + ("" if any(limited) else "; no 429 answers")
    if len(bins) > 1:
        caption += "; the last step ends with the run, so it may be partial"
    svg = _svg(
        "requests per second over time, against the key's limit", axes, ticks, "".join(marks)
    )
    return _figure("Writes per second", caption, legend, svg)


def _latency_plot(timeline: _Timeline) -> str:
    values = [v for b in timeline.buckets for v in b.latency if v is not None and v > 0]
    if not values:
        return _figure("Latency", "no answer carried a latency", [], _empty_svg(timeline.span))
    low, high = min(values), max(values)
    log = high / max(low, 0.1) > 50
    if log:
        bottom, top = math.floor(math.log10(max(low, 0.1))), math.ceil(math.log10(high))
        top = max(top, bottom + 1)
        axes = _Axes(span=timeline.span, top=top, bottom=bottom, log=True)
        ticks = [(10.0**p, _millis(10.0**p)) for p in range(bottom, top + 1)]
    else:
        top_value, value_ticks = _value_ticks(high * 1.05)
        axes = _Axes(span=timeline.span, top=top_value)
        ticks = [(v, f"{text} ms") for v, text in value_ticks]
    # p99 dashed on top: with under 20 answers in a bucket p95 and p99 are both the slowest
    # answer, and both lines must stay visible where they coincide.
    marks = "".join(
        _polyline(axes, timeline, i, colour, dashed=name == "p99")
        for i, (name, colour) in enumerate(_PERCENTILES)
    )
    legend = [(name, colour, "dash" if name == "p99" else "line") for name, colour in _PERCENTILES]
    caption = f"of the answers in each {_seconds(timeline.width)}" + (", log scale" if log else "")
    svg = _svg("latency percentiles over time", axes, ticks, marks)
    return _figure("Latency", caption, legend, svg)


def _errors_plot(timeline: _Timeline) -> str:
    width, bins = _binned(timeline, _ERROR_BARS)
    totals: Counter[str] = Counter()
    for b in bins:
        totals.update(b.errors)
    named = [code for code, _n in totals.most_common(_TOP_CODES)]
    series = [("429 rate limited", _RATE_LIMITED)] if any(b.rate_limited for b in bins) else []
    series += list(zip(named, _PALETTE, strict=False))
    if len(totals) > len(named):
        series.append(("other codes", _OTHER))
    stacks = [_stack(b, named) for b in bins]
    highest = max((sum(s) for s in stacks), default=0)
    axes = _Axes(span=width * len(bins), top=1.0)
    caption = f"error answers per {_seconds(width)}, by code (every attempt counts)"
    if not highest:
        svg = _empty_svg(axes.span, "no error answers and no 429s")
        return _figure("Errors over time", caption, [], svg)
    top, ticks = _value_ticks(highest)
    axes = _Axes(span=axes.span, top=top)
    marks = "".join(
        _bars(axes, i * width, width, stack, series) for i, stack in enumerate(stacks) if any(stack)
    )
    legend = [(name, colour, "box") for name, colour in series]
    svg = _svg("error answers over time, stacked by code", axes, ticks, marks)
    return _figure("Errors over time", caption, legend, svg)


def _stack(b: _Bin, named: list[str]) -> list[int]:
    """A bin's counts in series order: 429s (if any anywhere), each named code, the rest."""
    counts = [b.rate_limited] + [b.errors.get(code, 0) for code in named]
    counts.append(sum(b.errors.values()) - sum(counts[1:]))
    return counts


def _bars(
    axes: _Axes, start: float, width: float, stack: list[int], series: list[tuple[str, str]]
) -> str:
    has_429 = bool(series) and series[0][0].startswith("429")
    counts = stack if has_429 else stack[1:]
    left, right = axes.x(start), axes.x(start + width)
    gap = 1.0 if right - left > 3 else 0.0
    parts, below = [], 0
    for (name, colour), count in zip(series, counts, strict=False):
        if not count:
            continue
        y_top, y_base = axes.y(below + count), axes.y(below)
        parts.append(
            f"<rect x='{left:.1f}' y='{y_top:.1f}' width='{max(right - left - gap, 0.5):.1f}' "
            f"height='{y_base - y_top:.1f}' fill='{colour}'><title>{_e(name)}: {count:,} "
            f"({_e(_clock(start))}–{_e(_clock(start + width))})</title></rect>"
        )
        below += count
    return "".join(parts)


def _step_points(axes: _Axes, values: Sequence[float], width: float) -> str:
    points = []
    for i, value in enumerate(values):
        y = axes.y(value)
        points.append(f"{axes.x(i * width):.1f},{y:.1f} {axes.x((i + 1) * width):.1f},{y:.1f}")
    return " ".join(points)


def _step_area(axes: _Axes, values: Sequence[float], width: float, colour: str) -> str:
    base = axes.y(0)
    line = _step_points(axes, values, width)
    start, end = axes.x(0), axes.x(len(values) * width)
    return (
        f"<polygon points='{start:.1f},{base:.1f} {line} {end:.1f},{base:.1f}' fill='{colour}' "
        f"fill-opacity='0.18' stroke='none'/>"
        f"<polyline points='{line}' fill='none' stroke='{colour}' stroke-width='1.6'/>"
    )


def _step_line(axes: _Axes, values: Sequence[float], width: float, colour: str) -> str:
    line = _step_points(axes, values, width)
    return f"<polyline points='{line}' fill='none' stroke='{colour}' stroke-width='1.6'/>"


def _polyline(axes: _Axes, timeline: _Timeline, which: int, colour: str, *, dashed: bool) -> str:
    """One percentile as lines through bucket middles, broken where no answer came."""
    runs: list[list[str]] = [[]]
    previous: float | None = None
    for bucket in timeline.buckets:
        value = bucket.latency[which]
        if value is None or (previous is not None and bucket.t - previous > timeline.width * 1.5):
            runs.append([])
        if value is not None:
            middle = bucket.t + timeline.width / 2
            runs[-1].append(f"{axes.x(middle):.1f},{axes.y(value):.1f}")
            previous = bucket.t
    style = f"fill='none' stroke='{colour}' stroke-width='1.8' stroke-linejoin='round'" + (
        " stroke-dasharray='5 4'" if dashed else ""
    )
    return "".join(
        f"<polyline points='{' '.join(run)}' {style}/>"
        if len(run) > 1
        else f"<circle cx='{run[0].split(',')[0]}' cy='{run[0].split(',')[1]}' r='2' "
        f"fill='{colour}'/>"
        for run in runs
        if run
    )


def _empty_svg(span: float, text: str = "nothing to show") -> str:
    axes = _Axes(span=max(span, 1.0), top=1.0)
    middle = (_H - _BOTTOM + _TOP) / 2
    marks = (
        f"<text class='empty' x='{(_W + _LEFT - _RIGHT) / 2:.0f}' y='{middle:.0f}' "
        f"text-anchor='middle'>{_e(text)}</text>"
    )
    return _svg(text, axes, [], marks)


# -- ticks and numbers ----------------------------------------------------------------------------


def _value_ticks(highest: float) -> tuple[float, list[tuple[float, str]]]:
    """A round top above ``highest`` and 3-6 evenly spaced ticks from 0 up to it."""
    highest = max(highest, 1e-9)
    magnitude = 10 ** math.floor(math.log10(highest / 5))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if highest / (m * magnitude) <= 5)
    count = math.ceil(highest / step - 1e-9)
    return step * count, [(i * step, f"{i * step:g}") for i in range(count + 1)]


_TIME_STEPS: Final = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800)


def _time_ticks(span: float) -> list[tuple[float, str]]:
    step = next((s for s in _TIME_STEPS if span / s <= 10), None)
    if step is None:
        step = 21600 * math.ceil(span / 21600 / 10)
    return [(i * step, _clock(i * step)) for i in range(int(span / step + 1e-9) + 1)]


def _clock(seconds: float) -> str:
    """Time since the first answer: ``45s``, ``12:30`` (minutes) or ``2:05:00`` (hours)."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}:{whole % 60:02d}"
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _seconds(width: float) -> str:
    return "second" if width == 1 else f"{width:g} seconds"


def _millis(value: float) -> str:
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def _percent(share: float) -> str:
    if share == 0 or share >= 10:
        return f"{share:.0f}%"
    return f"{share:.1f}%" if share >= 0.1 else "<0.1%"


def _number(value: object) -> float | None:
    """A JSON number, or None (booleans, strings and NaN are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: object) -> str:
    return "–" if value is None or value == "" else str(value)


_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>
:root{{--ink:#1f2328;--muted:#59636e;--line:#d8dee4;--panel:#f6f8fa}}
*{{box-sizing:border-box}}
body{{margin:0;color:var(--ink);background:#fff;
font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}}
main{{max-width:1180px;margin:0 auto;padding:28px 28px 40px}}
h1{{font-size:22px;margin:0 0 4px;font-weight:650}}
h2{{font-size:16px;margin:30px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}}
.sub{{color:var(--muted)}} .warn{{color:#c92a2a}}
.mono{{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}}
.facts{{display:flex;flex-wrap:wrap;gap:4px 22px;margin:12px 0 0;padding:0;list-style:none}}
.facts b,.card .n,td.num{{font-variant-numeric:tabular-nums}}
.cards{{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px}}
.card{{border:1px solid var(--line);border-top:4px solid var(--c);border-radius:6px;
padding:8px 14px}}
.card .n{{font-size:26px;font-weight:650}} .card .l{{color:var(--muted)}}
.bar{{display:flex;height:10px;border-radius:5px;overflow:hidden;margin:14px 0 0;
background:var(--panel)}}
.bar span{{display:block;height:100%}}
table{{border-collapse:collapse;width:100%}}
th,td{{text-align:left;padding:5px 10px;border-bottom:1px solid var(--line);vertical-align:top}}
th{{font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;
letter-spacing:.03em}}
.num{{text-align:right}} .nowrap{{white-space:nowrap}}
table.codes td:first-child{{width:34%}} table.codes td:nth-child(2){{width:18%}}
table.codes td.num{{width:10%}}
.meter{{height:8px;margin-top:7px;background:var(--c);border-radius:4px;min-width:2px}}
.msg{{overflow-wrap:anywhere;min-width:320px}}
table.needs td{{font-size:13px}} table.needs .mono{{font-size:12px}}
.dot{{display:inline-block;width:8px;height:8px;border-radius:50%;background:var(--c);
margin-right:6px}}
.note{{background:var(--panel);border:1px solid var(--line);border-radius:6px;padding:12px 14px;
color:var(--muted)}}
figure{{margin:0 0 26px}}
figcaption{{font-weight:600}} figcaption .sub{{font-weight:400;margin-left:6px}}
.legend{{display:flex;flex-wrap:wrap;gap:2px 18px;margin:2px 0 4px;padding:0;list-style:none;
color:var(--muted);font-size:12.5px}}
.sw{{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;
vertical-align:-1px;background:var(--c)}}
.sw.line{{height:3px;vertical-align:3px}}
.sw.dash{{height:2px;vertical-align:4px;width:16px;
background:repeating-linear-gradient(90deg,var(--c) 0 5px,transparent 5px 8px)}}
svg.plot{{display:block;width:100%;height:auto;overflow:visible}}
svg.plot text{{font:12px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;
fill:#59636e}}
svg.plot text.label{{fill:#212529;font-weight:600}} svg.plot text.empty{{font-size:14px}}
svg.plot .grid{{stroke:#e9ecef}} svg.plot .axis,svg.plot .tick{{stroke:#adb5bd}}
svg.plot .limit{{stroke-width:1.5;stroke-dasharray:6 4}}
footer{{margin-top:34px;color:var(--muted);font-size:12.5px}}
</style></head>
<body><main>
{body}
</main></body></html>
"""
