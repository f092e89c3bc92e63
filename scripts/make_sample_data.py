"""Regenerate sample_data/: realistic corrections with every kind of bad row, and their world.

Deterministic (fixed seed): ``python scripts/make_sample_data.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl

OUT = Path(__file__).resolve().parent.parent / "sample_data"
rng = random.Random(20261124)

NAMES = ["Alex Kim", "Maya Patel", "Jonas Berg", "Chloé Martin", "Sam Okafor", "Lena Fischer"]
COMPANIES = ["Acme Sales", "Northwind", "Globex", "Initech", "Umbrella Health", "Soylent Foods"]
TOPICS = [
    ("renewal", "the annual contract renewal", "send the revised quote by Friday"),
    ("billing", "a duplicate charge on the March invoice", "issue a refund of the second charge"),
    ("onboarding", "onboarding for 12 new seats", "schedule the kickoff call"),
    ("support", "calls dropping after 30 seconds", "escalate to tier 2 with the call logs"),
    ("demo", "a product demo for the CRM integration", "share the recording and pricing"),
]


def classic(call: int) -> str:
    name, company = rng.choice(NAMES), rng.choice(COMPANIES)
    _, topic, step = rng.choice(TOPICS)
    return (
        f"# Call with {name} ({company})\n\n"
        f'## Summary\n{name} called about {topic}. The customer said: "we need this, '
        f'ideally before month-end", and asked for a written follow-up.\n\n'
        f"## Key points\n- Account: {company}, ref #{call:05d}\n- Sentiment: "
        f"{rng.choice(['positive', 'neutral', 'frustrated'])}\n"
        "- Budget, timeline, owner: confirmed\n\n"
        f"## Next steps\n1. {step.capitalize()}\n2. Update the CRM record\n\n"
        f"_Corrected by a reviewer: names and figures checked._\n"
    )


def short(call: int) -> str:
    name = rng.choice(NAMES)
    return f"Short call: {name} confirmed the meeting, call #{call:05d}; no action needed."


def main() -> None:
    rows: list[dict[str, str | None]] = []
    calls: list[dict[str, object]] = []
    for i in range(1, 281):
        call_id = f"cll-{i:06d}"
        kind = i % 7
        if kind == 0:  # two completed templates: the row names which one
            calls.append({"id": call_id, "templates": ["MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"]})
            rows.append(
                {"call_id": call_id, "template_key": "MARKDOWN_SHORT_CALL", "content": short(i)}
            )
        elif kind == 3:
            calls.append({"id": call_id, "templates": ["MARKDOWN_SHORT_CALL"]})
            rows.append({"call_id": call_id, "template_key": None, "content": short(i)})
        else:
            calls.append({"id": call_id, "templates": ["MARKDOWN_CLASSIC"]})
            template = "MARKDOWN_CLASSIC" if i % 2 else None
            rows.append({"call_id": call_id, "template_key": template, "content": classic(i)})
    # Calls the API will refuse although the rows look fine locally.
    calls.append({"id": "cll-900001", "templates": ["MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"]})
    calls.append({"id": "cll-900002", "templates": ["MARKDOWN_CLASSIC"]})
    calls.append({"id": "cll-900003", "templates": []})
    bad: list[dict[str, str | None]] = [
        {"call_id": "msg-000042", "template_key": None, "content": "An SMS, not a call."},
        {"call_id": None, "template_key": None, "content": classic(9001)},
        {"call_id": "cll-000500", "template_key": None, "content": "   "},
        {"call_id": "cll-000501", "template_key": None, "content": None},
        {"call_id": "cll-000502", "template_key": None, "content": "x" * 100_001},
        {"call_id": "cll-000503", "template_key": "MARKDOWN_FANCY", "content": classic(503)},
        {"call_id": "cll-000011", "template_key": "MARKDOWN_CLASSIC", "content": classic(11)},
        {"call_id": "cll-000020", "template_key": None, "content": rows[19]["content"]},
        {"call_id": "cll-900001", "template_key": None, "content": classic(900001)},
        {"call_id": "cll-900002", "template_key": "MARKDOWN_SHORT_CALL", "content": short(900002)},
        {"call_id": "cll-900003", "template_key": None, "content": classic(900003)},
        {"call_id": "cll-999999", "template_key": None, "content": classic(999999)},
    ]
    for offset, row in enumerate(bad):
        rows.insert(25 * (offset + 1), row)
    frame = pl.DataFrame(
        rows, schema={"call_id": pl.String, "template_key": pl.String, "content": pl.String}
    )
    OUT.mkdir(exist_ok=True)
    frame.write_csv(OUT / "corrections.csv")
    frame.write_parquet(OUT / "corrections.parquet")
    world = {"calls": calls, "sms": ["msg-000042"]}
    (OUT / "world.json").write_text(json.dumps(world, indent=1) + "\n")
    print(f"{frame.height} rows written to {OUT}")


if __name__ == "__main__":
    main()
