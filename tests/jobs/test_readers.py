from __future__ import annotations

import gzip

import pytest
from jobs_fake import write_csv, write_jsonl, write_parquet

from prefillonly.errors import InvalidRequestError
from prefillonly.jobs.readers import (
    count_rows,
    iter_batches,
    iter_rows,
    probe_columns,
    resolve_inputs,
)
from prefillonly.jobs.runner import ShardSelector

ROWS = [{"id": f"d{i}", "text": f"t{i}", "n": i} for i in range(25)]


def _rows(files, **kw):
    return list(iter_rows(files, **kw))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_each_format_positions_and_projection(tmp_path, fmt):
    writer = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[fmt]
    path = writer(tmp_path / f"in.{fmt}", ROWS, **({"row_group_size": 7} if fmt == "parquet" else {}))
    files = resolve_inputs(str(path))
    assert [f.format for f in files] == [fmt]
    assert probe_columns(files[0]) == ["id", "text", "n"]
    rows = _rows(files, columns=["text", "id"])
    assert [r.position.row for r in rows] == list(range(25))
    assert all(r.error is None and set(r.data) == {"id", "text"} for r in rows)
    assert rows[3].data["text"] == "t3"
    batches = list(iter_batches(files, 10))
    assert [len(b) for b in batches] == [10, 10, 5]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_selector_skips_rows(tmp_path, fmt):
    writer = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[fmt]
    path = writer(tmp_path / f"in.{fmt}", ROWS, **({"row_group_size": 4} if fmt == "parquet" else {}))
    files = resolve_inputs(str(path))
    sel = ShardSelector(5, done={0, 3}, shard_filter=lambda k: k != 2)
    rows = _rows(files, selector=sel)
    assert [r.position.row for r in rows] == [5, 6, 7, 8, 9, 20, 21, 22, 23, 24]
    assert [r.data["text"] for r in rows][:2] == ["t5", "t6"]


def test_directory_and_glob_are_sorted_and_global(tmp_path):
    d = tmp_path / "data"
    write_jsonl(d / "b.jsonl", ROWS[10:20])
    write_csv(d / "a.csv", ROWS[:10])
    write_parquet(d / "sub" / "c.parquet", ROWS[20:])
    (d / "_SUCCESS").write_text("")
    (d / ".hidden.jsonl").write_text("garbage\n")
    (d / "README.md").write_text("not data")
    files = resolve_inputs(str(d))
    assert [f.name for f in files] == ["a.csv", "b.jsonl", "sub/c.parquet"]
    rows = _rows(files)
    assert [r.position.row for r in rows] == list(range(25))
    assert [r.position.file_index for r in rows] == [0] * 10 + [1] * 10 + [2] * 5
    assert [r.position.row_index for r in rows][10:12] == [0, 1]
    assert [r.data["text"] for r in rows] == [f"t{i}" for i in range(25)]

    files = resolve_inputs(str(d / "[ab].*"))
    assert [f.name for f in files] == ["a.csv", "b.jsonl"]
    with pytest.raises(InvalidRequestError, match="README.md"):  # a glob names its files: no silent skipping
        resolve_inputs(str(d / "*.*"))
    files = resolve_inputs(str(d / "**" / "*.parquet"))
    assert [f.name for f in files] == ["sub/c.parquet"]


def test_resolve_errors(tmp_path):
    with pytest.raises(InvalidRequestError, match="no such file"):
        resolve_inputs(str(tmp_path / "nope.jsonl"))
    with pytest.raises(InvalidRequestError, match="matches no files"):
        resolve_inputs(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(InvalidRequestError) as e:
        resolve_inputs(str(tmp_path / "x.txt"))
    assert e.value.field == "input_format"
    assert resolve_inputs(str(tmp_path / "x.txt"), "jsonl")[0].format == "jsonl"


def test_jsonl_bad_lines_become_error_rows(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"text": "a"}\n\n{bad\n[1, 2]\n{"text": "\xff\xfe"}\n{"text": "b"}\n')
    rows = _rows(resolve_inputs(str(p)))
    assert [r.position.row for r in rows] == [0, 1, 2, 3, 4]  # the blank line is not a row
    assert rows[0].data == {"text": "a"} and rows[4].data == {"text": "b"}
    assert rows[1].error.startswith("line 3: invalid JSON")
    assert rows[2].error == "line 4: expected a JSON object, got list"
    assert rows[3].error.startswith("line 5: invalid JSON")


def test_json_array_file_is_refused(tmp_path):
    p = tmp_path / "in.json"
    p.write_text('[{"text": "a"}]')
    with pytest.raises(InvalidRequestError, match="JSON array"):
        _rows(resolve_inputs(str(p)))


def test_csv_bad_rows_and_long_fields(tmp_path):
    p = tmp_path / "in.csv"
    long = "x" * 300_000  # over csv's default field limit
    p.write_bytes(b'\xef\xbb\xbfid,text\n1,"multi\nline"\n2,a,extra\n3\n4,"' + long.encode() + b'"\n5,\xff\n6,ok\n')
    rows = _rows(resolve_inputs(str(p)))
    assert [r.position.row for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[0].data == {"id": "1", "text": "multi\nline"}  # BOM stripped from the header
    assert rows[1].error == "line 4: expected 2 fields, found 3"
    assert rows[2].error == "line 5: expected 2 fields, found 1"
    assert rows[3].data["text"] == long
    assert rows[4].error == "line 7: invalid UTF-8"
    assert rows[5].data == {"id": "6", "text": "ok"}


def test_gzip_jsonl(tmp_path):
    p = tmp_path / "in.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"text": "a"}\n{"text": "b"}\n')
    files = resolve_inputs(str(tmp_path))
    assert [r.data["text"] for r in _rows(files)] == ["a", "b"]


# -- files that cannot be read at all: one input error naming the file, not a library's trace ----


def _input_error(call) -> str:
    with pytest.raises(InvalidRequestError) as info:
        call()
    assert info.value.field == "input"
    return info.value.reason


def _each_reader_refuses(path, needle: str) -> None:
    """probe (run before a model loads), the row count and the rows themselves all name the file."""
    files = resolve_inputs(str(path))
    calls = [lambda: probe_columns(files[0]), lambda: _rows(files)]
    if files[0].format == "parquet":
        calls.append(lambda: count_rows(files))
    for call in calls:
        reason = _input_error(call)
        assert reason.startswith(f"{str(path)!r}: "), reason
        assert needle in reason, reason


def test_random_bytes_are_not_parquet(tmp_path):
    p = tmp_path / "in.parquet"
    p.write_bytes(bytes(range(256)) * 20)
    _each_reader_refuses(p, "is not a readable Parquet file (Parquet magic bytes not found in footer.")
    assert _input_error(lambda: _rows(resolve_inputs(str(p)))).endswith(
        "write or fetch it again, or leave it out of the input")


def test_truncated_parquet_is_refused(tmp_path):
    p = write_parquet(tmp_path / "in.parquet", ROWS, row_group_size=5)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # the footer (schema, row groups) is gone
    _each_reader_refuses(p, "is not a readable Parquet file (Parquet magic bytes not found in footer.")
    p.write_bytes(b"")
    _each_reader_refuses(p, "is not a readable Parquet file (Parquet file size is 0 bytes)")


def test_damaged_parquet_row_group_stops_after_the_good_ones(tmp_path):
    import pyarrow.parquet as pq

    p = write_parquet(tmp_path / "in.parquet", ROWS, row_group_size=10)
    column = pq.ParquetFile(p).metadata.row_group(2).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(p.read_bytes())
    data[start : start + 16] = b"\xff" * 16  # the third row group's first page header
    p.write_bytes(bytes(data))
    files = resolve_inputs(str(p))
    assert probe_columns(files[0]) == ["id", "text", "n"] and count_rows(files) == 25  # the footer is whole
    seen = []
    with pytest.raises(InvalidRequestError) as info:
        for row in iter_rows(files):
            seen.append(row.data["id"])
    assert seen == [f"d{i}" for i in range(20)]
    assert info.value.field == "input"
    assert info.value.reason.startswith(f"{str(p)!r}: is not a readable Parquet file (")


def test_jsonl_line_that_is_not_json_names_its_line(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"id": 1, "text": "a"}\n\nnot json at all\n{"id": 3, "text": }\n{"id": 4, "text": "b"}\n')
    rows = _rows(resolve_inputs(str(p)))
    assert [r.error for r in rows] == [
        None,
        "line 3: invalid JSON: Expecting value at column 1",
        "line 4: invalid JSON: Expecting value at column 19",
        None,
    ]
    assert rows[3].data == {"id": 4, "text": "b"}


NOT_JSONL = "line 1 holds binary data (a NUL byte), so this is not UTF-8 JSON Lines"


@pytest.mark.parametrize(
    "name, make, needle",
    [
        ("in.jsonl", lambda parquet: parquet, NOT_JSONL),  # a Parquet file with the wrong extension
        ("in.jsonl", lambda _: '{"id": 1, "text": "a"}\n'.encode("utf-16-le"), NOT_JSONL),
        ("in.csv", lambda _: "id,text\n1,a\n".encode("utf-16-le"),
         "the CSV header holds binary data (a NUL byte), so this is not CSV text"),
        ("in.csv", lambda _: b"id,te\rxt\n1,a\n",
         "cannot read the CSV header: new-line character seen in unquoted field"),
        ("in.csv", lambda _: b"id,t\xe9xt\n1,a\n", "the CSV header is not valid UTF-8; save the file as UTF-8"),
    ],
)
def test_binary_data_is_not_jsonl_or_csv(tmp_path, name, make, needle):
    parquet = write_parquet(tmp_path / "real.parquet", ROWS).read_bytes()
    p = tmp_path / "bin" / name
    p.parent.mkdir()
    p.write_bytes(make(parquet))
    _each_reader_refuses(p, needle)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_damaged_gzip_is_refused(tmp_path, fmt):
    body = "".join(f'{{"id": {i}, "text": "{"x" * 50}"}}\n' for i in range(2000))
    if fmt == "csv":
        body = "id,text\n" + "".join(f"{i},{'x' * 50}\n" for i in range(2000))
    packed = gzip.compress(body.encode())
    p = tmp_path / f"in.{fmt}.gz"
    p.write_bytes(packed[: len(packed) // 2])
    what = "JSON Lines" if fmt == "jsonl" else "CSV"
    reason = _input_error(lambda: _rows(resolve_inputs(str(p))))
    assert reason == (f"{str(p)!r}: is not a readable {what} file (Compressed file ended before the end-of-stream "
                      "marker was reached): write or fetch it again, or leave it out of the input")
    p.write_bytes(b"not gzip at all\n")
    _each_reader_refuses(p, f"is not a readable {what} file (Not a gzipped file (b'no'))")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_file_gone_after_listing_is_named(tmp_path, fmt):
    writer = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[fmt]
    p = writer(tmp_path / f"in.{fmt}", ROWS)
    files = resolve_inputs(str(p))
    p.unlink()
    assert _input_error(lambda: _rows(files)) == f"{str(p)!r}: cannot be read: No such file or directory"
