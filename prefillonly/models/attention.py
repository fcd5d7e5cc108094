"""Packed causal attention over a flat token stream with no padding and no KV cache.

On CUDA the fused varlen kernel does the work. Everywhere else (and for
features the kernel lacks, such as Gemma 2's logit soft-capping) a portable
path runs each sequence on its own, in query blocks so that long prompts do not
materialise a full L x L score matrix.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_QUERY_BLOCK = 2048


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` on ``device``; to a GPU through page-locked memory without waiting.

    A copy from pageable memory blocks the host until the GPU's queue has
    drained, so one stray ``.to("cuda")`` stalls the pipelined steps: the host
    can no longer queue the next step's work while the GPU runs this one.
    """
    if torch.device(device).type == "cuda" and host.device.type == "cpu":
        if host.is_pinned():
            return host.to(device, non_blocking=True)
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        # numpy copies on this thread; torch's CPU copy may wait on an OpenMP team that the image workers keep busy
        _bytes(pinned)[:] = _bytes(host.contiguous())
        return pinned.to(device, non_blocking=True)
    return host.to(device)


def _bytes(t: torch.Tensor):
    """The bytes of a contiguous tensor as a flat numpy view (any dtype, bfloat16 included)."""
    return t.reshape(-1).view(torch.uint8).numpy()


@dataclass
class AttentionMeta:
    """Where each sequence starts in the packed stream."""

    cu_seqlens: torch.Tensor  # int32, (num_seqs + 1,), on the compute device
    lengths: list[int]  # the same offsets, on the host, for the portable path
    max_seqlen: int
    # tables derived from this step's layout (rotary, query chunks, attention tiles), built once and
    # shared by every layer of the step; they go when the step does
    tables: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device) -> "AttentionMeta":
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        return cls(to_device(torch.tensor(offsets, dtype=torch.int32), device), list(lengths), max(lengths))


@dataclass
class TailMeta:
    """The trailing rows of each sequence that a step's last layer computes.

    A task reads one row (or a few) per sequence; every layer but the last
    needs all rows (their keys and values feed later rows), the last layer only
    the rows read. So its queries, output projection and MLP run on
    ``lengths[i]`` trailing rows of sequence ``i``, which attend causally over
    the whole sequence.
    """

    index: torch.Tensor  # (R,) long: the rows' places in the packed stream, on the compute device
    cu_seqlens: torch.Tensor  # int32, (num_seqs + 1,): offsets of each sequence's rows among the R
    lengths: list[int]  # rows per sequence, on the host
    max_seqlen: int

    @classmethod
    def from_lengths(cls, seq_lengths: list[int], lengths: list[int], device: torch.device) -> "TailMeta":
        index: list[int] = []
        offsets, start = [0], 0
        for n, r in zip(seq_lengths, lengths):
            index.extend(range(start + n - r, start + n))
            offsets.append(offsets[-1] + r)
            start += n
        host = torch.tensor(index + offsets, dtype=torch.long)
        dev = to_device(host, device)
        return cls(dev[: len(index)], dev[len(index):].to(torch.int32), list(lengths), max(lengths))


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without the varlen kernel
        return None, False
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


_VARLEN, _VARLEN_GQA = _varlen_fn()


def kernel_takes(dtype: torch.dtype, softcap: float | None) -> bool:
    """Whether torch's varlen kernel (on CUDA) takes attention in this dtype: half precision, no soft-capping.
    Only then does attention read the sequence offsets from the device alone; the portable path loops over
    the host's ``lengths``, which a captured CUDA graph would keep from its capture (engine.accel)."""
    return _VARLEN is not None and softcap is None and dtype in (torch.float16, torch.bfloat16)


def _use_kernel(q: torch.Tensor, softcap: float | None) -> bool:
    return q.is_cuda and kernel_takes(q.dtype, softcap)


def varlen_kwargs(scale: float, window: int | None, causal: bool, gqa: bool) -> dict:
    """Keyword arguments of torch's varlen kernel: transformers' ``window`` (``q_pos - k_pos < window``) as the
    kernel's (left, right) bound, and GQA where this torch's kernel takes it."""
    kwargs = {"scale": scale, "window_size": (-1 if window is None else window - 1, 0) if causal else (-1, -1)}
    if gqa and _VARLEN_GQA:
        kwargs["enable_gqa"] = True
    return kwargs


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Attention within each sequence. q: (N, Hq, D), k/v: (N, Hkv, D) -> (N, Hq, D).

    ``window`` follows transformers: a query attends to keys with
    ``q_pos - k_pos < window``. ``causal=False`` lets every token see its whole
    sequence (vision encoders); it takes no window.
    """
    if not causal and window is not None:
        raise ValueError("a sliding window needs causal attention")
    if _use_kernel(q, softcap):
        kwargs = varlen_kwargs(scale, window, causal, q.shape[1] != k.shape[1])
        return _VARLEN(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen, **kwargs)
    return _portable_attention(q, k, v, meta.lengths, scale, window, softcap, causal)


def tail_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMeta,
    tail: TailMeta,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's trailing rows over its whole sequence.

    q: (R, Hq, D), the rows of ``tail``; k/v: (N, Hkv, D), every row of the step -> (R, Hq, D).
    """
    if _use_kernel(q, softcap):
        # the kernel aligns a shorter query run with the end of its keys (bottom right): the trailing rows
        kwargs = varlen_kwargs(scale, window, True, q.shape[1] != k.shape[1])
        return _VARLEN(q, k, v, tail.cu_seqlens, meta.cu_seqlens, tail.max_seqlen, meta.max_seqlen, **kwargs)
    return _portable_attention(q, k, v, meta.lengths, scale, window, softcap, True, tail.lengths)


def _portable_attention(q, k, v, lengths, scale, window, softcap, causal=True, q_lengths=None):
    """Each sequence on its own; with ``q_lengths``, q holds only each sequence's last q_lengths[i] rows."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    start = qstart = 0
    for i, n in enumerate(lengths):
        r = n if q_lengths is None else q_lengths[i]
        qs = q[qstart : qstart + r].transpose(0, 1)  # (H, r, D)
        ks = k[start : start + n].transpose(0, 1)
        vs = v[start : start + n].transpose(0, 1)
        if groups > 1:
            ks = ks.repeat_interleave(groups, dim=0)
            vs = vs.repeat_interleave(groups, dim=0)
        for b0 in range(0, r, _QUERY_BLOCK):
            b1 = min(r, b0 + _QUERY_BLOCK)
            first = n - r + b0  # position of the block's first query in its sequence
            kend = n - r + b1 if causal else n
            out[qstart + b0 : qstart + b1] = _block(
                qs[:, b0:b1], ks[:, :kend], vs[:, :kend], first, scale, window, softcap, causal
            ).transpose(0, 1)
        start += n
        qstart += r
    return out


def _block(q, k, v, q_offset, scale, window, softcap, causal=True):
    """Attention of queries [q_offset, q_offset+Lq) over keys [0, Lk)."""
    lq, lk = q.shape[1], k.shape[1]
    allowed = None
    if causal:
        qpos = torch.arange(q_offset, q_offset + lq, device=q.device)[:, None]
        kpos = torch.arange(lk, device=q.device)[None, :]
        allowed = kpos <= qpos
        if window is not None:
            allowed = allowed & (qpos - kpos < window)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)
