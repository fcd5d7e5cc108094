"""What a sequence carries for its images (``Sequence.extras["images"]``)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


class ImageItem:
    """One image of a request, ready for the vision tower.

    ``key`` identifies the pixels and how they were preprocessed (the encoder
    cache's key). It may be given as a ``Future``: hashing the pixels costs
    more than rendering the prompt, so a worker thread computes it while the
    prompts are rendered, and it is first read when the steps run.

    Preprocessing runs when the tower needs the pixels (never, if the encoder
    cache already holds the features): normally in worker threads a few steps
    ahead (the model hands the result over with :meth:`ready`), else in
    :meth:`data`. The pixels are dropped once encoded; the decoded image is
    kept so that an evicted entry can be encoded again.
    """

    __slots__ = ("_key", "num_tokens", "grid", "image", "process", "_data")

    def __init__(
        self,
        key: str | Future[str],
        num_tokens: int,  # placeholder tokens this image takes in the prompt
        grid: tuple[int, int, int] | None,  # Qwen-VL patch grid (t, h, w); None for other towers
        image: Any,  # decoded PIL image
        process: Callable[..., Any],  # (image, **pixel options) -> preprocessed input for the tower
    ) -> None:
        self._key = key
        self.num_tokens = num_tokens
        self.grid = grid
        self.image = image
        self.process = process
        self._data: Any = None

    @property
    def key(self) -> str:
        if not isinstance(self._key, str):
            self._key = self._key.result()
        return self._key

    def data(self, **options: Any) -> Any:
        """The preprocessed input: handed over by :meth:`ready`, or computed now."""
        if self._data is None:
            self._data = self.process(self.image, **options)
        return self._data

    def ready(self, data: Any) -> None:
        self._data = data

    def release(self) -> None:
        self._data = None


@dataclass(frozen=True)
class ImageRef:
    """An image placed in a sequence: its placeholder tokens start at ``start``."""

    start: int
    item: ImageItem

    @property
    def stop(self) -> int:
        return self.start + self.item.num_tokens
