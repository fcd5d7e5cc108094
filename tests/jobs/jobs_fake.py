"""Test helpers for prefillonly.jobs: a fake processor, input writers, output readers.

Also runnable as a script (``python jobs_fake.py JOB_FILE [SLEEP_S]``) so tests can run a
job in a subprocess and SIGKILL it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

LABELS = ["positive", "negative", "neutral"]


class FakeProcessor:
    """Deterministic results from the prompt text; "empty text" for blank prompts.

    ``sleep_s`` per call makes a run slow enough for a kill to land mid-run.
    """

    def __init__(self, sleep_s: float = 0.0, labels: list[str] | None = None) -> None:
        self.sleep_s = sleep_s
        self.labels = labels or LABELS
        self.calls = 0
        self.rows = 0
        self.max_batch = 0

    def __call__(self, requests: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
        self.calls += 1
        self.rows += len(requests)
        self.max_batch = max(self.max_batch, len(requests))
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return [self.one(r) for r in requests]

    def one(self, request: dict[str, Any]) -> dict[str, Any] | str:
        text = request.get("text")
        if text is None:
            text = json.dumps(request["messages"])
        if not text.strip():
            return "empty text"
        h = zlib.crc32(text.encode("utf-8"))
        weights = [((h >> (8 * i)) & 0xFF) + 1.0 for i in range(len(self.labels))]
        total = sum(weights)
        probs = {label: w / total for label, w in zip(self.labels, weights)}
        label = max(probs, key=probs.__getitem__)
        embedding = [math.sin(h % 1000 + i) for i in range(8)]
        return {"label": label, "probs": probs, "embedding": embedding, "_tokens": len(text.split())}


def text_for(i: int) -> str:
    return f"row {i} says {'good' if i % 3 else 'bad'} things"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int = 1000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def read_output(out_dir: Path) -> tuple[dict[Any, dict[str, Any]], dict[Any, dict[str, Any]]]:
    """(results by id, errors by id) from committed shards; asserts no id appears twice."""
    import pyarrow.parquet as pq

    results: dict[Any, dict[str, Any]] = {}
    errors: dict[Any, dict[str, Any]] = {}
    out_dir = Path(out_dir)
    for name in sorted(os.listdir(out_dir)):
        if not name.startswith("part-"):
            continue
        if name.endswith(".parquet"):
            rows = pq.read_table(out_dir / name).to_pylist()
        else:
            with open(out_dir / name, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
        for row in rows:
            assert row["id"] not in results, f"duplicate result id {row['id']!r} in {name}"
            results[row["id"]] = row
        err_path = out_dir / "_errors" / (name.rsplit(".", 1)[0] + ".jsonl")
        if err_path.exists():
            with open(err_path, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    assert rec["id"] not in errors, f"duplicate error id {rec['id']!r}"
                    errors[rec["id"]] = rec
    assert not set(results) & set(errors), "a row is both a result and an error"
    return results, errors


def main() -> None:
    from prefillonly.jobs import JobSpec, run_job

    spec = JobSpec.from_file(sys.argv[1])
    sleep_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    summary = run_job(spec, FakeProcessor(sleep_s=sleep_s), progress=False)
    print(summary)


if __name__ == "__main__":
    main()
