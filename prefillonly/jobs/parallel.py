"""``--data-parallel N``: one engine process per GPU, each owning every N-th shard.

Workers write their own shards into the same output directory; the set of
shards is the output, so there is no merge step, and a resumed run may use a
different N.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import asdict, fields
from typing import Any

from .runner import JobSummary
from .spec import JobSpec


def worker_device(rank: int, device: str | None) -> str | None:
    """GPU ``rank`` when running on CUDA; CPU workers share the CPU."""
    import torch

    if device not in (None, "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{rank % torch.cuda.device_count()}"


def _worker(rank: int, world: int, spec_dict: dict, progress: bool, out: "mp.Queue") -> None:
    try:
        from .local import run_local

        spec = JobSpec.from_dict(spec_dict)
        summary = run_local(spec, progress=progress and rank == 0, rank=rank, world=world)
        out.put((rank, asdict(summary), None))
    except BaseException as e:  # report, don't hang the parent
        out.put((rank, None, f"{type(e).__name__}: {e}"))


def run_data_parallel(spec: JobSpec, world: int, progress: bool = True) -> JobSummary:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    queue: mp.Queue = ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(r, world, spec.to_dict(), progress, queue)) for r in range(world)]
    for p in procs:
        p.start()
    reports: dict[int, Any] = {}
    failures = []
    while len(reports) < world:
        rank, summary, error = queue.get()
        reports[rank] = summary
        if error:
            failures.append(f"worker {rank}: {error}")
    for p in procs:
        p.join()
    if failures:
        raise RuntimeError("data-parallel job failed; rerun the same command to resume. " + "; ".join(failures))
    total = JobSummary(output=spec.output)
    for summary in reports.values():
        for f in fields(JobSummary):
            if f.name not in ("output", "wall_s", "rows_skipped"):
                setattr(total, f.name, getattr(total, f.name) + summary[f.name])
    total.wall_s = time.perf_counter() - start
    return total
