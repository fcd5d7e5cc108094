"""What a sequence carries for its images (``Sequence.extras["images"]``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class ImageItem:
    """One image of a request, ready for the vision tower.

    ``key`` identifies the pixels and how they were preprocessed (the encoder
    cache's key). Preprocessing runs lazily, when the tower needs the pixels
    (never, if the encoder cache already holds the features), and its output
    is dropped once encoded; the decoded image is kept so that an evicted
    entry can be encoded again.
    """

    key: str
    num_tokens: int  # placeholder tokens this image takes in the prompt
    grid: tuple[int, int, int] | None  # Qwen-VL patch grid (t, h, w); None for other towers
    image: Any  # decoded PIL image
    process: Callable[[Any], Any]  # image -> preprocessed input for the tower
    _data: Any = None

    def data(self) -> Any:
        if self._data is None:
            self._data = self.process(self.image)
        return self._data

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
