"""Packed causal attention for many short sequences: a Triton flash kernel.

torch's flash varlen kernel (FA2) works in 128-query tiles and reaches only
50-100 TFLOP/s on an H100 when a step packs many sequences of a few hundred
tokens (bench/NOTES.md #7): most tiles are partly empty and the tail tile of
each sequence does a full tile's work. This kernel uses smaller query tiles,
schedules the tiles with the most keys first, and skips the causal mask on
every key tile below the diagonal. With GQA it can stack a key/value group's
query heads into one tile so the group reads its keys and values once.

One program computes one query tile (a run of positions of one sequence, for
one query head or for all the heads of one key/value group): an online softmax
over the key tiles of its own sequence, in float32, written once in the input
dtype.
The tile table (which sequence, which first query) is built on the host from
the step's lengths and kept in the step's ``AttentionMeta.tables``.
"""

from __future__ import annotations

from array import array

import torch

from .attention import AttentionMeta, to_device
from .kernels import HAVE_TRITON, triton, tl

# (positions per tile, BLOCK_N, num_warps, num_stages, pack): chosen by bench/checks.py's `flash_micro`
# on an H200 (bench/NOTES.md #16). ``pack`` stacks up to that many query heads that share a key/value
# head into one tile (rows = heads x positions), so they read their keys and values once. CONFIG serves
# steps of short sequences (mean under LONG_MEAN tokens: W2's 16-512 tokens, 1.88x torch's kernel),
# LONG_CONFIG longer ones (W1's 128-1024 about the same either way; VLM prompts of ~1k tokens 8% faster).
CONFIG = (64, 32, 4, 3, 2)
LONG_CONFIG = (64, 64, 4, 3, 1)
LONG_MEAN = 768
# The Qwen vision towers' bidirectional attention (images of hundreds to thousands of patches, or
# Qwen2.5-VL's 64-patch windows) through this kernel when their fused kernels are on, and its config.
TOWER = True
TOWER_CONFIG = (64, 64, 4, 3, 1)  # best or within 15% of the best on every tower layout measured

if HAVE_TRITON:

    @triton.jit
    def _flash_varlen_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, tile_seq_ptr, tile_start_ptr, qk_scale,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                             GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        # a tile is PACK query heads (of one key/value head's group) x BLOCK_P positions, stacked as rows
        tile = tl.program_id(0)
        seq = tl.load(tile_seq_ptr + tile)
        m0 = tl.load(tile_start_ptr + tile)
        start = tl.load(cu_ptr + seq).to(tl.int64)
        length = tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)
        first_head = tl.program_id(1) * PACK
        kv_head = first_head // GROUP

        rows = tl.arange(0, PACK * BLOCK_P)
        offs_m = m0 + rows % BLOCK_P
        heads = first_head + rows // BLOCK_P
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM  # all true when HEAD_DIM is a power of two: then no load is masked along d
        m_ok = offs_m < length
        q_rows = (start + offs_m) * stride_qt + heads * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + start * stride_kt + kv_head * stride_kh
        v_base = v_ptr + start * stride_vt + kv_head * stride_vh

        # m_i is the running row maximum of the scaled scores; exponents are one fused multiply-add each
        m_i = tl.full((PACK * BLOCK_P,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((PACK * BLOCK_P,), dtype=tl.float32)
        acc = tl.zeros((PACK * BLOCK_P, D_PAD), dtype=tl.float32)
        # key tiles wholly below the diagonal (and inside the sequence) need no mask
        if CAUSAL:
            full_end = (m0 // BLOCK_N) * BLOCK_N
            hi = tl.minimum(length, m0 + BLOCK_P)
        else:
            full_end = (length // BLOCK_N) * BLOCK_N
            hi = length
        for n0 in range(0, full_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            if HEAD_DIM == D_PAD:
                k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None])
                v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :])
            else:
                k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=d_ok[:, None], other=0.0)
                v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            s = tl.dot(q, k)
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        for n0 in range(full_end, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < length
            k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                        other=0.0)
            s = tl.dot(q, k) * qk_scale
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        o_rows = (start + offs_m) * stride_ot + heads * stride_oh
        tl.store(o_ptr + o_rows[:, None] + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])


def tile_table(lengths: list[int], block_m: int, causal: bool = True) -> tuple[array, array]:
    """(sequence index, first query) of every query tile, the tiles with the most keys first.

    A causal tile starting at query m reads m + block_m keys, so late tiles of
    long sequences go first and the short tail tiles fill the gaps at the end.
    """
    tiles = [(m, i) for i, n in enumerate(lengths) for m in range(0, n, block_m)]
    weight = (lambda t: t[0]) if causal else (lambda t: lengths[t[1]])
    tiles.sort(key=weight, reverse=True)
    return array("i", [i for _, i in tiles]), array("i", [m for m, _ in tiles])


def _tiles_on_device(meta: AttentionMeta, block_m: int, causal: bool, device: torch.device) -> torch.Tensor:
    key = ("flash_tiles", block_m, causal)
    if key not in meta.tables:
        seqs, starts = tile_table(meta.lengths, block_m, causal)
        host = torch.stack([torch.frombuffer(seqs, dtype=torch.int32), torch.frombuffer(starts, dtype=torch.int32)])
        meta.tables[key] = to_device(host, device)
    return meta.tables[key]


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta, scale: float,
                 causal: bool = True, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """Attention within each packed sequence. q: (N, Hq, D), k/v: (N, Hkv, D) -> (N, Hq, D).

    CUDA, float16/bfloat16, no window and no soft-capping (``packed_attention``
    covers those). ``config`` overrides the choice between ``CONFIG`` and
    ``LONG_CONFIG`` (benchmarks sweep it).
    """
    if not HAVE_TRITON:
        raise RuntimeError("flash_varlen needs triton")
    n, hq, d = q.shape
    hk = k.shape[1]
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q, k and v need a contiguous last (head) dimension")
    if config is None:
        config = CONFIG if n < LONG_MEAN * len(meta.lengths) else LONG_CONFIG
    block_p, block_n, warps, stages, pack = (tuple(config) + (1,))[:5]
    group = hq // hk
    pack = min(pack, group, max(1, 128 // block_p))  # at most 128 rows: the accumulator lives in registers
    while pack > 1 and (group % pack or pack & (pack - 1)):  # a power of two that divides the group
        pack -= 1
    tiles = _tiles_on_device(meta, block_p, causal, q.device)
    out = torch.empty_like(q)
    grid = (tiles.shape[1], hq // pack)
    d_pad = max(16, 1 << (d - 1).bit_length())
    _flash_varlen_kernel[grid](
        q, k, v, out, meta.cu_seqlens, tiles[0], tiles[1], scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=group, PACK=pack, HEAD_DIM=d, D_PAD=d_pad, BLOCK_P=block_p, BLOCK_N=block_n, CAUSAL=causal,
        num_warps=warps, num_stages=stages)
    return out
