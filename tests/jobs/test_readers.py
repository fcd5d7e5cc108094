from __future__ import annotations

import gzip

import pytest
from jobs_fake import write_csv, write_jsonl, write_parquet

from prefillonly.errors import InvalidRequestError
from prefillonly.jobs.readers import (
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
