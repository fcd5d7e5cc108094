"""The contract between a task and the engine.

A task turns one input item into one or more :class:`Sequence` objects,
provides the :class:`Head` that runs on the selected rows, and turns the head
outputs back into a typed result.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch

from ..engine.sequence import Head, Sequence
from ..prompts import PromptEncoder

R = TypeVar("R")


class Task(Generic[R]):
    name: str = "task"
    head: Head

    def sequences(self, item: Any, field: str, enc: PromptEncoder) -> list[Sequence]:
        raise NotImplementedError

    def result(self, item: Any, outputs: list[torch.Tensor]) -> R:
        raise NotImplementedError

    def failed(self, item: Any, message: str) -> R:
        raise NotImplementedError


def device_copy(t: torch.Tensor, device: torch.device, cache: dict) -> torch.Tensor:
    """``t`` on ``device``, copied once: a pageable host-to-device copy per step would sync the stream."""
    key = str(device)
    if key not in cache:
        cache[key] = t.to(device)
    return cache[key]


class LabelRowsHead(Head):
    """Logits of a few fixed vocabulary rows: never a full-vocabulary matmul."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = torch.tensor(token_ids, dtype=torch.long)
        self._on_device: dict = {}

    def __call__(self, model, rows, targets):
        return model.logits(rows, device_copy(self.token_ids, rows.device, self._on_device))


class ContinuationHead(Head):
    """Log-probability of each row's target token under the full vocabulary."""

    def __call__(self, model, rows, targets):
        logits = model.logits(rows).float()
        picked = logits.gather(1, targets[:, None])
        return picked - torch.logsumexp(logits, dim=-1, keepdim=True)


class ScoreHead(Head):
    """The ``score`` linear layer of a sequence-classification checkpoint."""

    def __call__(self, model, rows, targets):
        return model.score(rows)
