"""``allo-batch validate``: the same read and checks as a run, as a report for a person."""

from __future__ import annotations

from collections import Counter, defaultdict

from allo_batch.config import JobConfig
from allo_batch.models import CODE, MESSAGE, REPEAT_OF
from allo_batch.pipeline import survey
from allo_batch.read import iter_batches, open_input
from allo_batch.validate import validate_batch


def validation_report(config: JobConfig, *, show: int = 5) -> tuple[str, int]:
    """The report text and the number of invalid rows."""
    source = open_input(config.input, config.format, config.columns)
    if not source.found:
        return f"{config.input}: empty, 0 rows", 0
    _identity, duplicates = survey(source, config.batch_size)
    rows = repeats = 0
    codes: Counter[str] = Counter()
    examples: defaultdict[str, list[str]] = defaultdict(list)
    for batch in iter_batches(source, config.batch_size):
        checked = validate_batch(batch, duplicates)
        rows += checked.height
        repeats += int(checked[REPEAT_OF].is_not_null().sum())
        for row, code, message in (
            checked.filter(checked[CODE].is_not_null()).select("row", CODE, MESSAGE).iter_rows()
        ):
            codes[code] += 1
            if len(examples[code]) < show:
                examples[code].append(f"    row {row}: {message}")
    invalid = sum(codes.values())
    lines = [
        f"{config.input}: {rows} rows, {rows - invalid} valid, {invalid} invalid"
        + (f", {repeats} exact repeats (sent once)" if repeats else "")
    ]
    for code, count in codes.most_common():
        lines.append(f"  {code}: {count}")
        lines.extend(examples[code])
    return "\n".join(lines), invalid
