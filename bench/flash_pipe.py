"""The tower's bidirectional attention with the next key tile's QK^T issued before the current tile's softmax
(FA3's intra-warpgroup overlap, written in the source), against models.flash on mixed Qwen3-VL tower steps.

    python -m bench.flash_pipe out.json

Measured slower on every tile shape (bench/NOTES.md, session 7), so the engine does not use it; kept to
reproduce that result.
"""

from __future__ import annotations

import json
import sys

import torch

from bench.checks import _cuda_seconds, _rel, _steps
from prefillonly.models import flash
from prefillonly.models.attention import AttentionMeta, packed_attention
from prefillonly.models.kernels import tl, triton


@triton.jit
def _update(s, v, m_i, l_i, acc, qk_scale):
    """One key tile's online-softmax step: raw scores ``s``, values ``v`` -> (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _pipe_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, tile_seq_ptr, tile_start_ptr, qk_scale,
                 stride_t, stride_h, D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 PIPE: tl.constexpr):
    tile = tl.program_id(0)
    seq = tl.load(tile_seq_ptr + tile)
    m0 = tl.load(tile_start_ptr + tile)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    length = tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)
    head = tl.program_id(1)
    offs_m = m0 + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < length
    q = tl.load(q_ptr + ((start + offs_m) * stride_t + head * stride_h)[:, None] + offs_d[None, :], mask=m_ok[:, None],
                other=0.0)
    k_base = k_ptr + start * stride_t + head * stride_h
    v_base = v_ptr + start * stride_t + head * stride_h
    m_i = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_P, D), dtype=tl.float32)
    n_full = length // BLOCK_N
    if PIPE:
        if n_full > 0:
            offs_n = tl.arange(0, BLOCK_N)
            s = tl.dot(q, tl.load(k_base + offs_n[None, :] * stride_t + offs_d[:, None]))
            for j in range(1, n_full):
                offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
                s_next = tl.dot(q, tl.load(k_base + offs_n[None, :] * stride_t + offs_d[:, None]))
                v = tl.load(v_base + (offs_n[:, None] - BLOCK_N) * stride_t + offs_d[None, :])
                m_i, l_i, acc = _update(s, v, m_i, l_i, acc, qk_scale)
                s = s_next
            offs_n = (n_full - 1) * BLOCK_N + tl.arange(0, BLOCK_N)
            v = tl.load(v_base + offs_n[:, None] * stride_t + offs_d[None, :])
            m_i, l_i, acc = _update(s, v, m_i, l_i, acc, qk_scale)
    else:
        for n0 in range(0, n_full * BLOCK_N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            s = tl.dot(q, tl.load(k_base + offs_n[None, :] * stride_t + offs_d[:, None]))
            v = tl.load(v_base + offs_n[:, None] * stride_t + offs_d[None, :])
            m_i, l_i, acc = _update(s, v, m_i, l_i, acc, qk_scale)
    for n0 in range(n_full * BLOCK_N, length, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        k = tl.load(k_base + offs_n[None, :] * stride_t + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        s = tl.where(n_ok[None, :], tl.dot(q, k) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_t + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptr + ((start + offs_m) * stride_t + head * stride_h)[:, None] + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])


def run_pipe(q, k, v, meta, scale, block_p, block_n, warps, stages, pipe):
    tiles = flash._tiles_on_device(meta, block_p, False, q.device)
    out = torch.empty_like(q)
    _pipe_kernel[(tiles.shape[1], q.shape[1])](q, k, v, out, meta.cu_seqlens, tiles[0], tiles[1], scale * 1.4426950408889634,
                                              q.stride(0), q.stride(1), D=q.shape[2], BLOCK_P=block_p, BLOCK_N=block_n,
                                              PIPE=pipe, num_warps=warps, num_stages=stages)
    return out


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(5)
    h, d = 16, 64
    steps = _steps(24, 196, 7056, 32768, 5)
    res: dict = {}
    for si, ls in enumerate(steps[:3]):
        n = sum(ls)
        qkv = torch.randn(n, 3, h, d, device=dev, dtype=torch.bfloat16)
        q, k, v = (qkv[:, i].contiguous() for i in range(3))
        meta = AttentionMeta.from_lengths(ls, dev)
        flops = sum(4 * L * L * h * d for L in ls)
        ref = packed_attention(q.float(), k.float(), v.float(), meta, d**-0.5, causal=False) if n < 40000 else None
        cases = {"ours": lambda: flash.flash_varlen(q, k, v, meta, d**-0.5, causal=False, config=flash.TOWER_CONFIG)}
        for cfg in ((64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 3),
                    (128, 64, 8, 2)):
            for pipe in (False, True):
                cases[f"{'pipe' if pipe else 'plain'}_{'-'.join(map(str, cfg))}"] = (
                    lambda cfg=cfg, pipe=pipe: run_pipe(q, k, v, meta, d**-0.5, *cfg, pipe))
        out: dict = {"tokens": n, "images": len(ls)}
        for name, fn in cases.items():
            try:
                o = fn()
                t = _cuda_seconds(fn, 7)
                out[name] = {"ms": round(t * 1e3, 3), "tflops": round(flops / t / 1e12, 1),
                             "rel32": _rel(o, ref) if ref is not None else None}
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        res[f"step{si}"] = out
        print(json.dumps(out), flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
