"""A real SIGKILL mid-run, twice, then the same command again: every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobs_fake import LABELS, FakeProcessor, read_output, text_for, write_jsonl

from prefillonly.jobs import JobSpec, run_job

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("jobs_fake.py")
N = 10_000
SHARD = 500  # 20 shards


def _committed(out: Path) -> int:
    try:
        return sum(1 for n in os.listdir(out) if n.startswith("part-") and n.endswith(".parquet"))
    except FileNotFoundError:
        return 0


def _start(job_file: Path, sleep_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(HELPER), str(job_file), str(sleep_s)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_after(proc: subprocess.Popen, out: Path, shards: int, timeout: float = 60) -> int:
    """SIGKILL the job once ``shards`` shards are committed; returns how many were."""
    deadline = time.monotonic() + timeout
    while _committed(out) < shards:
        if proc.poll() is not None:
            pytest.fail(f"job ended before it could be killed (rc={proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("job made no progress")
        time.sleep(0.005)
    time.sleep(0.037)  # land somewhere inside the next shard, not on a boundary
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()
    return _committed(out)


def test_sigkill_mid_run_then_rerun_gives_every_row_once(tmp_path):
    rows = []
    for i in range(N):
        rows.append({"id": f"doc-{i:05d}", "text": "" if i % 97 == 0 else text_for(i)})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with open(src, "a") as f:  # one malformed line: a row too, it must land in the errors once
        f.write('{"id": "broken", "text": \n')
    job = {
        "input": str(src),
        "task": "classify",
        "prompt": "{text}",
        "task_options": {"labels": LABELS},
        "rows_per_shard": SHARD,
        "batch_rows": 100,
        "max_buffered_rows": 200,
    }

    ref = tmp_path / "ref"
    run_job(JobSpec(**job, output=str(ref)), FakeProcessor(), progress=False)

    out = tmp_path / "out"
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({**job, "output": str(out)}))

    # 100 batches of 100 rows, 20 ms each: ~2 s of work, 5 batches per shard.
    first = _kill_after(_start(job_file, 0.02), out, shards=3)
    assert 3 <= first < 20
    second = _kill_after(_start(job_file, 0.02), out, shards=first + 4)
    assert first < second < 20
    leftovers = [n for n in os.listdir(out) if n.endswith(".tmp")]

    final = _start(job_file, 0.02)
    stdout, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr
    assert "already done" in stdout
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], f"temp files left (had {leftovers})"
    assert _committed(out) == 21  # 10,001 rows

    results, errors = read_output(out)
    ref_results, ref_errors = read_output(ref)
    all_ids = {r["id"] for r in rows}
    assert len(results) + len(errors) == N + 1
    assert set(results) | {e for e in errors if e != 10_000} == all_ids
    assert errors[10_000]["reason"].startswith("line 10001: invalid JSON")  # unreadable row: id = its position
    assert results == ref_results
    assert errors == ref_errors
