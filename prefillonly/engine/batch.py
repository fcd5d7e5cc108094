"""The tensors of one step: a flat token stream with sequence offsets, no padding."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from ..models.attention import AttentionMeta, TailMeta, to_device
from .sequence import Pooling, Sequence


# The last layer computes only the rows a task reads (each sequence's trailing rows from its first read row),
# when that is at most half the step's rows: the other rows' last-layer outputs are never read (bench/NOTES.md #26).
LAST_LAYER_TAIL = True


@dataclass
class StepInput:
    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,) or (3, N) for M-RoPE models
    meta: AttentionMeta
    seqs: list[Sequence]  # models with extra inputs (images) read them from here
    # (R,) rows of the model's output (``hidden_states(step)``) that the heads read; pooled sequences excluded.
    # With ``tail`` set, the model outputs only the tail's rows, and these index those.
    row_index: torch.Tensor
    targets: torch.Tensor | None  # (R,) token per selected row, for continuation heads
    tail: TailMeta | None = None  # the rows the last layer computes, or None for all

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
    read: list[list[int]] = []  # per sequence, the rows its head reads (offsets in the sequence)
    targets: list[int] = []
    positions: list[torch.Tensor] = []
    for s, n in zip(seqs, lengths):
        ids.extend(s.token_ids)
        pos = s.extras.get("positions")
        positions.append(pos if pos is not None else _arange(n))
        if s.select is Pooling.LAST:
            read.append([n - 1])
        elif s.select is Pooling.CLS:
            read.append([0])
        else:
            read.append(list(s.select) if isinstance(s.select, tuple) else [])
        if s.targets is not None:
            targets.extend(s.targets)
    input_ids = torch.frombuffer(array("q", ids), dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)
    if any(p.dim() == 2 for p in positions):  # M-RoPE: text-only sequences get three equal rows
        positions = [p if p.dim() == 2 else p.expand(3, -1) for p in positions]
    pos_t = torch.cat(positions, dim=-1)
    # trailing rows per sequence from its first read row; a pooled sequence (MEAN) reads them all
    keep = [n - min(r) if r else n for n, r in zip(lengths, read)]
    tail = None
    if LAST_LAYER_TAIL and 2 * sum(keep) <= sum(lengths) and not any(s.select is Pooling.MEAN for s in seqs):
        tail = TailMeta.from_lengths(lengths, keep, device)
    rows, offset = [], 0
    for n, r, k in zip(lengths, read, keep):
        base = offset - (n - k) if tail is not None else offset  # where the sequence's row 0 would sit
        rows.extend(base + j for j in r)
        offset += k if tail is not None else n
    row_t = torch.tensor(rows, dtype=torch.long)
    tgt_t = torch.tensor(targets, dtype=torch.long) if targets else None
    return StepInput(
        input_ids=to_device(input_ids, device),
        positions=to_device(pos_t, device),
        meta=AttentionMeta.from_lengths(lengths, device),
        seqs=seqs,
        row_index=to_device(row_t, device),
        targets=None if tgt_t is None else to_device(tgt_t, device),
        tail=tail,
    )
