from __future__ import annotations

import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobs_fake import (
    LABELS,
    FakeProcessor,
    read_output,
    text_for,
    write_csv,
    write_jsonl,
    write_parquet,
)

from prefillonly.errors import InvalidRequestError
from prefillonly.jobs import JobSpec, run_job
from prefillonly.jobs import writers as writers_mod

N = 1000
ROWS = [{"id": f"d{i}", "text": text_for(i) if i % 50 else ""} for i in range(N)]  # every 50th is empty


def make_spec(input_path, out, **kw) -> JobSpec:
    base = {
        "input": str(input_path),
        "output": str(out),
        "task": "classify",
        "prompt": "{text}",
        "task_options": {"labels": LABELS},
        "rows_per_shard": 128,
        "batch_rows": 50,
        "max_buffered_rows": 100,
    }
    return JobSpec(**{**base, **kw})


def check_complete(out, ids, expect_errors=None):
    results, errors = read_output(out)
    assert set(results) | set(errors) == set(ids)
    assert len(results) + len(errors) == len(ids)
    if expect_errors is not None:
        assert set(errors) == set(expect_errors)
    return results, errors


@pytest.mark.parametrize("in_fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("out_fmt", ["parquet", "jsonl"])
def test_formats_give_same_results(tmp_path, in_fmt, out_fmt):
    writer = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[in_fmt]
    path = writer(tmp_path / f"in.{in_fmt}", ROWS, **({"row_group_size": 300} if in_fmt == "parquet" else {}))
    proc = FakeProcessor()
    summary = run_job(make_spec(path, tmp_path / "out", output_format=out_fmt), proc, progress=False)
    assert (summary.rows, summary.results, summary.errors) == (N, N - 20, 20)
    assert summary.shards_written == 8 and summary.tokens > 0
    assert proc.max_batch <= 50
    results, errors = check_complete(tmp_path / "out", [r["id"] for r in ROWS], [f"d{i}" for i in range(0, N, 50)])
    assert all(e["reason"] == "empty text" for e in errors.values())
    assert errors["d50"]["position"] == 50 and errors["d50"]["file"] == f"in.{in_fmt}"
    r7 = results["d7"]
    expected = FakeProcessor().one({"text": text_for(7)})
    assert r7["position"] == 7 and r7["label"] == expected["label"]
    assert r7["probs"] == pytest.approx(expected["probs"])
    assert r7["embedding"] == pytest.approx(expected["embedding"], abs=1e-6)
    assert "_tokens" not in r7
    if out_fmt == "parquet":
        table = pq.read_table(tmp_path / "out")  # the directory reads as one dataset
        assert table.num_rows == N - 20
        assert table.schema.field("id").type == pa.string()
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 8)
        assert pa.types.is_struct(table.schema.field("probs").type)
        assert [f.name for f in table.schema.field("probs").type] == LABELS
        assert "probs.positive" in table.flatten().column_names


def test_directory_and_glob_inputs_default_ids(tmp_path):
    rows = [{"text": text_for(i)} for i in range(300)]  # no id column: ids are global row numbers
    d = tmp_path / "data"
    write_jsonl(d / "part-0.jsonl", rows[:100])
    write_csv(d / "part-1.csv", rows[100:170])
    write_parquet(d / "part-2.parquet", rows[170:], row_group_size=40)
    run_job(make_spec(d, tmp_path / "out_dir", rows_per_shard=64), FakeProcessor(), progress=False)
    results, _ = check_complete(tmp_path / "out_dir", range(300), [])
    assert all(results[i]["position"] == i for i in range(300))
    assert results[150]["label"] == FakeProcessor().one({"text": text_for(150)})["label"]

    run_job(make_spec(d / "part-*", tmp_path / "out_glob", output_format="jsonl"), FakeProcessor(), progress=False)
    results2, _ = check_complete(tmp_path / "out_glob", range(300), [])
    assert {k: v["label"] for k, v in results2.items()} == {k: v["label"] for k, v in results.items()}


def test_malformed_rows_go_to_errors_and_job_continues(tmp_path):
    p = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "text": text_for(i), "title": "t"}) for i in range(40)]
    lines[3] = '{"id": 3, "text": broken'
    lines[5] = json.dumps({"id": 5, "text": "", "title": "t"})
    lines[7] = json.dumps({"id": 7, "title": "t"})  # no text column
    lines[9] = json.dumps({"id": 9, "text": None, "title": "t"})
    lines[11] = json.dumps({"text": "no id", "title": "t"})
    p.write_text("\n".join(lines) + "\n")
    spec = make_spec(p, tmp_path / "out", prompt="{title}|{text}", rows_per_shard=16, batch_rows=8, max_buffered_rows=8)

    class Proc(FakeProcessor):
        def one(self, request):
            return "empty text" if request["text"].endswith("|") else super().one(request)

    summary = run_job(spec, Proc(), progress=False)
    assert summary.rows == 40 and summary.errors == 5
    _, errors = check_complete(tmp_path / "out", list(range(40)), [3, 5, 7, 9, 11])
    assert errors[3]["reason"] == "line 4: invalid JSON: Expecting value at column 19"
    assert errors[3]["file"] == "in.jsonl" and errors[3]["row_index"] == 3
    assert errors[5]["reason"] == "empty text"
    assert errors[7]["reason"] == "missing column 'text' used by the prompt template"
    assert errors[9]["reason"] == "column 'text' is null; the prompt template needs it"
    assert errors[11]["reason"] == "missing id: column 'id' is absent or empty"
    assert errors[11]["position"] == 11 and errors[11]["row_index"] == 11


def test_unknown_template_column_fails_before_running(tmp_path):
    p = write_jsonl(tmp_path / "in.jsonl", ROWS)
    with pytest.raises(InvalidRequestError) as e:
        run_job(make_spec(p, tmp_path / "out", prompt="{body}"), FakeProcessor(), progress=False)
    assert e.value.field == "prompt"
    assert "'body'" in str(e.value) and "id, text" in str(e.value)
    assert not (tmp_path / "out").exists() or not any(n.startswith("part-") for n in os.listdir(tmp_path / "out"))


def test_resume_with_different_spec_is_refused(tmp_path):
    p = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out"
    run_job(make_spec(p, out), FakeProcessor(), progress=False)
    with pytest.raises(InvalidRequestError) as e:
        run_job(make_spec(p, out, prompt="Text: {text}"), FakeProcessor(), progress=False)
    assert e.value.field == "output"
    assert 'prompt: "{text}" -> "Text: {text}"' in str(e.value) and "new output directory" in str(e.value)
    with pytest.raises(InvalidRequestError, match="rows_per_shard: 128 -> 64"):
        run_job(make_spec(p, out, rows_per_shard=64), FakeProcessor(), progress=False)
    with pytest.raises(InvalidRequestError, match="model"):
        run_job(make_spec(p, out, model="other/model"), FakeProcessor(), progress=False)
    with open(p, "a") as f:
        f.write(json.dumps({"id": "new", "text": "x"}) + "\n")
    with pytest.raises(InvalidRequestError, match="input files changed: in.jsonl"):
        run_job(make_spec(p, out), FakeProcessor(), progress=False)
    # batch sizes may change between runs
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    s = run_job(make_spec(p, out, batch_rows=10, max_buffered_rows=10), FakeProcessor(), progress=False)
    assert s.rows == 0 and s.shards_already_done == 8


@pytest.mark.parametrize("layout", ["parquet", "mixed_dir"])
@pytest.mark.parametrize("crash_call", [1, 7, 12])
def test_crash_mid_shard_then_resume_exactly_once(tmp_path, layout, crash_call):
    if layout == "parquet":
        src = write_parquet(tmp_path / "in.parquet", ROWS, row_group_size=100)
    else:  # shards span files of different formats
        src = tmp_path / "data"
        write_csv(src / "a.csv", ROWS[:150])
        write_jsonl(src / "b.jsonl", ROWS[150:420])
        write_parquet(src / "c.parquet", ROWS[420:], row_group_size=90)
    ref = tmp_path / "ref"
    run_job(make_spec(src, ref), FakeProcessor(), progress=False)
    out = tmp_path / "out"
    spec = make_spec(src, out)

    class Crash(FakeProcessor):
        def __call__(self, requests):
            if self.calls == crash_call:  # call 7 is mid shard 2 (rows 350..399)
                raise RuntimeError("engine died")
            return super().__call__(requests)

    with pytest.raises(RuntimeError, match="engine died"):
        run_job(spec, Crash(), progress=False)
    committed = sorted(n for n in os.listdir(out) if n.startswith("part-"))
    assert len(committed) == crash_call * 50 // 128
    assert not [n for n in os.listdir(out) + os.listdir(out / "_errors") if n.endswith(".tmp")]  # aborted shard removed

    proc = FakeProcessor()
    summary = run_job(spec, proc, progress=False)
    done_rows = 128 * len(committed)
    assert summary.shards_already_done == len(committed) and summary.rows_skipped == done_rows
    assert proc.rows == summary.rows == N - done_rows  # committed rows were not processed again
    results, errors = check_complete(out, [r["id"] for r in ROWS])
    assert (results, errors) == read_output(ref)


def test_kill_between_errors_and_data_rename(tmp_path, monkeypatch):
    """The data file is the commit marker: an errors file without it is redone, not duplicated."""
    p = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out"
    spec = make_spec(p, out)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("part-000002.parquet"):
            raise KeyboardInterrupt  # stand-in for a kill right before the commit
        return real_replace(src, dst)

    monkeypatch.setattr(writers_mod.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        run_job(spec, FakeProcessor(), progress=False)
    monkeypatch.setattr(writers_mod.os, "replace", real_replace)
    assert (out / "_errors" / "part-000002.jsonl").exists() and not (out / "part-000002.parquet").exists()
    run_job(spec, FakeProcessor(), progress=False)
    check_complete(out, [r["id"] for r in ROWS], [f"d{i}" for i in range(0, N, 50)])


def test_data_parallel_workers_share_the_output(tmp_path):
    p = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out"
    spec = make_spec(p, out)
    summaries = [None, None]

    def worker(i):
        summaries[i] = run_job(spec, FakeProcessor(sleep_s=0.001), progress=False, shard_filter=lambda k: k % 2 == i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert summaries[0].shards_written == 4 and summaries[1].shards_written == 4
    assert summaries[0].rows + summaries[1].rows == N
    check_complete(out, [r["id"] for r in ROWS])


def test_messages_column_and_images(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    rows = [
        {"id": 0, "messages": msgs, "img": "a.png"},
        {"id": 1, "messages": json.dumps(msgs), "img": "b.png"},  # JSON text is accepted too
        {"id": 2, "messages": "not json", "img": "c.png"},
        {"id": 3, "messages": [], "img": "d.png"},
        {"id": 4, "messages": msgs, "img": None},
    ]
    p = write_jsonl(tmp_path / "in.jsonl", rows)
    seen = []

    def proc(requests):
        seen.extend(requests)
        return [{"score": 0.5} for _ in requests]

    spec = make_spec(
        p,
        tmp_path / "out",
        task="score",
        prompt=None,
        messages_column="messages",
        image_columns=["img"],
        task_options={},
    )
    run_job(spec, proc, progress=False)
    assert seen == [
        {"id": 0, "position": 0, "messages": msgs, "images": ["a.png"]},
        {"id": 1, "position": 1, "messages": msgs, "images": ["b.png"]},
    ]
    _, errors = check_complete(tmp_path / "out", range(5), [2, 3, 4])
    assert "not a JSON list" in errors[2]["reason"] and "non-empty list" in errors[3]["reason"]
    assert errors[4]["reason"] == "column 'img' has no image"


def test_processor_contract_is_checked(tmp_path):
    p = write_jsonl(tmp_path / "in.jsonl", ROWS[:10])
    with pytest.raises(ValueError, match="returned 1 results for 10 rows"):
        run_job(make_spec(p, tmp_path / "o1"), lambda reqs: [{}], progress=False)
    with pytest.raises(ValueError, match="reserved key 'id'"):
        run_job(make_spec(p, tmp_path / "o2"), lambda reqs: [{"id": 1}] * len(reqs), progress=False)


def test_progress_bar_and_summary(tmp_path, capsys):
    p = write_parquet(tmp_path / "in.parquet", ROWS)
    summary = run_job(make_spec(p, tmp_path / "out"), FakeProcessor(), progress=True)
    err = capsys.readouterr().err
    assert "/1.00k" in err or "/1000" in err  # total known from the Parquet footer: ETA shown
    assert "errors=20" in err and "tok/s" in err
    text = str(summary)
    assert "1,000 rows (980 results, 20 errors)" in text and "rows/s" in text and "tokens/s" in text


def test_shards_share_one_parquet_schema(tmp_path):
    """A shard whose rows happen to be all null in a column still gets the job's column type."""
    p = write_jsonl(tmp_path / "in.jsonl", [{"text": text_for(i)} for i in range(300)])

    def proc(requests):
        return [{"score": None if r["position"] >= 128 else 0.5, "note": "x"} for r in requests]

    spec = make_spec(
        p, tmp_path / "out", task="score", task_options={}, rows_per_shard=128, batch_rows=64, max_buffered_rows=64
    )
    run_job(spec, proc, progress=False)
    for name in ("part-000001.parquet", "part-000002.parquet"):
        assert pq.read_schema(tmp_path / "out" / name).field("score").type == pa.float64()
    assert pq.read_table(tmp_path / "out").num_rows == 300


def test_output_inside_input_directory(tmp_path):
    d = tmp_path / "data"
    write_jsonl(d / "in.jsonl", ROWS)
    spec = make_spec(d, d / "results", output_format="jsonl")
    run_job(spec, FakeProcessor(), progress=False)
    summary = run_job(spec, FakeProcessor(), progress=False)  # its own shards are not read as input
    assert summary.rows == 0 and summary.shards_already_done == 8
    check_complete(d / "results", [r["id"] for r in ROWS])
