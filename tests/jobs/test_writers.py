from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefillonly.jobs.readers import Position
from prefillonly.jobs.writers import ShardWriter, completed_shards, remove_temp_files


def _results():
    return [
        {
            "embedding": np.arange(4, dtype=np.float32) + i,
            "top_logprobs": [{"token": "a", "token_id": 1, "logprob": -0.1}],
            "score": float(i),
            "ids": [1, 2],
        }
        for i in range(5)
    ]


def test_parquet_types_and_atomic_commit(tmp_path):
    (tmp_path / "_errors").mkdir()
    w = ShardWriter(tmp_path, 3, "parquet", max_buffered_rows=2)
    for i, result in enumerate(_results()):
        w.add_result(f"r{i}", 30 + i, result)
    w.add_error("bad", Position(0, 35, 35), "in.jsonl", "empty text")
    # nothing visible before the commit
    assert completed_shards(tmp_path, "parquet") == set()
    assert sorted(os.listdir(tmp_path)) == [".part-000003.parquet.tmp", "_errors"]
    w.commit()
    assert completed_shards(tmp_path, "parquet") == {3}
    assert not [n for n in os.listdir(tmp_path) + os.listdir(tmp_path / "_errors") if n.endswith(".tmp")]
    pf = pq.ParquetFile(tmp_path / "part-000003.parquet")
    assert pf.metadata.num_row_groups == 3  # flushed every max_buffered_rows rows
    table = pf.read()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert table.schema.field("top_logprobs").type == pa.list_(
        pa.struct([("token", pa.string()), ("token_id", pa.int64()), ("logprob", pa.float64())])
    )
    assert table.schema.field("ids").type == pa.list_(pa.int64())
    assert table.column("embedding").to_pylist()[4] == [4.0, 5.0, 6.0, 7.0]
    assert table.column("position").to_pylist() == [30, 31, 32, 33, 34]
    err = json.loads((tmp_path / "_errors" / "part-000003.jsonl").read_text())
    assert err == {"id": "bad", "position": 35, "file": "in.jsonl", "row_index": 35, "reason": "empty text"}


def test_jsonl_output_and_abort(tmp_path):
    (tmp_path / "_errors").mkdir()
    w = ShardWriter(tmp_path, 0, "jsonl")
    for i, result in enumerate(_results()):
        w.add_result(i, i, result)
    w.commit()
    rows = [json.loads(line) for line in (tmp_path / "part-000000.jsonl").read_text().splitlines()]
    assert rows[1]["embedding"] == [1.0, 2.0, 3.0, 4.0] and rows[1]["id"] == 1

    w = ShardWriter(tmp_path, 1, "jsonl")
    w.add_result(9, 9, {"x": 1})
    w.add_error(8, Position(0, 8, 8), "f", "r")
    w.abort()
    assert completed_shards(tmp_path, "jsonl") == {0}
    assert not [n for n in os.listdir(tmp_path) + os.listdir(tmp_path / "_errors") if n.endswith(".tmp")]


def test_remove_temp_files_only_touches_own_shards(tmp_path):
    (tmp_path / "_errors").mkdir()
    for name in (".part-000001.parquet.tmp", ".part-000002.parquet.tmp", "_errors/.part-000001.jsonl.tmp"):
        (tmp_path / name).write_text("partial")
    assert remove_temp_files(tmp_path, lambda k: k % 2 == 1) == 2
    assert os.listdir(tmp_path / "_errors") == []
    assert ".part-000002.parquet.tmp" in os.listdir(tmp_path)
