"""``prefillonly run --ray`` on a local Ray instance matches the single-process output exactly.

Same shard files, ids, positions, values and error rows; resumable per shard, also across
the two runners. The engine is a tiny random Qwen3 on CPU (two CPU engine actors).
"""

from __future__ import annotations

import csv
import filecmp
import os
import sys
from pathlib import Path

import pytest
from jobs_fake import read_output, write_jsonl, write_parquet
from test_engine_jobs import EMPTY, LONG, MAX_LEN, MODEL, NULL, ROWS, assert_same_output

from prefillonly.cli import main
from prefillonly.errors import PrefillOnlyError
from prefillonly.jobs import JobSpec
from prefillonly.jobs.local import run_local

N = len(ROWS)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The same rows as test_engine_jobs, split over a JSONL, a CSV and a Parquet file
    (several row groups), so global positions continue across files and formats."""
    d = tmp_path_factory.mktemp("ray_in")
    write_jsonl(d / "multi" / "a.jsonl", ROWS[:90])
    with open(d / "multi" / "b.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text"])
        w.writeheader()
        w.writerows(ROWS[90:160])  # (no null text in these rows: CSV could not tell it from "")
    write_parquet(d / "multi" / "c.parquet", ROWS[160:], row_group_size=30)
    write_jsonl(d / "one.jsonl", ROWS)
    return d


def spec(input_path: Path, out: Path, model_dir: str, **kw) -> JobSpec:
    base = {
        "input": str(input_path), "output": str(out), "task": "classify", "prompt": "{text}",
        "task_options": {"labels": ["positive", "negative"]}, "model": model_dir,
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": MAX_LEN},
        "rows_per_shard": 64, "batch_rows": 16,
    }
    return JobSpec(**{**base, **kw})


def same_files(a: Path, b: Path) -> None:
    """Byte for byte the same shards and error files (the values checked apart, within 1e-6)."""
    names = sorted(n for n in os.listdir(a) if n.startswith("part-"))
    assert names == sorted(n for n in os.listdir(b) if n.startswith("part-"))
    assert sorted(os.listdir(a / "_errors")) == sorted(os.listdir(b / "_errors"))
    for name in os.listdir(a / "_errors"):
        assert filecmp.cmp(a / "_errors" / name, b / "_errors" / name, shallow=False), name
    assert (a / "_job.json").read_text() == (b / "_job.json").read_text()
    assert_same_output(a, b)


def test_ray_cli_matches_single_process_and_resumes(ray_local, inputs, tiny_path, tmp_path):
    model_dir = str(tiny_path(MODEL))
    local = tmp_path / "local"
    run_local(spec(inputs / "multi", local, model_dir), progress=False)

    out = tmp_path / "ray"
    args = [
        "run", "--ray", "--data-parallel", "2", "--input", str(inputs / "multi"), "--output", str(out),
        "--task", "classify", "--labels", "positive", "negative", "--prompt", "{text}", "--model", model_dir,
        "--device", "cpu", "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--rows-per-shard", "64",
        "--batch-rows", "16", "--no-progress",
    ]
    assert main(args) == 0
    assert ray_local.is_initialized()  # the caller's Ray instance is used and left running
    same_files(local, out)
    results, errors = read_output(out)
    assert len(results) + len(errors) == N
    assert {e["position"]: e["id"] for e in errors.values()} == {i: f"doc-{i}" for i in (EMPTY, LONG, NULL)}
    files = {e["position"]: (e["file"], e["row_index"]) for e in errors.values()}
    assert files == {EMPTY: ("a.jsonl", EMPTY), LONG: ("b.csv", LONG - 90), NULL: ("c.parquet", NULL - 160)}

    # Resume: a lost shard is recomputed by Ray, another by the local runner; same output.
    os.remove(out / "part-000001.parquet")
    assert main(args) == 0
    same_files(local, out)
    os.remove(out / "part-000003.parquet")
    s = run_local(spec(inputs / "multi", out, model_dir), progress=False)
    assert (s.shards_written, s.shards_already_done) == (1, 3)
    same_files(local, out)


def test_ray_one_jsonl_file_embed_to_jsonl(ray_local, inputs, tiny_path, tmp_path):
    """One JSONL file (its length unknown up front: one sequential read, re-blocked by Ray) to JSONL output."""
    from prefillonly.jobs.ray_job import run_ray

    model_dir = str(tiny_path(MODEL))
    kw = {"task": "embed", "task_options": {"dimensions": 16}, "output_format": "jsonl"}
    local, out = tmp_path / "local", tmp_path / "ray"
    run_local(spec(inputs / "one.jsonl", local, model_dir, **kw), progress=False)
    summary = run_ray(spec(inputs / "one.jsonl", out, model_dir, **kw), num_workers=2, progress=False)
    assert (summary.rows, summary.errors, summary.shards_written) == (N, 3, 4)
    assert summary.tokens > 0
    same_files(local, out)
    for name in os.listdir(out):
        if name.startswith("part-"):
            assert filecmp.cmp(local / name, out / name, shallow=False), name


def test_ray_job_error_is_a_prefillonly_error(ray_local, inputs, tiny_path, tmp_path):
    """An error that stops the job inside an engine actor reaches the driver with its own message."""
    from prefillonly.jobs.ray_job import run_ray

    job = spec(inputs / "one.jsonl", tmp_path / "out", str(tiny_path(MODEL)), task="embed",
               task_options={"dimensions": 4096})
    with pytest.raises(PrefillOnlyError, match=r"^dimensions: must be an int in \[1, 32\]( \(the hidden size\))?; got 4096$"):
        run_ray(job, num_workers=1, progress=False)
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(("part-", ".part-"))]


def test_ray_missing_says_how_to_install(monkeypatch, inputs, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    args = ["run", "--ray", "--input", str(inputs / "one.jsonl"), "--output", str(tmp_path / "o"), "--task", "embed",
            "--prompt", "{text}", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ray: --ray needs Ray Data; install it with pip install 'prefillonly[ray]'")
    assert "Traceback" not in err
