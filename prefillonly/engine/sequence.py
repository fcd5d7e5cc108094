"""What the engine runs: token sequences, and which of their rows a task reads."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Pooling(enum.Enum):
    """How a sequence's hidden states become the rows its head sees."""

    LAST = "last"
    MEAN = "mean"
    CLS = "cls"


@dataclass
class Sequence:
    """One packed sequence. ``select`` is a pooling mode or explicit row offsets.

    ``targets`` optionally gives one token id per selected row, for heads that
    read the log-probability of a known continuation (multi-token labels).
    """

    token_ids: list[int]
    select: Pooling | tuple[int, ...] = Pooling.LAST
    targets: tuple[int, ...] | None = None
    extras: dict = field(default_factory=dict)  # model-specific inputs (images, M-RoPE positions)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_rows(self) -> int:
        return len(self.select) if isinstance(self.select, tuple) else 1


class Head:
    """A task's output layer: maps selected, final-normed rows to a small tensor per row."""

    def __call__(self, model, rows: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError
