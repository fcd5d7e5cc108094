"""The tensors of one step: a flat token stream with sequence offsets, no padding."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from ..models.attention import AttentionMeta, to_device
from .sequence import Pooling, Sequence


@dataclass
class StepInput:
    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,) or (3, N) for M-RoPE models
    meta: AttentionMeta
    seqs: list[Sequence]  # models with extra inputs (images) read them from here
    row_index: torch.Tensor  # (R,) packed rows the heads read; pooled sequences excluded
    targets: torch.Tensor | None  # (R,) token per selected row, for continuation heads

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


_ARANGE = torch.arange(0)


def _arange(n: int) -> torch.Tensor:
    """A read-only view of 0..n-1 (one shared buffer: no allocation per sequence)."""
    global _ARANGE
    if _ARANGE.numel() < n:
        _ARANGE = torch.arange(max(n, 2 * _ARANGE.numel(), 4096))
    return _ARANGE[:n]


def build_step(seqs: list[Sequence], device: torch.device) -> StepInput:
    lengths = [len(s) for s in seqs]
    ids: list[int] = []
    rows: list[int] = []
    targets: list[int] = []
    positions: list[torch.Tensor] = []
    offset = 0
    for s, n in zip(seqs, lengths):
        ids.extend(s.token_ids)
        pos = s.extras.get("positions")
        positions.append(pos if pos is not None else _arange(n))
        if s.select is Pooling.LAST:
            rows.append(offset + n - 1)
        elif s.select is Pooling.CLS:
            rows.append(offset)
        elif isinstance(s.select, tuple):
            rows.extend(offset + r for r in s.select)
        if s.targets is not None:
            targets.extend(s.targets)
        offset += n
    input_ids = torch.frombuffer(array("q", ids), dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)
    if any(p.dim() == 2 for p in positions):  # M-RoPE: text-only sequences get three equal rows
        positions = [p if p.dim() == 2 else p.expand(3, -1) for p in positions]
    pos_t = torch.cat(positions, dim=-1)
    row_t = torch.tensor(rows, dtype=torch.long)
    tgt_t = torch.tensor(targets, dtype=torch.long) if targets else None
    return StepInput(
        input_ids=to_device(input_ids, device),
        positions=to_device(pos_t, device),
        meta=AttentionMeta.from_lengths(lengths, device),
        seqs=seqs,
        row_index=to_device(row_t, device),
        targets=None if tgt_t is None else to_device(tgt_t, device),
    )
