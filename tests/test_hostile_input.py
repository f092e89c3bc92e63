"""Hostile and broken input files: every one is read, or refused with one line that names the
file and the line or column, and never quotes more than 40 characters of what the file holds."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from allo_batch.cli import cli
from allo_batch.constants import MAX_CONTENT_CHARS
from allo_batch.errors import InputError
from allo_batch.read import iter_batches, key_batches, open_input
from allo_batch.validate import duplicates_in, validate_batch

_BLOCK = 1 << 20  # pyarrow's block size in allo_batch.read
SECRET = "ak_live_" + "7Hq2xVb9Lm4Kp8Rt3Wz6Yc1Nd5Fg0Js" * 2  # 72 characters


READ = ["row", "call_id", "template_key", "content"]


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env={"ALLO_API_KEY": ""}, catch_exceptions=False)


def refusal(path: Path, fmt: str = "csv") -> str:
    """The message of the InputError that reading ``path`` to the end raises."""
    with pytest.raises(InputError) as raised:
        source = open_input(path, fmt)  # type: ignore[arg-type]
        for _ in iter_batches(source, 1000):
            pass
    return str(raised.value)


def read_all(path: Path, fmt: str = "csv", batch: int = 1000) -> pl.DataFrame:
    batches = list(iter_batches(open_input(path, fmt), batch))  # type: ignore[arg-type]
    return pl.concat(batches).select(READ) if batches else pl.DataFrame()


def echoed(output: str, data: bytes, *, limit: int = 40) -> str | None:
    """A run of more than ``limit`` characters of ``output`` that the file holds verbatim."""
    for start in range(max(len(output) - limit, 0)):
        window = output[start : start + limit + 1]
        if window.encode("utf-8", "surrogatepass") in data:
            return window
    return None


# -- 2. never echo the file ------------------------------------------------------------------


def test_an_api_key_file_passed_as_input_is_not_printed(tmp_path: Path) -> None:
    """Its one line is the only column name: at most 40 characters of it are shown."""
    path = tmp_path / "key.csv"
    path.write_text(SECRET + "\n")
    result = run_cli("validate", str(path))
    assert result.exit_code == 2
    assert f"{path}: missing required column call_id, content; columns found: '" in result.output
    assert SECRET[:40] in result.output
    assert SECRET[:41] not in result.output


def test_binary_bytes_read_as_csv_are_escaped_and_cut(tmp_path: Path) -> None:
    """A Parquet file named .csv: no raw byte of it reaches the terminal."""
    frame = pl.DataFrame({"call_id": ["cll-1"], "content": [SECRET]})
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    path = tmp_path / "really.csv"
    path.write_bytes(buffer.getvalue())
    result = run_cli("validate", str(path))
    assert result.exit_code == 2
    assert f"{path}: cannot read it as csv: line 1 (byte offset " in result.output
    assert all(ch.isprintable() or ch == "\n" for ch in result.output)
    assert echoed(result.output, path.read_bytes()) is None


def test_at_most_ten_column_names_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    names = [f"column_{i}" for i in range(25)]
    path.write_text(",".join(names) + "\n" + ",".join("x" * 25) + "\n")
    message = refusal(path)
    assert "'column_9' and 15 more" in message
    assert "column_10" not in message


def test_column_names_with_controls_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_bytes(b'"a\x00b","line\nbreak","\xe2\x80\xaeevil"\n1,2,3\n')
    message = refusal(path)
    assert r"'a\x00b', 'line\nbreak', '\u202eevil'" in message
    assert "\n" not in message and "\x00" not in message


# -- 3. an unclosed quote ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        # The last row's quote runs to the end of the file (no newline after it).
        ('call_id,content\ncll-1,a\ncll-2,"cut off', 3),
        ('call_id,content\ncll-1,a\ncll-2,"cut off\n', 3),
        # Opened earlier, it swallows every row after it.
        ('call_id,content\ncll-1,"b\ncll-2,c\ncll-3,d\n', 2),
        # Multi-line quoted fields before it do not throw the count off.
        ('call_id,content\ncll-1,"x\ny"\ncll-2,"z\n\n', 4),
    ],
)
def test_a_quote_left_open_is_refused_at_its_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "cut.csv"
    path.write_text(text)
    message = refusal(path)
    assert message.startswith(
        f"{path}: cannot read it as csv: line {line}: a quoted field opens and is never closed"
    )
    # The key pass, which does not read the content column, finds the same line.
    with pytest.raises(InputError, match=f"line {line}: a quoted field"):
        list(key_batches(open_input(path, "csv"), 1000))


def test_the_row_of_an_open_quote_is_never_yielded(tmp_path: Path) -> None:
    """Rows before it may come out in earlier batches; the cut-off row never does."""
    path = tmp_path / "cut.csv"
    path.write_text("call_id,content\n" + "cll-1,a\n" * 5 + 'cll-2,"SECRET')
    seen = []
    with pytest.raises(InputError, match="line 7: a quoted field"):
        for batch in iter_batches(open_input(path, "csv"), 2):
            seen.extend(batch["call_id"].to_list())
    assert "cll-2" not in seen


def test_an_open_quote_in_an_unread_last_column_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "cut.csv"
    path.write_text('call_id,content,note\ncll-1,a,b\ncll-2,b,"open\n')
    assert "line 3: a quoted field opens and is never closed" in refusal(path)


def test_a_run_with_an_open_quote_sends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cut.csv"
    path.write_text('call_id,content\ncll-1,a\ncll-2,"cut off')
    result = run_cli("run", str(path), "--dry-run", "-o", str(tmp_path / "out.csv"))
    assert result.exit_code == 2
    assert "line 3: a quoted field opens and is never closed" in result.output


# -- 4. not UTF-8 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"call_id,content\ncll-1,caf\xe9 SECRET\n", "line 2 (byte offset 25)"),
        (b"call_id,content\ncll-\xff1,a\n", "line 2 (byte offset 20)"),
        (b"call_id,cont\xe9nt\ncll-1,a\n", "line 1 (byte offset 12)"),
        # A column that is not read is neither decoded nor sent: its bytes do not matter.
        (b"call_id,content,note\ncll-1,a,caf\xe9\ncll-2,b,\n", None),
    ],
)
def test_csv_that_is_not_utf8_is_refused_at_its_line(
    tmp_path: Path, data: bytes, where: str | None
) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(data)
    if where is None:
        assert read_all(path).height == 2
        return
    message = refusal(path)
    assert f"{where}: not UTF-8 text" in message
    assert "SECRET" not in message


def test_a_bad_byte_past_the_first_block_is_located(tmp_path: Path) -> None:
    """Multi-byte characters cut by a block boundary are fine; the bad byte's line is exact."""
    path = tmp_path / "deep.csv"
    head = "call_id,content\n" + "".join(f"cll-{i},{'é' * 333}\n" for i in range(5000))
    path.write_bytes(head.encode() + b"cll-x,\xc3(\n")
    assert f"line 5002 (byte offset {len(head.encode()) + 6}): not UTF-8 text" in refusal(path)


def test_ndjson_that_is_not_utf8_is_refused_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.ndjson"
    path.write_bytes(b'{"call_id":"cll-1","content":"a"}\n{"call_id":"cll-2","content":"\xe9"}\n')
    assert "line 2 (byte offset 64): not UTF-8 text" in refusal(path, "ndjson")


# -- 5. columns that are not text --------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "kind"),
    [
        (pa.array([1, 2], pa.int64()), "numbers (int64)"),
        (pa.array([1.5, 2.0]), "numbers (double)"),
        (pa.array([True, False]), "booleans (bool)"),
        (pa.array([[1], [2]]), "lists (list)"),
        (pa.array([{"a": "x"}, {"a": "y"}]), "structs (struct)"),
        (pa.array([b"x", b"y"]), "binary data (binary)"),
    ],
)
@pytest.mark.parametrize("name", ["content", "call_id", "template_key"])
def test_a_parquet_column_that_is_not_text_is_refused(
    tmp_path: Path, column: Any, kind: str, name: str
) -> None:
    table = {"call_id": pa.array(["cll-1", "cll-2"]), "content": pa.array(["a", "b"])}
    table[name] = column
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table(table), path)
    message = refusal(path, "parquet")
    assert message == f"{path}: column '{name}' holds {kind}, not text"


@pytest.mark.parametrize(
    "column",
    [
        pa.array(["a", "b"], pa.large_string()),
        pa.array(["a", "b"]).dictionary_encode(),
        pa.array([None, None], pa.null()),
        pa.array([None, None], pa.string()),
    ],
)
def test_text_parquet_columns_of_any_string_type_are_read(tmp_path: Path, column: Any) -> None:
    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"call_id": pa.array(["cll-1", "cll-2"]), "content": column}), path)
    assert read_all(path, "parquet")["content"].to_list() == column.to_pylist()


def test_polars_categorical_and_enum_columns_are_text(tmp_path: Path) -> None:
    path = tmp_path / "cat.parquet"
    pl.DataFrame(
        {
            "call_id": pl.Series(["cll-1", "cll-2"], dtype=pl.Categorical),
            "content": pl.Series(["a", "b"], dtype=pl.Enum(["a", "b"])),
        }
    ).write_parquet(path)
    assert read_all(path, "parquet").rows() == [(0, "cll-1", None, "a"), (1, "cll-2", None, "b")]


@pytest.mark.parametrize(
    ("value", "kind"),
    [("5", "a number"), ("true", "a boolean"), ("[1]", "a list"), ('{"a": 1}', "an object")],
)
@pytest.mark.parametrize("name", ["content", "template_key", "expected_sha256"])
def test_an_ndjson_column_that_is_not_text_is_refused_at_its_first_such_line(
    tmp_path: Path, value: str, kind: str, name: str
) -> None:
    """A column whose only values are not text (after nulls and blank lines): the message
    names the file, the line and the column, as for a value among strings."""
    path = tmp_path / "typed.ndjson"
    values = {"call_id": "cll-1", "content": "a", name: None}
    path.write_text(json.dumps(values) + "\n\n" + json.dumps(values).replace("null", value) + "\n")
    assert refusal(path, "ndjson") == (
        f"{path}: cannot read it as ndjson: line 3: column '{name}' holds {kind}, not text"
    )


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("5", "a number"),
        ('{"text": "hello"}', "an object"),
        ("[1]", "a list"),
        ("false", "a boolean"),
    ],
)
def test_a_value_that_is_not_text_among_strings_is_refused_at_its_line(
    tmp_path: Path, value: str, kind: str
) -> None:
    """polars would make it text ('{"text": "hello"}' as a summary); pyarrow refuses it."""
    path = tmp_path / "mixed.ndjson"
    path.write_text(
        '{"call_id": "cll-1", "content": "a"}\n\n'
        f'{{"call_id": "cll-2", "content": {value}, "other": 1}}\n'
    )
    assert f"line 3: column 'content' holds {kind}, not text" in refusal(path, "ndjson")


def test_other_ndjson_columns_may_hold_anything(tmp_path: Path) -> None:
    path = tmp_path / "extra.ndjson"
    path.write_text(
        '{"call_id": "cll-1", "content": "a", "extra": 1}\n'
        '{"call_id": "cll-2", "content": null, "extra": "x"}\n'
    )
    assert read_all(path, "ndjson").rows() == [(0, "cll-1", None, "a"), (1, "cll-2", None, None)]


@pytest.mark.parametrize("end", [b"\n", b"\r"])
@pytest.mark.parametrize("line", [b"null", b"  null", b"nullx", b"null {}"])
def test_a_line_that_would_crash_pyarrow_is_refused(
    tmp_path: Path, end: bytes, line: bytes
) -> None:
    """pyarrow 26 dies (SIGSEGV) on such a line at the start of a block: here the second 1 MB
    block. In a child process, so that a regression fails this test, not the whole run."""
    path = tmp_path / "nulls.ndjson"
    record = b'{"call_id": "cll-1", "content": "' + b"x" * 28 + b'"}' + end  # 64 bytes
    assert len(record) == 64
    path.write_bytes(record * (_BLOCK // 64) + line + end + record * 10)
    done = subprocess.run(
        [sys.executable, "-m", "allo_batch", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot read it as ndjson" in done.stderr


# -- 6. fields larger than a block -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_a_3_mb_field_is_read_and_refused_as_too_long_by_validation(
    tmp_path: Path, fmt: str
) -> None:
    """pyarrow parses 1 MB blocks; the file is read again with larger ones, rows kept in order."""
    big = "x" * 3_000_000
    rows = [("cll-1", "a"), ("cll-2", big), ("cll-3", "c")] + [
        (f"cll-{i}", "d") for i in range(4, 9)
    ]
    path = tmp_path / f"big.{fmt}"
    if fmt == "csv":
        path.write_text("call_id,content\n" + "".join(f'{i},"{c}"\n' for i, c in rows))
    else:
        path.write_text("".join(json.dumps({"call_id": i, "content": c}) + "\n" for i, c in rows))
    frame = read_all(path, fmt, batch=3)
    assert frame["row"].to_list() == list(range(len(rows)))
    assert frame["call_id"].to_list() == [i for i, _ in rows]
    checked = validate_batch(frame, duplicates_in(frame))
    assert checked["error_code"].to_list()[:3] == [None, "INVALID_REQUEST_BODY", None]
    assert f"over the API's maximum of {MAX_CONTENT_CHARS}" in checked["message"][1]


@pytest.mark.parametrize("stream_class", ["_Suffixed", "_ObjectLines"])
def test_a_stream_pyarrow_reads_is_closed_only_after_the_read_in_flight(
    tmp_path: Path, stream_class: str
) -> None:
    """pyarrow's readahead may still be reading the stream of a reader given up for larger
    blocks. Closing under that read would let the file opened next reuse its descriptor and
    lose its first block to the old read (a CI failure of the test above): close waits."""
    import allo_batch.read as read_module

    path = tmp_path / "rows.ndjson"
    path.write_text('{"call_id": "cll-1"}\n')
    args = (path, b"") if stream_class == "_Suffixed" else (path,)
    stream = getattr(read_module, stream_class)(*args)
    in_read, release = threading.Event(), threading.Event()
    real_file = stream._file

    class SlowFile:
        closed = False

        def read(self, size: int) -> bytes:
            in_read.set()
            assert release.wait(5)
            return bytes(real_file.read(size))

        def close(self) -> None:
            real_file.close()
            SlowFile.closed = True

    stream._file = SlowFile()
    got: list[bytes] = []
    reading = threading.Thread(target=lambda: got.append(stream.read(64)))
    reading.start()
    closing = threading.Thread(target=stream.close)
    try:
        assert in_read.wait(5)
        closing.start()
        closing.join(0.3)
        assert closing.is_alive() and not SlowFile.closed
    finally:
        release.set()
    reading.join(5)
    closing.join(5)
    assert got == [b'{"call_id": "cll-1"}\n'] and SlowFile.closed
    with pytest.raises(ValueError):
        stream.read(64)


def test_a_field_past_the_first_blocks_is_read_after_earlier_batches(tmp_path: Path) -> None:
    """Rows already yielded before the large row are not yielded again after the reopening."""
    path = tmp_path / "late.csv"
    small = "".join(f"cll-{i},{'y' * 100}\n" for i in range(30_000))
    path.write_text("call_id,content\n" + small + "cll-big," + "z" * 2_500_000 + "\ncll-end,e\n")
    frame = read_all(path, batch=7_000)
    assert frame.height == 30_002
    assert frame["row"].to_list() == list(range(30_002))
    assert frame["call_id"][-2:].to_list() == ["cll-big", "cll-end"]


def test_a_header_longer_than_a_block_is_read(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    extra = [f"c{i}" for i in range(300_000)]
    path.write_text(",".join(["call_id", "content", *extra]) + "\ncll-1,a" + "," * 300_000 + "\n")
    assert read_all(path).rows() == [(0, "cll-1", None, "a")]


# -- 7. duplicate names, broken lines ----------------------------------------------------------


def test_duplicate_csv_header_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("call_id,content,content\ncll-1,a,b\n")
    message = refusal(path)
    assert message == f"{path}: column 'content' appears more than once; rename or drop one"


def test_duplicate_names_in_any_column_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("call_id,content,note,note\ncll-1,a,b,c\n")
    assert "column 'note' appears more than once" in refusal(path)


def test_duplicate_parquet_column_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.parquet"
    table = pa.Table.from_arrays(
        [pa.array(["cll-1"]), pa.array(["a"]), pa.array(["b"])],
        names=["call_id", "content", "content"],
    )
    pq.write_table(table, path)
    assert "column 'content' appears more than once" in refusal(path, "parquet")


def test_a_key_given_twice_in_an_ndjson_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.ndjson"
    path.write_text(
        '{"call_id": "cll-1", "content": "a"}\n'
        '{"call_id": "cll-2", "content": "a", "content": "b"}\n'
    )
    assert "line 2: key 'content' appears twice" in refusal(path, "ndjson")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"call_id": "cll-1", "content": "a"}\n{"call_id": SECRET\n', "line 2: not valid JSON"),
        ('{"call_id": "cll-1", "content": "a"}\n\n  \n[1, 2]\n', "line 4: not a JSON object"),
        ('{"call_id": "cll-1", "content": "a"}\n"SECRET"\n', "line 2: not a JSON object"),
        ("SECRET not json at all\n", "line 1: not valid JSON"),
        # cut short at the end of its line: the column there, not "column 1" of the next
        (
            '{"call_id":"cll-1","content":"a"}\n{"call_id":"cll-2","content":"b"\n',
            "line 2: not valid JSON (Expecting ',' delimiter, column 33)",
        ),
    ],
)
def test_a_broken_ndjson_line_is_named(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "broken.ndjson"
    path.write_text(text)
    message = refusal(path, "ndjson")
    assert f"{path}: cannot read it as ndjson: {problem}" in message
    assert "SECRET" not in message
    assert "Error" not in message


def test_a_byte_order_mark_in_ndjson_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bom.ndjson"
    path.write_bytes(b'\xef\xbb\xbf{"call_id": "cll-1", "content": "a"}\n')
    assert "line 1 starts with a byte order mark" in refusal(path, "ndjson")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("call_id,content\ncll-1,a\ncll-2,SECRET b,extra\n", "line 3: 2 fields expected, 3 found"),
        ('call_id,content\ncll-1,"a\nb"\ncll-2\n', "line 4: 2 fields expected, 1 found"),
    ],
)
def test_a_csv_row_of_the_wrong_width_is_named(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "broken.csv"
    path.write_text(text)
    message = refusal(path)
    assert message == f"{path}: cannot read it as csv: {problem}"


# -- 8. empty inputs ---------------------------------------------------------------------------


def _empty_parquet(path: Path) -> None:
    pl.DataFrame(schema={"call_id": pl.String, "content": pl.String}).write_parquet(path)


EMPTY = {
    "nothing": b"",
    "white space": b" \n\t\r\n  \n",
    "a BOM": b"\xef\xbb\xbf",
    "a BOM and a newline": b"\xef\xbb\xbf\r\n",
}


@pytest.mark.parametrize("fmt", ["csv", "ndjson", "parquet"])
@pytest.mark.parametrize("content", list(EMPTY))
def test_an_empty_input_is_a_job_of_no_rows(tmp_path: Path, fmt: str, content: str) -> None:
    path = tmp_path / f"empty.{fmt}"
    path.write_bytes(EMPTY[content])
    assert_no_rows(path, fmt, tmp_path)


@pytest.mark.parametrize(
    "header",
    [
        b"call_id,content\n",
        b"call_id,content",
        b"\xef\xbb\xbfcall_id,content\r\n",
        b"\n\ncall_id,content\n\n",
    ],
)
def test_a_csv_header_alone_is_a_job_of_no_rows(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "header.csv"
    path.write_bytes(header)
    assert open_input(path, "csv").found == ("call_id", "content")
    assert_no_rows(path, "csv", tmp_path)


def test_a_parquet_file_of_no_rows_is_a_job_of_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "none.parquet"
    _empty_parquet(path)
    assert_no_rows(path, "parquet", tmp_path)


def assert_no_rows(path: Path, fmt: str, tmp_path: Path) -> None:
    source = open_input(path, fmt)  # type: ignore[arg-type]
    assert list(iter_batches(source, 10)) == []
    assert list(key_batches(source, 10)) == []
    out = tmp_path / "out.parquet"
    result = run_cli("run", str(path), "--dry-run", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(out).height == 0
    result = run_cli("validate", str(path))
    assert result.exit_code == 0, result.output


# -- 9. properties: any bytes, any exit code but a traceback -------------------------------------


def check_cli_on(data: bytes, suffix: str) -> None:
    """``validate`` and ``run --dry-run`` on ``data`` end with a documented exit code (0, 1, 2)
    and no traceback, and print no more than 40 characters of the file in a row."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(data)
        for args in (
            ["validate", str(path)],
            ["run", str(path), "--dry-run", "-o", str(Path(folder) / "out.parquet")],
        ):
            result = run_cli(*args)  # catch_exceptions=False: any exception fails the test
            event(f"{args[0]} exit {result.exit_code}")
            assert result.exit_code in (0, 1, 2), (args, result.output)
            output = result.output.replace(str(path), "")
            assert echoed(output, data) is None, output
            if result.exit_code == 2 and args[0] == "validate":
                assert result.output.count("\n") == 1, result.output


FEW = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FEW
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".csv", ".ndjson", ".parquet"]))
def test_any_bytes_end_in_a_documented_exit_code(data: bytes, suffix: str) -> None:
    check_cli_on(data, suffix)


field_text = st.lists(
    st.sampled_from([*"abc ,\"\n\r\t\x00'é\\", "\u202e", "\ufeff", "cll-", "MARKDOWN_"]),
    max_size=12,
).map("".join) | st.sampled_from(
    ["cll-1", "cll-1 ", " cll-2", "MARKDOWN_CLASSIC", "", '"', "x" * 60]
)
csv_text = st.builds(
    lambda bom, header, rows, end, cut: (
        bom + header + end + end.join(",".join(row) for row in rows) + ('"' if cut else "")
    ),
    bom=st.sampled_from(["", "\ufeff"]),
    header=st.sampled_from(
        ["call_id,content", "call_id,template_key,content", "content,call_id,extra", "a,b", ""]
    )
    | st.lists(field_text, max_size=4).map(",".join),
    rows=st.lists(st.lists(field_text, min_size=1, max_size=4), max_size=6),
    end=st.sampled_from(["\n", "\r\n", "\r"]),
    cut=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(text=csv_text, encoding=st.sampled_from(["utf-8", "utf-8", "latin-1"]))
def test_any_csv_shaped_text_ends_in_a_documented_exit_code(text: str, encoding: str) -> None:
    check_cli_on(text.encode(encoding, "replace"), ".csv")


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | field_text,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(field_text, inner, max_size=2),
    max_leaves=4,
)
json_line = st.one_of(
    st.fixed_dictionaries(
        {"call_id": json_value, "content": json_value},
        optional={"template_key": json_value, "extra": json_value},
    ).map(json.dumps),
    json_value.map(json.dumps),
    field_text,
)


@settings(max_examples=120, deadline=None)
@given(lines=st.lists(json_line, max_size=6), end=st.sampled_from(["\n", "\r\n", "\r"]))
def test_any_ndjson_shaped_text_ends_in_a_documented_exit_code(lines: list[str], end: str) -> None:
    check_cli_on(end.join(lines).encode(), ".ndjson")


def _parquet_bytes(rows: int) -> bytes:
    buffer = io.BytesIO()
    pl.DataFrame(
        {"call_id": [f"cll-{i}" for i in range(rows)], "content": [SECRET] * rows}
    ).write_parquet(buffer)
    return buffer.getvalue()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 5),
    at=st.floats(0, 1),
    cut=st.booleans(),
    byte=st.integers(0, 255),
)
def test_a_damaged_parquet_file_ends_in_a_documented_exit_code(
    rows: int, at: float, cut: bool, byte: int
) -> None:
    data = bytearray(_parquet_bytes(rows))
    index = int(at * (len(data) - 1))
    if cut:
        del data[index:]
    else:
        data[index] = byte
    check_cli_on(bytes(data), ".parquet")


SUMMARIES = [
    f"Maya Patel called about invoice {i}: the refund was approved and will arrive on Friday."
    for i in range(3)
]


@pytest.mark.parametrize("swapped", ["template_key", "call_id", "expected_sha256"])
def test_a_summary_in_a_key_column_is_never_written_out(tmp_path: Path, swapped: str) -> None:
    """Columns swapped or mislabelled put summaries where an id or a key belongs: the refused
    rows name the column and the text's length, and neither the messages, the terminal nor the
    result file hold any of it (the result file is meant to be attached to tickets)."""
    columns: dict[str, list[str]] = {
        "call_id": [f"cll-{i}" for i in range(3)],
        "template_key": ["MARKDOWN_CLASSIC"] * 3,
        "content": ["MARKDOWN_CLASSIC"] * 3,
    }
    columns[swapped] = SUMMARIES
    source = tmp_path / "in.csv"
    pl.DataFrame(columns).write_csv(source)
    output = tmp_path / "out.csv"
    checked = run_cli("validate", str(source))
    ran = run_cli("run", str(source), "-o", str(output), "--dry-run")
    assert (checked.exit_code, ran.exit_code) == (1, 1), ran.output
    assert (
        f"a text of {len(SUMMARIES[0])} characters, not shown (is this the {swapped} column?)"
        in checked.output
    )
    told = (checked.output + ran.output + output.read_text()).lower()
    for summary in SUMMARIES:
        words = summary.lower().split()
        assert not any(" ".join(words[k : k + 2]) in told for k in range(len(words) - 1)), summary
    rows = pl.read_csv(output, infer_schema=False)
    assert rows["status"].to_list() == ["invalid"] * 3
    if swapped != "expected_sha256":
        assert rows[swapped].null_count() == 3
