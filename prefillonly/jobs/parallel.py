"""``--data-parallel N``: one engine process per GPU, each owning every N-th shard.

Workers write their own shards into the same output directory; the set of
shards is the output, so there is no merge step, and a resumed run may use a
different N.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import time
from dataclasses import asdict, fields
from typing import Any

from ..errors import PrefillOnlyError
from .engine_processor import check_job
from .runner import JobSummary
from .spec import JobSpec


def worker_device(rank: int, device: str | None) -> str | None:
    """GPU ``rank`` when running on CUDA; CPU workers share the CPU."""
    import torch

    if device not in (None, "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{rank % torch.cuda.device_count()}"


def _share_cpu(world: int, device: str | None) -> None:
    """CPU workers split the cores instead of each starting one thread per core."""
    import torch

    if device not in (None, "cpu") and not str(device).startswith("cpu"):
        return
    if device is None and torch.cuda.is_available():
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def _worker(rank: int, world: int, spec_dict: dict, progress: bool, out: mp.Queue) -> None:
    try:
        from .local import run_local

        spec = JobSpec.from_dict(spec_dict)
        _share_cpu(world, spec.engine.get("device"))
        summary = run_local(spec, progress=progress and rank == 0, rank=rank, world=world)
        out.put((rank, asdict(summary), None, False))
    except BaseException as e:  # noqa: BLE001 - report, don't hang the parent
        if isinstance(e, PrefillOnlyError):
            out.put((rank, None, str(e), True))
        else:
            out.put((rank, None, f"{type(e).__name__}: {e}", False))


def run_data_parallel(spec: JobSpec, world: int, progress: bool = True) -> JobSummary:
    from .local import check_input

    check_job(spec)  # fail here, once, rather than in every worker
    check_input(spec)
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    queue: mp.Queue = ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(r, world, spec.to_dict(), progress, queue)) for r in range(world)]
    for p in procs:
        p.start()
    reports: dict[int, Any] = {}
    failures: list[tuple[int, str, bool]] = []

    def receive(timeout: float) -> None:
        rank, summary, error, expected = queue.get(timeout=timeout)
        reports[rank] = summary
        if error:
            failures.append((rank, error, expected))

    try:
        while len(reports) < world:
            try:
                receive(1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in reports and p.exitcode is not None]
                if not dead:
                    continue
                try:  # a worker that reported just before exiting: its report is in the pipe
                    receive(2.0)
                    continue
                except queue_mod.Empty:
                    pass
                for r in dead:
                    reports[r] = None
                    failures.append((r, f"exited with code {procs[r].exitcode} without a report", False))
    finally:
        for p in procs:
            if len(reports) < world and p.is_alive():
                p.terminate()
            p.join()
    if failures:
        failures.sort()
        expected = [f for f in failures if f[2]]
        if expected:  # a bad input or setting: the same message as a single-process run
            raise PrefillOnlyError(expected[0][1])
        raise RuntimeError(
            "data-parallel job failed; rerun the same command to resume. "
            + "; ".join(f"worker {r}: {msg}" for r, msg, _ in failures)
        )
    total = JobSummary(output=spec.output)
    for summary in reports.values():
        for f in fields(JobSummary):
            if f.name not in ("output", "wall_s", "rows_skipped"):
                setattr(total, f.name, getattr(total, f.name) + summary[f.name])
    total.wall_s = time.perf_counter() - start
    return total
