"""CPU work on images (hashing, preprocessing) in worker threads, ahead of the GPU, behind a bounded window.

Resizing, normalising and patchifying images is CPU work that would leave the
GPU idle if it ran when a step needs its pixels. PIL, numpy and hashlib release
the GIL for the heavy parts, so threads give real parallelism without pickling
images between processes. :func:`prefetch` processes the images of the next
few steps while the current one runs: at most ``ahead`` steps beyond the one
being consumed are in flight, so the pixel memory held stays within a few
steps' worth however long the input is, and an item whose work raised comes
back as that exception, so that one bad image fails alone.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["default_workers", "shared_executor", "prefetch"]

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 16  # a 448 px image takes a few ms; 16 threads preprocess a full step well inside its GPU time

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def default_workers() -> int:
    """Worker threads for image work: the CPUs this process may use, at most :data:`MAX_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))  # a container's CPU set, not the host's count
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


def shared_executor() -> ThreadPoolExecutor:
    """The process-wide pool for image work (created on first use; a forked child makes its own)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=default_workers(), thread_name_prefix="vl-image")
        return _executor


def _forget_executor() -> None:
    global _executor
    _executor = None  # the parent's threads do not exist in a forked child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor)


def prefetch(
    fn: Callable[[T], R],
    steps: Sequence[Sequence[T]],
    *,
    ahead: int,
    wanted: Callable[[T], bool] = lambda _: True,
    executor: Executor | None = None,
) -> Iterator[list[tuple[T, R | Exception]]]:
    """Run ``fn`` over the items of ``steps`` in threads, at most ``ahead`` steps beyond the one consumed.

    Yields, for each step in order and once its work is done, ``(item, fn(item))``
    for the items that step is the first to need (the same object in a later
    step is not processed again), or ``(item, exception)`` where ``fn`` raised.
    ``wanted(item)`` is asked when a step is submitted: an item whose result is
    not needed (its features are cached) is skipped. Closing the iterator early
    cancels the work that has not started.
    """
    if ahead < 0:
        raise ValueError(f"ahead must be >= 0, got {ahead}")
    pool = executor or shared_executor()
    seen: set[int] = set()
    queued: deque[list[tuple[T, Future[R]]]] = deque()
    submitted = 0
    try:
        for k in range(len(steps)):
            while submitted < len(steps) and submitted <= k + ahead:
                batch = []
                for item in steps[submitted]:
                    if id(item) not in seen and wanted(item):
                        seen.add(id(item))
                        batch.append((item, pool.submit(fn, item)))
                queued.append(batch)
                submitted += 1
            yield [(item, _outcome(future)) for item, future in queued.popleft()]
    finally:
        for batch in queued:
            for _, future in batch:
                future.cancel()


def _outcome(future: Future[R]) -> R | Exception:
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 - one bad item must not stop the others
        return e
