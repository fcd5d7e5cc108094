"""Fused Triton kernels for the CUDA half-precision path.

Memory-bound stages of a layer, each one kernel:

* ``rmsnorm``: RMSNorm of a row (Llama's ``w * x`` or Gemma's ``(1 + w) * x``),
  always out of place (the residual stream is never written by a norm);
* ``qk_norm_rope``: splits a fused ``qkv`` projection, applies the per-head
  q/k RMSNorm (Qwen3, Gemma 3) and rotary embedding, and writes contiguous
  q, k (and v, unless the caller reads it in place) in one pass;
* ``act_mul``: ``act(gate) * up`` from a fused ``gate_up`` projection;
* ``add_norm``: the vision towers' float32 residual add (in place) and the
  LayerNorm or RMSNorm after it, written in the compute dtype.

They are used by :mod:`prefillonly.models.fastpath` and the fused Qwen vision
towers only on CUDA tensors in float16/bfloat16; the CPU float32 path never
calls them. Every kernel rounds where the plain PyTorch path rounds (norm output
to the model dtype before the weight multiply, activation before the ``* up``),
computes in float32 otherwise, and writes fresh buffers.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None
    tl = None
    HAVE_TRITON = False

ACT_CODES = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1, "gelu_new": 1, "gelu": 2}


def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if HAVE_TRITON:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, n_cols, eps,
                        BLOCK: tl.constexpr, GEMMA: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / n_cols
        h = x * tl.rsqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            y = h * (1.0 + w)
        else:
            y = h.to(y_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _heads_norm_rope(src, dst, w_ptr, c_lo, s_lo, c_hi, s_hi, eps,
                         H: tl.constexpr, H_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                         NORM: tl.constexpr, GEMMA: tl.constexpr, ROPE: tl.constexpr):
        h = tl.arange(0, H_P2)[:, None]
        j = tl.arange(0, HALF_P2)[None, :]
        m = (h < H) & (j < HALF)
        off = h * (2 * HALF) + j
        x_lo = tl.load(src + off, mask=m, other=0.0).to(tl.float32)
        x_hi = tl.load(src + off + HALF, mask=m, other=0.0).to(tl.float32)
        if NORM:
            var = (tl.sum(x_lo * x_lo, axis=1) + tl.sum(x_hi * x_hi, axis=1)) / (2 * HALF)
            r = tl.rsqrt(var + eps)[:, None]
            jm = j < HALF
            w_lo = tl.load(w_ptr + j, mask=jm, other=0.0).to(tl.float32)
            w_hi = tl.load(w_ptr + HALF + j, mask=jm, other=0.0).to(tl.float32)
            if GEMMA:
                x_lo = (x_lo * r * (1.0 + w_lo)).to(dst.dtype.element_ty).to(tl.float32)
                x_hi = (x_hi * r * (1.0 + w_hi)).to(dst.dtype.element_ty).to(tl.float32)
            else:
                x_lo = ((x_lo * r).to(dst.dtype.element_ty).to(tl.float32) * w_lo).to(dst.dtype.element_ty).to(tl.float32)
                x_hi = ((x_hi * r).to(dst.dtype.element_ty).to(tl.float32) * w_hi).to(dst.dtype.element_ty).to(tl.float32)
        if ROPE:
            o_lo = x_lo * c_lo - x_hi * s_lo
            o_hi = x_hi * c_hi + x_lo * s_hi
        else:
            o_lo = x_lo
            o_hi = x_hi
        tl.store(dst + off, o_lo.to(dst.dtype.element_ty), mask=m)
        tl.store(dst + off + HALF, o_hi.to(dst.dtype.element_ty), mask=m)

    @triton.jit
    def _qk_norm_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, map_ptr,
                             stride_qkv, stride_cs, stride_q, stride_k, stride_v, eps,
                             HQ: tl.constexpr, HK: tl.constexpr, HQ_P2: tl.constexpr, HK_P2: tl.constexpr,
                             HALF: tl.constexpr, HALF_P2: tl.constexpr, FULL_TABLE: tl.constexpr,
                             NORM: tl.constexpr, GEMMA: tl.constexpr, ROW_MAP: tl.constexpr,
                             COPY_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if ROW_MAP:
            orow = tl.load(map_ptr + row).to(tl.int64)
        else:
            orow = row
        j = tl.arange(0, HALF_P2)
        jm = j < HALF
        c_lo = tl.load(cos_ptr + row * stride_cs + j, mask=jm, other=0.0)[None, :]
        s_lo = tl.load(sin_ptr + row * stride_cs + j, mask=jm, other=0.0)[None, :]
        if FULL_TABLE:
            c_hi = tl.load(cos_ptr + row * stride_cs + HALF + j, mask=jm, other=0.0)[None, :]
            s_hi = tl.load(sin_ptr + row * stride_cs + HALF + j, mask=jm, other=0.0)[None, :]
        else:
            c_hi = c_lo
            s_hi = s_lo
        src = qkv_ptr + row * stride_qkv
        _heads_norm_rope(src, q_ptr + orow * stride_q, qw_ptr, c_lo, s_lo, c_hi, s_hi, eps,
                         HQ, HQ_P2, HALF, HALF_P2, NORM, GEMMA, True)
        src = src + HQ * 2 * HALF
        _heads_norm_rope(src, k_ptr + orow * stride_k, kw_ptr, c_lo, s_lo, c_hi, s_hi, eps,
                         HK, HK_P2, HALF, HALF_P2, NORM, GEMMA, True)
        if COPY_V:
            src = src + HK * 2 * HALF
            _heads_norm_rope(src, v_ptr + orow * stride_v, kw_ptr, c_lo, s_lo, c_hi, s_hi, eps,
                             HK, HK_P2, HALF, HALF_P2, False, False, False)

    @triton.jit
    def _act_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, n_cols,
                        BLOCK: tl.constexpr, ACT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            a = g / (1.0 + tl.exp(-g))
        elif ACT == 1:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
        else:
            a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        a = a.to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _add_norm_kernel(x_ptr, d_ptr, w_ptr, b_ptr, y_ptr, stride_x, stride_d, stride_y, n_cols, eps,
                         BLOCK: tl.constexpr, ADD: tl.constexpr, LAYER: tl.constexpr, BIAS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            x = x + tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if LAYER:
            mean = tl.sum(x, 0) / n_cols
            xc = tl.where(mask, x - mean, 0.0)
            y = xc * tl.rsqrt(tl.sum(xc * xc, 0) / n_cols + eps) * w
            if BIAS:
                y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            h = x * tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
            y = h.to(y_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim of a 2-D tensor, into a new tensor."""
    x = _rows(x)
    n, d = x.shape
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n:
        block = _p2(d)
        _rmsnorm_kernel[(n,)](x, weight, y, x.stride(0), y.stride(0), d, eps,
                              BLOCK=block, GEMMA=gemma, num_warps=8 if block >= 4096 else 4)
    return y


def qk_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                 head_dim: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                 gemma: bool = False, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 row_map: torch.Tensor | None = None, copy_v: bool = True):
    """Split (N, (Hq + 2 Hkv) D) into rotated q (N, Hq, D), k and v (N, Hkv, D).

    ``cos``/``sin`` are float32 tables of shape (N, D) or (N, D/2) (the two
    halves of the rotate-half layout being equal). With ``q_weight`` the
    per-head RMSNorm runs before the rotation. ``row_map`` (N,) int64 scatters
    row i to row ``row_map[i]`` of ``out`` (a padded layout). ``copy_v=False``
    returns v as a strided view into ``qkv`` (for a consumer that takes strides)
    instead of copying it.
    """
    qkv = _rows(qkv)
    n = qkv.shape[0]
    if not copy_v and (out is not None or row_map is not None):
        raise ValueError("copy_v=False needs the unpadded layout and no out= buffers")
    if out is None:
        q = torch.empty((n, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((n, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        if copy_v:
            v = torch.empty((n, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        else:
            v = qkv[:, (num_heads + num_kv_heads) * head_dim:].view(n, num_kv_heads, head_dim)
    else:
        q, k, v = out
    if head_dim % 2:
        raise ValueError("rotary needs an even head_dim")
    half = head_dim // 2
    full = cos.shape[-1] == head_dim
    norm = q_weight is not None
    if n:
        _qk_norm_rope_kernel[(n,)](
            qkv, cos, sin, q_weight if norm else qkv, k_weight if norm else qkv, q, k, v,
            row_map if row_map is not None else qkv,
            qkv.stride(0), cos.stride(0), q.stride(0), k.stride(0), v.stride(0), eps,
            HQ=num_heads, HK=num_kv_heads, HQ_P2=_p2(num_heads), HK_P2=_p2(num_kv_heads),
            HALF=half, HALF_P2=_p2(half), FULL_TABLE=full, NORM=norm, GEMMA=gemma, ROW_MAP=row_map is not None,
            COPY_V=copy_v, num_warps=4,
        )
    return q, k, v


def act_mul(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for gate_up = cat(gate, up) along the last dim."""
    gate_up = _rows(gate_up)
    n, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
    if n:
        block = min(1024, _p2(inter))
        _act_mul_kernel[(n, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                        BLOCK=block, ACT=ACT_CODES[act], num_warps=4)
    return out


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, layer_norm: bool, dtype: torch.dtype) -> torch.Tensor:
    """``x += delta`` in place (x a float32 residual stream), then its norm in ``dtype``, in one pass.

    LayerNorm computes in float32 and rounds once (``F.layer_norm`` on the
    float32 stream, then ``.to(dtype)``); RMSNorm rounds the normalised row
    before the weight multiply, as transformers' Qwen2.5-VL norm does.
    """
    if x.stride(-1) != 1 or (delta is not None and delta.stride(-1) != 1):
        raise ValueError("add_norm needs rows with unit stride")
    n, d = x.shape
    y = torch.empty((n, d), dtype=dtype, device=x.device)
    if n:
        block = _p2(d)
        _add_norm_kernel[(n,)](x, delta if delta is not None else x, weight, bias if bias is not None else weight, y,
                               x.stride(0), delta.stride(0) if delta is not None else 0, y.stride(0), d, eps,
                               BLOCK=block, ADD=delta is not None, LAYER=layer_norm, BIAS=bias is not None,
                               num_warps=8 if block >= 4096 else 4)
    return y
