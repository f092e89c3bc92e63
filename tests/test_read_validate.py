"""Reading and validation: usage errors name the file and columns; properties via Hypothesis."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from allo_batch.cli import cli
from allo_batch.constants import MAX_CONTENT_CHARS, TEMPLATE_KEYS
from allo_batch.errors import InputError
from allo_batch.models import FIELDS
from allo_batch.read import iter_batches, open_input, read_ahead
from allo_batch.validate import duplicates_in, validate_batch

# The columns of a read batch that these tests look at (a batch may carry more fields).
READ = ["row", "call_id", "template_key", "content"]


def run_cli(*args: str, key: str = "") -> Any:
    """The CLI, by default without a key: a dry run with one reads the targets from the API."""
    return CliRunner().invoke(cli, list(args), env={"ALLO_API_KEY": key}, catch_exceptions=False)


class TestUsageErrors:
    def test_missing_file_is_exit_2_naming_it(self, tmp_path: Path) -> None:
        """A missing input exits 2 and names the file."""
        result = run_cli("run", str(tmp_path / "nope.csv"), "--dry-run")
        assert result.exit_code == 2
        assert f"{tmp_path / 'nope.csv'}: no such file" in result.output

    def test_missing_column_names_file_and_columns_found(self, tmp_path: Path) -> None:
        """Without a content column: exit 2, the file, the missing column, the columns found."""
        path = tmp_path / "x.csv"
        path.write_text("call_id,summary\ncll-1,a\n")
        result = run_cli("run", str(path), "--dry-run")
        assert result.exit_code == 2
        assert (
            f"{path}: missing required column content; columns found: 'call_id', 'summary'"
            in result.output
        )

    def test_column_mapping(self, tmp_path: Path) -> None:
        """--column content=new_summary reads a differently named column."""
        path = tmp_path / "x.csv"
        path.write_text("id,new_summary,other\ncll-1,a,z\n")
        out = tmp_path / "r.csv"
        result = run_cli(
            "run",
            str(path),
            "--dry-run",
            "--column",
            "content=new_summary",
            "--column",
            "call_id=id",
            "-o",
            str(out),
        )
        assert result.exit_code == 0, result.output
        assert pl.read_csv(out)["status"].to_list() == ["not_sent"]

    @pytest.mark.parametrize(
        ("mapping", "said"),
        [
            (
                ["call_id=Conversation ID", "content=Conversation ID"],
                "column 'Conversation ID' would be read as both call_id and content",
            ),
            (["content=call_id"], "column 'call_id' would be read as both call_id and content"),
            (
                ["call_id=Conversation ID", "call_id=content"],
                "--column call_id= is given twice ('Conversation ID' and 'content')",
            ),
        ],
    )
    def test_one_column_read_as_two_fields_is_refused(
        self, tmp_path: Path, mapping: list[str], said: str
    ) -> None:
        """Mapped to one column twice, each call's id was sent as its summary (validate said
        "1 valid"); a field mapped twice kept the last mapping without a word."""
        path = tmp_path / "x.csv"
        path.write_text("Conversation ID,call_id,content\ncll-1,cll-2,a\n")
        words = [word for item in mapping for word in ("--column", item)]
        result = run_cli("validate", str(path), *words)
        assert result.exit_code == 2, result.output
        assert said in result.output

    def test_empty_file_gives_an_empty_result_and_exit_0(self, tmp_path: Path) -> None:
        """An empty input is not an error: a result file with no rows."""
        path = tmp_path / "empty.csv"
        path.write_text("")
        out = tmp_path / "r.parquet"
        result = run_cli("run", str(path), "--dry-run", "-o", str(out))
        assert result.exit_code == 0, result.output
        assert pl.read_parquet(out).height == 0

    def test_header_only_file_is_empty_too(self, tmp_path: Path) -> None:
        """A CSV with only a header has zero rows."""
        path = tmp_path / "h.csv"
        path.write_text("call_id,content\n")
        result = run_cli("run", str(path), "--dry-run", "-o", str(tmp_path / "r.csv"))
        assert result.exit_code == 0, result.output

    def test_plain_http_to_a_remote_host_is_refused(self, tmp_path: Path) -> None:
        """The key never travels over plain http, except to loopback."""
        path = tmp_path / "x.csv"
        path.write_text("call_id,content\ncll-1,a\n")
        result = run_cli("run", str(path), "--base-url", "http://api.example.com", key="ak_x")
        assert result.exit_code == 2
        assert "plain http is allowed only to a loopback host" in result.output

    def test_no_key_is_a_usage_error(self, tmp_path: Path) -> None:
        """Without ALLO_API_KEY or --api-key-file, nothing is sent: exit 2."""
        path = tmp_path / "x.csv"
        path.write_text("call_id,content\ncll-1,a\n")
        result = CliRunner().invoke(cli, ["run", str(path)], env={"ALLO_API_KEY": ""})
        assert result.exit_code == 2
        assert "no API key" in result.output

    def test_unknown_extension_asks_for_format(self, tmp_path: Path) -> None:
        """A .txt input needs --format."""
        path = tmp_path / "x.txt"
        path.write_text("call_id,content\ncll-1,a\n")
        assert "use --format" in run_cli("run", str(path), "--dry-run").output
        assert (
            run_cli(
                "run", str(path), "--dry-run", "--format", "csv", "-o", str(tmp_path / "r.csv")
            ).exit_code
            == 0
        )

    def test_validate_command_reports_and_exits_1(self, tmp_path: Path) -> None:
        """validate prints counts per code with row and line numbers and exits 1 on invalid
        rows (line 3 is row 1: the header is line 1)."""
        path = tmp_path / "x.csv"
        path.write_text("call_id,content\ncll-1,a\nmsg-2,b\ncll-3,\n")
        result = run_cli("validate", str(path))
        assert result.exit_code == 1
        assert "3 rows, 1 valid, 2 invalid" in result.output
        assert "row 1 (line 3): column call_id: 'msg-2' is not a call id" in result.output
        assert "row 2 (line 4): column content: missing or blank" in result.output

    def test_unreadable_parquet_is_exit_2(self, tmp_path: Path) -> None:
        """A file that is not Parquet is named with the reason."""
        path = tmp_path / "bad.parquet"
        path.write_bytes(b"not parquet at all")
        with pytest.raises(InputError, match=r"bad\.parquet: cannot read it as parquet"):
            open_input(path, "parquet")


def test_csv_with_bom_crlf_and_multiline_markdown(tmp_path: Path) -> None:
    """UTF-8 BOM, CRLF line ends and quoted multi-line markdown with commas and quotes."""
    path = tmp_path / "x.csv"
    body = '# Title\r\n- a, b\r\n> "quoted"'
    path.write_bytes(
        b"\xef\xbb\xbfcontent,call_id\r\n"
        + f'"{body.replace(chr(34), chr(34) * 2)}",cll-1\r\n'.encode()
    )
    [batch] = list(iter_batches(open_input(path, "csv"), 100))
    assert batch.select(READ).rows() == [(0, "cll-1", None, body)]


# -- properties --------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)
# Call ids that look right and are not: white space at one end, controls inside.
ODD_IDS = ["cll-1 ", " cll-1", "cll-1\t", "cll-\n1", "cll-1\x00", "cll-1\x85", "cll-1\u00a0"]
row_fields = st.fixed_dictionaries(
    {
        "call_id": st.one_of(
            st.none(), st.sampled_from(["cll-1", "cll-2", "msg-1", "x", *ODD_IDS]), text
        ),
        "template_key": st.one_of(st.none(), st.sampled_from([*TEMPLATE_KEYS, "BAD", ""])),
        "content": st.one_of(
            st.none(), st.sampled_from(["a", "b", " ", "", "\x1f", "\u3000"]), text
        ),
    }
)
rows_strategy = st.lists(row_fields, max_size=30)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=rows_strategy, fmt=st.sampled_from(["csv", "parquet", "ndjson"]), batch=st.integers(1, 7)
)
def test_any_written_file_round_trips(
    tmp_path: Path, rows: list[dict[str, Any]], fmt: str, batch: int
) -> None:
    """Whatever polars writes, the reader returns the same rows in order, in any batch size."""
    frame = pl.DataFrame(
        rows, schema={"call_id": pl.String, "template_key": pl.String, "content": pl.String}
    )
    path = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        frame.write_csv(path)  # polars quotes "" and leaves null empty: both survive
    elif fmt == "parquet":
        frame.write_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = open_input(path, fmt)  # type: ignore[arg-type]
    read = pl.concat(list(iter_batches(source, batch))) if rows else None
    if not rows:
        assert read is None or read.height == 0
        return
    assert read is not None
    assert read["row"].to_list() == list(range(len(rows)))
    assert read.select("call_id", "template_key", "content").rows() == frame.rows()


# Unicode's White_Space, what "blank" and "surrounding white space" mean. Python's str.strip
# also takes \x1c-\x1f away (control characters, not white space).
WHITE_SPACE = "".join(
    chr(code)
    for code in (
        *range(0x09, 0x0E),
        0x20,
        0x85,
        0xA0,
        0x1680,
        *range(0x2000, 0x200B),
        0x2028,
        0x2029,
        0x202F,
        0x205F,
        0x3000,
    )
)


def reference_codes(rows: list[dict[str, Any]]) -> list[str | None]:
    """A plain-Python statement of DESIGN §4, to hold the vectorised checks to."""

    def own(row: dict[str, Any]) -> str | None:
        call_id, content = row["call_id"], row["content"]
        template = (row["template_key"] or "").strip(WHITE_SPACE) or None
        if (
            call_id is None
            or not call_id.startswith("cll-")
            or call_id != call_id.strip(WHITE_SPACE)
        ):
            return "INVALID_ITEM_ID"
        if any(unicodedata.category(ch) == "Cc" for ch in call_id):
            return "INVALID_ITEM_ID"
        if content is None or not content.strip(WHITE_SPACE) or len(content) > MAX_CONTENT_CHARS:
            return "INVALID_REQUEST_BODY"
        if template is not None and template not in TEMPLATE_KEYS:
            return "INVALID_REQUEST_BODY"
        expected = (row.get("expected_sha256") or "").strip(WHITE_SPACE)
        if expected and not re.fullmatch(r"[0-9a-fA-F]{64}", expected):
            return "INVALID_REQUEST_BODY"
        return None

    codes = [own(r) for r in rows]
    targets: dict[tuple[str, str | None], set[str]] = {}
    for row, code in zip(rows, codes, strict=True):
        if code is None:
            key = (row["call_id"], (row["template_key"] or "").strip(WHITE_SPACE) or None)
            targets.setdefault(key, set()).add(row["content"])
    # A call given both with and without a template, in more than one content: a row without
    # one updates the call's only summary, maybe the one another row names.
    calls: dict[str, list[tuple[str | None, str]]] = {}
    for row, code in zip(rows, codes, strict=True):
        if code is None:
            template = (row["template_key"] or "").strip(WHITE_SPACE) or None
            calls.setdefault(row["call_id"], []).append((template, row["content"]))
    for i, row in enumerate(rows):
        if codes[i] is None:
            key = (row["call_id"], (row["template_key"] or "").strip(WHITE_SPACE) or None)
            given = calls[row["call_id"]]
            both_ways = {t is None for t, _ in given} == {True, False}
            if len(targets[key]) > 1 or (both_ways and len({c for _, c in given}) > 1):
                codes[i] = "DUPLICATE_ROW"
    return codes


# The four fields iter_batches yields.
READ_SCHEMA = {
    "row": pl.Int64,
    "call_id": pl.String,
    "template_key": pl.String,
    "content": pl.String,
}


EXPECTED = st.one_of(
    st.none(),
    st.sampled_from(["a" * 64, "A0" * 32, "g" * 64, "a" * 63, "a" * 65, "", " ", f" {'b' * 64} "]),
    text,
)
validation_rows = st.lists(
    st.tuples(row_fields, EXPECTED).map(lambda pair: {**pair[0], "expected_sha256": pair[1]}),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(rows=validation_rows)
@example(  # blank, padded and upper-case hashes beside a bad one, on valid rows
    rows=[
        {"call_id": f"cll-{n}", "template_key": None, "content": "a", "expected_sha256": value}
        for n, value in enumerate(["", " ", f" {'b' * 64} ", "A0" * 32, "g" * 64, None])
    ]
)
@example(  # a call given with and without a template: in two contents, and in one
    rows=[
        {"call_id": c, "template_key": t, "content": x, "expected_sha256": None}
        for c, t, x in [
            ("cll-1", "MARKDOWN_CLASSIC", "a"),
            ("cll-2", "", "b"),
            ("cll-1", None, "b"),
            ("cll-2", "MARKDOWN_SHORT_CALL", "b"),
            ("cll-1", "MARKDOWN_CLASSIC", "a"),
        ]
    ]
)
def test_validation_agrees_with_the_reference(rows: list[dict[str, Any]]) -> None:
    """The vectorised checks give exactly the reference codes, duplicates included."""
    frame = pl.DataFrame(
        [{"row": i, **r} for i, r in enumerate(rows)],
        schema={**READ_SCHEMA, "expected_sha256": pl.String},
    )
    checked = validate_batch(frame, duplicates_in(frame))
    assert checked["error_code"].to_list() == reference_codes(rows)


def test_length_limit_counts_characters_not_bytes() -> None:
    """100,000 multi-byte characters are fine; 100,001 are not."""
    frame = pl.DataFrame(
        {
            "row": [0, 1],
            "call_id": ["cll-1", "cll-2"],
            "template_key": [None, None],
            "content": ["é" * MAX_CONTENT_CHARS, "é" * (MAX_CONTENT_CHARS + 1)],
        },
        schema=READ_SCHEMA,
    )
    checked = validate_batch(frame, duplicates_in(frame))
    assert checked["error_code"].to_list() == [None, "INVALID_REQUEST_BODY"]


@pytest.mark.parametrize("suffix", ["parquet", "csv", "ndjson"])
def test_batches_number_rows_across_batches_and_stop_at_the_limit(
    tmp_path: Path, suffix: str
) -> None:
    frame = pl.DataFrame(
        {
            "content": [f"text {i}" for i in range(50)],
            "call_id": [f"cll-{i}" for i in range(50)],
            "extra": list(range(50)),
        }
    )
    path = tmp_path / f"in.{suffix}"
    if suffix == "parquet":
        frame.write_parquet(path, row_group_size=16)
    elif suffix == "csv":
        frame.write_csv(path)
    else:
        frame.write_ndjson(path)
    source = open_input(path, suffix)  # type: ignore[arg-type]
    batches = list(iter_batches(source, 7))
    whole = pl.concat(batches)
    assert whole.columns == ["row", *FIELDS]
    assert whole["row"].to_list() == list(range(50))
    assert whole["call_id"].to_list() == frame["call_id"].to_list()
    assert whole["template_key"].null_count() == 50
    assert max(b.height for b in batches) <= 7
    limited = pl.concat(list(iter_batches(source, 7, limit=10)))
    assert limited["row"].to_list() == list(range(10))


def test_duplicates_are_found_across_batches_and_files_of_any_size(tmp_path: Path) -> None:
    from allo_batch.pipeline import survey

    rows = [("cll-1", "a"), ("cll-2", "b"), ("cll-1", "a"), ("cll-3", "c"), ("cll-3", "d")]
    frame = pl.DataFrame(
        {
            "call_id": [r[0] for r in rows] + [f"cll-x{i}" for i in range(30)],
            "content": [r[1] for r in rows] + ["z"] * 30,
        }
    )
    path = tmp_path / "in.parquet"
    frame.write_parquet(path, row_group_size=2)
    source = open_input(path, "parquet")
    identity, duplicates = survey(source, 2)
    assert identity.rows == 35
    found = duplicates.frame
    assert found["row"].to_list() == [2, 3, 4]
    assert found["repeat_of"].to_list() == [0, None, None]
    assert found["dup_rows"].null_count() == 1


_CHECKED_ROWS = [
    ("cll-1", None, "a"),
    ("cll-2", None, "b"),
    ("msg-4", None, "c"),  # not a call: INVALID_ITEM_ID
    ("cll-5", None, "  "),  # blank: INVALID_REQUEST_BODY
    ("cll-6", "BAD", "z"),  # unknown template: INVALID_REQUEST_BODY
    ("cll-7", "MARKDOWN_CLASSIC", "m"),
]
_REPEATING_ROWS = [
    ("cll-1", None, "a"),  # repeats row 0
    ("cll-3", "", "x"),
    ("cll-3", " ", "y"),  # conflicts with the row before (the same target): both invalid
    ("msg-4", None, "c"),  # invalid twice: not a duplicate
    ("cll-7", "MARKDOWN_CLASSIC", "m"),  # repeats row 5
]


_MIXED_ROWS = [  # no target repeats; two calls are given both with and without a template
    ("cll-8", "MARKDOWN_SHORT_CALL", "p"),
    ("cll-9", None, "s"),
    ("cll-8", " ", "q"),  # with row 6, different content: both invalid
    ("cll-9", "MARKDOWN_CLASSIC", "s"),  # the same content as row 7: both are fine
]


@pytest.mark.parametrize("batch_size", [2, 1000])
@pytest.mark.parametrize("extra", ["no-target-repeats", "repeats", "with-and-without-template"])
def test_validate_counts_what_a_run_would_find_with_or_without_repeated_targets(
    tmp_path: Path, batch_size: int, extra: str
) -> None:
    """``validate`` checks in one pass when no target repeats, and checks again once the
    duplicates are known when some do (targets that repeat, or calls given both with and
    without a template): either way its counts and examples are what validating the whole
    input at once gives."""
    from allo_batch.config import JobConfig
    from allo_batch.pipeline import check_input

    repeating = extra == "repeats"
    more = {"repeats": _REPEATING_ROWS, "with-and-without-template": _MIXED_ROWS}
    rows = _CHECKED_ROWS + more.get(extra, [])
    frame = pl.DataFrame(rows, schema=["call_id", "template_key", "content"], orient="row")
    path = tmp_path / "in.csv"
    frame.write_csv(path)
    whole = frame.with_row_index("row").with_columns(
        pl.col("row").cast(pl.Int64), pl.lit(None, pl.String).alias("expected_sha256")
    )
    reference = validate_batch(whole, duplicates_in(whole))
    found = check_input(JobConfig(input=path, batch_size=batch_size), show=1)
    codes = reference.filter(pl.col("error_code").is_not_null())
    assert found.rows == len(rows)
    assert found.codes == dict(codes.group_by("error_code").len().iter_rows())
    assert found.invalid == codes.height
    assert found.repeats == reference["repeat_of"].is_not_null().sum()
    first = codes.group_by("error_code", maintain_order=True).first()
    assert found.examples == {
        code: [(row, message)]
        for row, code, message in first.select("row", "error_code", "message").iter_rows()
    }
    assert found.repeats == (2 if repeating else 0)
    assert found.codes.get("DUPLICATE_ROW", 0) == {"repeats": 2, "no-target-repeats": 0}.get(
        extra, 2
    )
    if extra == "with-and-without-template":
        assert found.examples["DUPLICATE_ROW"] == [
            (
                6,
                "rows 6, 8 give call 'cll-8' different content, with and without template_key "
                "(a row without one updates the call's only summary, maybe the one another "
                "names)",
            )
        ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"call_id,content\ncll-1,a\ncll-2,SECRET b,extra\n", "line 3: 2 fields expected, 3 found"),
        (b"call_id,content\ncll-1,a\ncll-2\n", "line 3: 2 fields expected, 1 found"),
        (b"call_id,content\ncll-1,SECRET \xff\xfe\n", "line 2 (byte offset 29): not UTF-8 text"),
    ],
)
def test_a_malformed_csv_is_named_without_its_content(
    tmp_path: Path, text: bytes, reason: str
) -> None:
    """Exit 2 naming the file, the line and what is wrong; the line's text never appears."""
    path = tmp_path / "broken.csv"
    path.write_bytes(text)
    result = run_cli("validate", str(path))
    assert result.exit_code == 2
    assert f"{path}: cannot read it as csv: {reason}" in result.output
    assert "SECRET" not in result.output


def test_csv_batches_have_the_asked_size_whatever_the_blocks(tmp_path: Path) -> None:
    """pyarrow parses 1 MB blocks; batches are cut to batch_size rows, numbered in order."""
    path = tmp_path / "many.csv"
    rows = 30_000
    pl.DataFrame(
        {"call_id": [f"cll-{i}" for i in range(rows)], "content": ["x" * 100] * rows}
    ).write_csv(path)
    batches = list(iter_batches(open_input(path, "csv"), 7_000))
    assert [b.height for b in batches] == [7_000] * 4 + [2_000]
    assert pl.concat(batches)["row"].to_list() == list(range(rows))
    assert pl.concat(batches)["call_id"][-1] == f"cll-{rows - 1}"


def test_a_bad_line_deep_in_a_csv_is_located_after_the_rows_read(tmp_path: Path) -> None:
    """Past the first 1 MB block, the message names the bad line, counting the header."""
    path = tmp_path / "deep.csv"
    good = "".join(f"cll-{i},{'x' * 100}\n" for i in range(30_000))
    path.write_text("call_id,content\n" + good + "cll-x,SECRET,extra\n")
    with pytest.raises(InputError) as raised:
        list(iter_batches(open_input(path, "csv"), 5_000))
    message = str(raised.value)
    assert message == f"{path}: cannot read it as csv: line 30002: 2 fields expected, 3 found"


def checked_rows(rows: list[dict[str, Any]]) -> pl.DataFrame:
    frame = pl.DataFrame([{"row": i, **r} for i, r in enumerate(rows)], schema=READ_SCHEMA)
    return validate_batch(frame, duplicates_in(frame))


@pytest.mark.parametrize(
    ("call_id", "message"),
    [
        ("cll-1\n", r"column call_id: 'cll-1\n' holds a control character"),
        ("cll-\x001", r"column call_id: 'cll-\x001' holds a control character"),
        ("cll-1\t", r"column call_id: 'cll-1\t' holds a control character"),
        ("cll-\x1b[31m1", r"column call_id: 'cll-\x1b[31m1' holds a control character"),
        ("cll-1\x85", r"column call_id: 'cll-1\x85' holds a control character"),
        (" cll-1", "column call_id: ' cll-1' has surrounding whitespace"),
        ("cll-1 ", "column call_id: 'cll-1 ' has surrounding whitespace"),
        ("cll-1\u3000", r"column call_id: 'cll-1\u3000' has surrounding whitespace"),
        ("\u202ecll-1", r"column call_id: '\u202ecll-1' is not a call id (must start with cll-)"),
        ("it's", r"column call_id: 'it\'s' is not a call id (must start with cll-)"),
    ],
)
def test_a_call_id_with_controls_or_white_space_at_an_end_is_invalid(
    call_id: str, message: str
) -> None:
    """Both ends are treated alike; the id is quoted escaped, so the message stays one line."""
    [row] = checked_rows([{"call_id": call_id, "template_key": None, "content": "a"}]).rows(
        named=True
    )
    assert row["error_code"] == "INVALID_ITEM_ID"
    assert row["message"] == message


def test_row_messages_quote_at_most_40_characters_of_a_value() -> None:
    """An id or a key is quoted up to 40 characters; a value no id or key can be (over 64
    characters, or white space inside: another column's text, maybe a summary) not at all."""
    checked = checked_rows(
        [
            {"call_id": "cll-\x01" + "S" * 55, "template_key": None, "content": "a"},
            {"call_id": "cll-1", "template_key": "X" * 64, "content": "a"},
            {"call_id": "cll-\n" + "S" * 100, "template_key": None, "content": "a"},
            {"call_id": "cll-2", "template_key": "X" * 65, "content": "a"},
            {"call_id": "cll-3", "template_key": "MARKDOWN CLASSIC", "content": "a"},
        ]
    )
    quoted, keyed, long_id, long_key, spaced = checked["message"].to_list()
    assert quoted == r"column call_id: 'cll-\x01" + "S" * 35 + "'… holds a control character"
    assert keyed.startswith("column template_key: '" + "X" * 40 + "'… is not one of")
    assert long_id == (
        "column call_id: a text of 105 characters, not shown (is this the call_id column?) "
        "holds a control character"
    )
    for message, length in ((long_key, 65), (spaced, 16)):
        assert message.startswith(
            f"column template_key: a text of {length} characters, not shown (is this the "
            "template_key column?) is not one of"
        )


def test_a_duplicate_message_quotes_the_call_id_cut_short() -> None:
    call_id = "cll-" + "9" * 60
    checked = checked_rows(
        [
            {"call_id": call_id, "template_key": None, "content": "a"},
            {"call_id": call_id, "template_key": None, "content": "b"},
        ]
    )
    assert checked["error_code"].to_list() == ["DUPLICATE_ROW"] * 2
    assert checked["message"][0] == (
        f"rows 0, 1 give call '{call_id[:40]}'… (template (none)) different content"
    )


def test_reading_ahead_keeps_the_order_stays_one_batch_ahead_and_raises_where_the_reader_did() -> (
    None
):
    """``read_ahead`` hands on every batch in order, asks the reader for one batch beyond the
    one handed on and no more, and an error of the reader comes out after the batches before
    it, as the error it was."""
    asked: list[int] = []

    def reader() -> Iterator[int]:
        for batch in range(5):
            asked.append(batch)
            if batch == 3:
                raise InputError("in.csv: line 4: bad")
            yield batch

    got = []
    with pytest.raises(InputError, match="line 4"):
        for batch in read_ahead(reader()):
            got.append(batch)
            assert max(asked) <= batch + 1  # (waited for: the thread is one batch ahead)
    assert got == [0, 1, 2]
    assert asked == [0, 1, 2, 3]
    assert list(read_ahead(iter(()))) == []


class TestFingerprint:
    """The input's fingerprint is kept in every result file's sidecar and compared by each
    rerun: its bytes must never change, however it is computed."""

    @staticmethod
    def _reference(rows: list[tuple[str | None, str | None]]) -> str:
        """The documented form, built by hand: each row as call_id, 0x1f, the template (or
        NUL for none, a blank one being none), 0x1e; NUL for a missing call id."""
        import hashlib

        digest = hashlib.sha256()
        for call_id, template in rows:
            kept = template.strip() if template is not None else None
            digest.update((call_id if call_id is not None else "\0").encode())
            digest.update(b"\x1f" + (kept.encode() if kept else b"\0") + b"\x1e")
        return digest.hexdigest()

    ROWS: tuple[tuple[str | None, str | None], ...] = (
        ("cll-1", "MARKDOWN_CLASSIC"),
        ("cll-é日本", None),
        (None, " MARKDOWN_SHORT_CALL "),
        ("cll-3", ""),
        ("cll-4", "   "),
        ("", "x"),
    )

    def _frame(self, rows: Any) -> pl.DataFrame:
        return pl.DataFrame(
            list(rows), schema={"call_id": pl.String, "template_key": pl.String}, orient="row"
        )

    def test_digest_is_the_documented_bytes_whatever_the_batches(self, tmp_path: Path) -> None:
        """One frame, a sliced one (an Arrow offset), one of several chunks, batches split
        anywhere, and validated batches (template already normalized): the same digest."""
        from allo_batch.read import Fingerprinter

        rows = list(self.ROWS) * 3
        expected = self._reference(rows)
        whole = Fingerprinter(tmp_path)
        whole.add(self._frame(rows))
        assert whole.result().keys_sha256 == expected
        assert whole.result().rows == len(rows)

        split = Fingerprinter(tmp_path)
        padded = self._frame([("cll-pad", None), *rows, ("cll-pad", None)])
        for start in range(1, len(rows) + 1, 4):  # batches split anywhere
            split.add(padded.slice(start, min(4, len(rows) + 1 - start)))
        assert split.result().keys_sha256 == expected

        chunked = pl.concat([self._frame(rows[:5]), self._frame(rows[5:])], rechunk=False)
        assert chunked.n_chunks() > 1
        several = Fingerprinter(tmp_path)
        several.add(chunked)
        assert several.result().keys_sha256 == expected

        checked = validate_batch(
            self._frame(rows)
            .with_row_index("row")
            .with_columns(pl.col("row").cast(pl.Int64), pl.lit("text").alias("content")),
            _no_dups(),
        )
        normalized = Fingerprinter(tmp_path)
        normalized.add(checked, checked=True)
        assert normalized.result().keys_sha256 == expected

    def test_bytes_come_from_where_an_arrow_array_starts_and_ends(self) -> None:
        """Arrow arrays may be slices of bigger buffers (an offset, offsets not from 0):
        only the array's own bytes are hashed, chunk after chunk."""
        import hashlib

        import pyarrow as pa

        from allo_batch.read import _digest_values

        values = pa.array(["aa", "bé", None, "cc", "dd"], pa.large_string())
        expected = hashlib.sha256("béccdd".encode()).hexdigest()
        digest = hashlib.sha256()
        _digest_values(digest, values.slice(1, 3))
        _digest_values(digest, pa.chunked_array([values.slice(4, 1), values.slice(0, 0)]))
        assert digest.hexdigest() == expected

    def test_checked_target_hashes_are_the_raw_ones(self) -> None:
        """``validate`` hashes targets of validated batches without normalizing the template
        again: the hashes, and so the duplicates found, are those of the raw rows."""
        from allo_batch.validate import target_hashes

        raw = (
            self._frame(self.ROWS)
            .with_row_index("row")
            .with_columns(pl.col("row").cast(pl.Int64), pl.lit("text").alias("content"))
        )
        checked = validate_batch(raw, _no_dups())
        assert target_hashes(checked, checked=True).to_list() == target_hashes(raw).to_list()
        # A normalization that is skipped on raw rows does change them: the flag matters.
        assert target_hashes(raw, checked=True).to_list() != target_hashes(raw).to_list()


def _no_dups() -> Any:
    from allo_batch.validate import no_duplicates

    return no_duplicates()


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 8), max_size=40),
    members=st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 8), min_size=1, max_size=20),
)
def test_the_sorted_lookup_of_candidate_hashes_is_set_membership(
    values: list[int], members: list[int]
) -> None:
    """Duplicates are looked for among the rows whose target hash is a candidate: a binary
    search in the sorted candidates, which must agree with plain membership at both ends."""
    from allo_batch.validate import _in_sorted

    ordered = pl.Series(members, dtype=pl.UInt64).unique().sort()
    found = _in_sorted(pl.Series(values, dtype=pl.UInt64), ordered).to_list()
    assert found == [value in set(members) for value in values]


@settings(max_examples=60, deadline=None)
@given(rows=validation_rows, per_pass=st.integers(1, 3))
def test_duplicates_found_a_range_of_hashes_at_a_time_are_the_same(
    rows: list[dict[str, Any]], per_pass: int
) -> None:
    """Candidates are compared a range of hashes per pass (to bound memory): whatever the
    range, the duplicates are those of one pass, and each pass reads the input anew."""
    from allo_batch import validate

    frame = pl.DataFrame(
        [{"row": i, **r} for i, r in enumerate(rows)],
        schema={**READ_SCHEMA, "expected_sha256": pl.String},
    )
    candidates = validate.repeated_hashes(validate.target_hashes(frame))
    calls = validate.calls_in_conflict([frame], lambda: [frame])
    whole = validate.find_duplicates(lambda: [frame], candidates, calls).frame
    both = validate._calls_given_both_ways([frame]).len()
    reads = []

    def batches() -> list[pl.DataFrame]:
        reads.append(1)
        return [frame.slice(0, 3), frame.slice(3)]

    saved = validate._CANDIDATES_PER_PASS
    validate._CANDIDATES_PER_PASS = per_pass  # type: ignore[misc]
    try:
        ranged = validate.calls_in_conflict([frame], batches)
        # In any order: find_duplicates sorts them for its binary searches.
        parts = validate.find_duplicates(batches, candidates.sort(descending=True), ranged).frame
    finally:
        validate._CANDIDATES_PER_PASS = saved  # type: ignore[misc]
    assert ranged.to_list() == calls.to_list()
    assert parts.rows() == whole.rows()
    passes = -(-both // per_pass) + -(-candidates.len() // per_pass) + -(-calls.len() // per_pass)
    assert len(reads) == passes


def test_duplicates_are_found_whatever_the_order_of_the_candidates() -> None:
    """Twelve targets given twice (half of them with another content): every repeat and
    every conflict is found with the candidates handed over in reverse, four per pass."""
    from allo_batch import validate

    rows = [(f"cll-{n}", None, "same" if n % 2 else f"v{n}") for n in range(12)]
    rows += [(f"cll-{n}", None, "same" if n % 2 else f"w{n}") for n in range(12)]
    schema = {"call_id": pl.String, "template_key": pl.String, "content": pl.String}
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    frame = frame.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    candidates = validate.repeated_hashes(validate.target_hashes(frame))
    saved = validate._CANDIDATES_PER_PASS
    validate._CANDIDATES_PER_PASS = 4  # type: ignore[misc]
    try:
        found = validate.find_duplicates(lambda: [frame], candidates.sort(descending=True))
    finally:
        validate._CANDIDATES_PER_PASS = saved  # type: ignore[misc]
    marks = found.frame
    assert marks["row"].to_list() == [n for n in range(24) if n % 2 == 0 or n >= 12]
    assert marks.filter(pl.col("repeat_of").is_not_null())["repeat_of"].to_list() == [
        n for n in range(12) if n % 2
    ]
    assert marks["dup_rows"].null_count() == 6


def test_calls_in_conflict_are_compared_a_range_at_a_time() -> None:
    """Four calls given with and without a template in two contents, one call per pass:
    each pass reads the input anew and holds the rows of its call alone, and together they
    mark the eight rows, as one pass does."""
    from allo_batch import validate

    rows: list[tuple[str, str | None, str]] = [
        (f"cll-{n}", "MARKDOWN_CLASSIC", f"a{n}") for n in range(4)
    ]
    rows += [(f"cll-{n}", None, f"b{n}") for n in range(4)]
    schema = {"call_id": pl.String, "template_key": pl.String, "content": pl.String}
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    frame = frame.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    calls = validate.calls_in_conflict([frame], lambda: [frame])
    assert calls.len() == 4
    whole = validate.find_duplicates(lambda: [frame], calls.clear(), calls).frame
    held: list[int] = []

    def batches() -> list[pl.DataFrame]:
        held.append(0)
        return [frame]

    saved = validate._CANDIDATES_PER_PASS
    validate._CANDIDATES_PER_PASS = 1  # type: ignore[misc]
    try:
        parts = validate.find_duplicates(batches, calls.clear(), calls).frame
    finally:
        validate._CANDIDATES_PER_PASS = saved  # type: ignore[misc]
    assert len(held) == 4
    assert parts.rows() == whole.rows()
    assert parts["row"].to_list() == list(range(8))
