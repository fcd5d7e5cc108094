"""Run image preprocessing on CPU worker threads, ahead of the GPU, in input order.

Decoding, resizing and normalising images is CPU work that would otherwise
leave the GPU idle between batches.  PIL and numpy release the GIL for the
heavy parts, so threads give real parallelism without pickling images between
processes.  At most ``max_pending`` items are in flight, so a long input stream
never piles up decoded images in memory; results come back in input order,
and an item whose preprocessing raised comes back as that exception object,
so one bad image fails alone.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["PreprocessPool"]

T = TypeVar("T")
R = TypeVar("R")


class PreprocessPool(Generic[T, R]):
    """Thread pool mapping ``fn`` over items with bounded read-ahead.

    Usage::

        with PreprocessPool(preprocessor, num_workers=4) as pool:
            for result in pool.map(images):
                if isinstance(result, Exception): ...  # this item failed
    """

    def __init__(
        self,
        fn: Callable[[T], R],
        *,
        num_workers: int | None = None,
        max_pending: int | None = None,
        thread_name_prefix: str = "preprocess",
    ) -> None:
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if max_pending is None:
            max_pending = 2 * num_workers
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.fn = fn
        self.num_workers = num_workers
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix=thread_name_prefix)
        self._closed = False

    def map(self, items: Iterable[T]) -> Iterator[R | Exception]:
        """Yield ``fn(item)`` (or the ``Exception`` it raised) for each item, in input order.

        Items are pulled from ``items`` lazily, keeping at most ``max_pending``
        submitted but not yet yielded.  Abandoning the iterator cancels work that
        has not started.  Exceptions raised while iterating ``items`` itself
        propagate to the caller.
        """
        if self._closed:
            raise RuntimeError("PreprocessPool is closed")
        return self._map(iter(items))

    def _map(self, items: Iterator[T]) -> Iterator[R | Exception]:
        pending: collections.deque[Future[R]] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.max_pending:
                    try:
                        item = next(items)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append(self._executor.submit(self.fn, item))
                if not pending:
                    return
                future = pending.popleft()
                try:
                    result: R | Exception = future.result()
                except Exception as e:  # noqa: BLE001 - one bad item must not stop the others
                    result = e
                yield result
        finally:
            for future in pending:
                future.cancel()

    def close(self, *, wait: bool = True) -> None:
        """Stop the worker threads (queued work that has not started is cancelled)."""
        self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> PreprocessPool[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
