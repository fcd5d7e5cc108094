"""Memory stays bounded on inputs much larger than the configured buffers.

Each test reads an input at least ten times larger than what the job may hold, and
asserts a peak far below the input's size: a reader or runner that loaded the whole file
(or kept all results until the end) would fail.
"""

from __future__ import annotations

import json
import tracemalloc

import pyarrow as pa
import pytest
from jobs_fake import write_parquet

from prefillonly.jobs import JobSpec, run_job
from prefillonly.jobs.readers import iter_batches, resolve_inputs

ROWS = 20_000
TEXT = 1_000  # bytes of text per row: ~20 MB of input
BATCH = 100
BUFFER = 1_000  # max_buffered_rows: the input is 20x larger
MiB = 1 << 20


def _text(i: int) -> str:
    return (f"{i:07d} " * (TEXT // 8 + 1))[:TEXT]


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "big.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": _text(i), "other": "x" * 200}) + "\n" for i in range(ROWS))
    return path


def _traced_peak(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reader_holds_one_batch(big_jsonl):
    size = big_jsonl.stat().st_size
    files = resolve_inputs(str(big_jsonl))

    def consume():
        n = 0
        for batch in iter_batches(files, BATCH, columns=["text"]):
            assert len(batch) <= BATCH
            n += len(batch)
        assert n == ROWS

    peak = _traced_peak(consume)
    # one batch is ~100 KB of text; the file is ~24 MB (and ~40 MB as Python dicts)
    assert size > 20 * MiB
    assert peak < 3 * MiB, f"reader peak {peak / MiB:.1f} MiB for a {size / MiB:.0f} MiB file"


@pytest.mark.parametrize("out_fmt", ["jsonl", "parquet"])
def test_job_memory_bounded(big_jsonl, tmp_path, out_fmt):
    spec = JobSpec(
        input=str(big_jsonl),
        output=str(tmp_path / "out"),
        task="embed",
        prompt="passage: {text}",
        output_format=out_fmt,
        rows_per_shard=5_000,
        batch_rows=BATCH,
        max_buffered_rows=BUFFER,
    )
    arrow_peak = 0

    def proc(requests):
        nonlocal arrow_peak
        arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        return [{"embedding": [0.25] * 64, "n_chars": len(r["text"])} for r in requests]

    summary = None

    def run():
        nonlocal summary
        summary = run_job(spec, proc, progress=False, fsync=False)

    peak = _traced_peak(run)
    assert summary.rows == ROWS and summary.errors == 0
    # Held at most: a couple of input batches (~100 KB each) plus BUFFER results
    # (64 floats as Python objects: ~3 KB each, ~3 MB); a job holding a shard's worth
    # of results (5,000 rows) or the input would go far past this.
    assert peak < 10 * MiB, f"job peak {peak / MiB:.1f} MiB"
    assert arrow_peak < 8 * MiB, f"arrow memory {arrow_peak / MiB:.1f} MiB"


def test_parquet_reader_memory_bounded(tmp_path):
    """Parquet is read one row group batch at a time; Arrow memory stays near one row group."""
    rows = [{"text": _text(i)} for i in range(ROWS)]
    path = write_parquet(tmp_path / "big.parquet", rows, row_group_size=1_000)
    del rows
    files = resolve_inputs(str(path))
    base = pa.total_allocated_bytes()
    arrow_peak = 0

    def consume():
        nonlocal arrow_peak
        n = 0
        for batch in iter_batches(files, BATCH, columns=["text"]):
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - base)
            n += len(batch)
        assert n == ROWS

    peak = _traced_peak(consume)
    # the decoded column is ~20 MB; one row group of it is ~1 MB
    assert peak < 3 * MiB, f"python peak {peak / MiB:.1f} MiB"
    assert arrow_peak < 4 * MiB, f"arrow memory {arrow_peak / MiB:.1f} MiB"
