"""A byte-bounded LRU cache of vision-encoder outputs, keyed by image content."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class EncoderStats:
    """Counters tests and profilers read: tower calls, images encoded, cache hits."""

    calls: int = 0
    images_encoded: int = 0
    hits: int = 0
    misses: int = 0


Features = tuple[torch.Tensor, tuple[torch.Tensor, ...]]  # (tokens, H) and the deepstack levels


def _nbytes(feat: Features) -> int:
    main, extra = feat
    return sum(t.numel() * t.element_size() for t in (main, *extra))


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in storage of its own: a view into a whole tower call's output would keep all of it alive."""
    if t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


class EncoderCache:
    """Least-recently-used features of images, at most ``max_bytes`` in total.

    Every tensor of an entry (the features and Qwen3-VL's deepstack levels) is
    stored compact, so the bytes charged are the bytes held. An entry larger
    than the whole budget is not stored. ``max_bytes=0`` turns caching off.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0; got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, Features] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Features | None:
        feat = self._entries.get(key)
        if feat is not None:
            self._entries.move_to_end(key)
        return feat

    def put(self, key: str, feat: Features) -> Features:
        """Store ``feat``; returns what to use from now on (the stored copy, or ``feat`` if not stored)."""
        size = _nbytes(feat)
        if size > self.max_bytes:
            return feat
        if key in self._entries:
            self.bytes -= self._sizes.pop(key)
            del self._entries[key]
        while self._entries and self.bytes + size > self.max_bytes:
            old, _ = self._entries.popitem(last=False)
            self.bytes -= self._sizes.pop(old)
        main, extra = feat
        feat = (_compact(main), tuple(_compact(t) for t in extra))
        self._entries[key] = feat
        self._sizes[key] = size
        self.bytes += size
        return feat

    def clear(self) -> None:
        self._entries.clear()
        self._sizes.clear()
        self.bytes = 0
