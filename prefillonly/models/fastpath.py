"""The CUDA half-precision decoder layer: fused kernels, cuBLAS residual adds, hybrid chunking.

:func:`enable` attaches :func:`fused_layer_forward` to every ``DecoderLayer``
(``layer.fast``); ``DecoderLayer.forward`` then hands over to it. Nothing
changes for CPU or float32 models: they keep the plain modules.

One layer on the fast path is nine launches:

    rmsnorm -> qkv GEMM -> qk_norm_rope -> attention -> o_proj GEMM (+ residual, cuBLAS beta=1)
    rmsnorm -> gate_up GEMM -> act_mul -> down GEMM (+ residual)

Attention of a step of several sequences and at least ``MULTI_MIN_TOKENS`` tokens is our Triton
kernel (``models.flash``, ``MULTI_ATTENTION``); smaller steps (CUDA graphs), single prompts and
sliding-window or soft-capped layers use torch's varlen kernel (or SDPA, below).

The residual stream is updated in place: the layer consumes its input tensor
(the decoder never reads a layer's input again).

The last layer of a step whose task reads a few rows per sequence (``TailMeta``) computes keys and values
for every row and everything else (queries, attention, ``o_proj``, MLP) for those rows only.

Hybrid prefilling: with ``layer.mlp_chunk = C`` a step holding one sequence
longer than C (a prompt that runs alone) runs every token-wise stage (norms,
projections, rotary, MLP) in chunks of C tokens, so no (N, intermediate) or
(N, qkv) activation is materialised; only q, k and v are kept whole. Its
attention (``LONG_ATTENTION``) either runs in query chunks (keys [0, end) for
queries [start, end), causal aligned bottom-right) adding each chunk's
``o_proj`` output straight into the residual stream, or as one SDPA call whose
output is projected chunk by chunk. Multi-sequence steps are bounded by the
step budget and always run whole.
"""

from __future__ import annotations

from array import array

import torch
import torch.nn.functional as F

from . import flash, kernels
from .attention import _VARLEN, TailMeta, packed_attention, tail_attention, to_device, varlen_kwargs
from .layers import Rotary

# Attention of a single long sequence on the hybrid path: "varlen" runs the varlen kernel in
# query chunks (bounded memory); "sdpa" runs torch SDPA over the whole sequence, whose
# backends (cuDNN, flash) are faster for one long causal sequence on Hopper.
LONG_ATTENTION = "sdpa"
# Attention of a multi-sequence step of at least MULTI_MIN_TOKENS tokens: "flash" (our Triton
# kernel for many short sequences, models.flash), "varlen" (torch's flash varlen kernel) or
# "padded" (q/k/v scattered into a zeroed right-padded batch, one causal SDPA call, rows gathered
# back). Measured on an H100/H200 (bench/NOTES.md #7, #16). Small steps (CUDA graphs) always use
# "varlen".
MULTI_ATTENTION = "flash"
MULTI_MIN_TOKENS = 1024


def supported(model, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fast path cannot run this model here, or None if it can."""
    if not kernels.HAVE_TRITON:
        return "triton is not installed"
    if device.type != "cuda":
        return "fused kernels need a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return "fused kernels run in float16/bfloat16 only"
    spec = getattr(model, "spec", None)
    if spec is None or spec.activation not in kernels.ACT_CODES:
        return "unsupported activation"
    if spec.head_dim % 2:
        return "odd head_dim"
    return None


def enable(model, on: bool = True) -> None:
    """Route every decoder layer of ``model`` (a ``CausalLM``) through the fused path, or back."""
    groups: dict = {}
    for layer in model.model.layers:
        layer.fast = fused_layer_forward if on else None
        rot = layer.self_attn.rotary
        inv = getattr(rot, "inv_freq", None)
        key = (type(rot).__name__, tuple(inv.float().cpu().tolist()) if inv is not None else id(rot),
               float(getattr(rot, "scaling", 1.0)), str(getattr(rot, "mrope_section", None)),
               bool(getattr(rot, "mrope_interleaved", False)))
        layer.self_attn._rope_group = groups.setdefault(key, len(groups))


def _rope_table(attn, positions: torch.Tensor, meta):
    tables = meta.tables
    key = ("rope", attn._rope_group)
    if key not in tables:
        rot = attn.rotary
        plain = type(rot) is Rotary and positions.dim() == 1
        cos, sin = rot.cos_sin(positions, torch.float32)
        if plain:  # cat(freqs, freqs): one half is enough
            half = cos.shape[-1] // 2
            cos, sin = cos[:, :half].contiguous(), sin[:, :half].contiguous()
        tables[key] = (cos, sin)
    return tables[key]


def _query_chunks(meta, n: int, chunk: int, device):
    """(bounds, cu_q, cu_k) for query chunks of one sequence, built once per step."""
    tables = meta.tables
    key = ("qchunks", n, chunk)
    if key not in tables:
        bounds = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
        dev = to_device(torch.tensor([[0, b - a, 0, b] for a, b in bounds], dtype=torch.int32), device)
        tables[key] = (bounds, dev[:, 0:2], dev[:, 2:4])
    return tables[key]


def _padded_layout(meta, device):
    """(batch, max_len, packed->padded row map, batch index, position index) of a step, once per step."""
    tables = meta.tables
    if "pad" not in tables:
        lengths, lmax = meta.lengths, meta.max_seqlen
        rows, bidx, pidx = array("q"), array("q"), array("q")
        for b, n in enumerate(lengths):
            rows.extend(range(b * lmax, b * lmax + n))
            bidx.extend([b] * n)
            pidx.extend(range(n))
        host = torch.stack([torch.frombuffer(a, dtype=torch.long) for a in (rows, bidx, pidx)])
        dev = to_device(host, device)
        tables["pad"] = (len(lengths), lmax, dev[0], dev[1], dev[2])
    return tables["pad"]


def _padded_attention(layer, x, cos, sin, meta):
    """q/k/v and attention of a multi-sequence step through a right-padded batch and SDPA -> (N, Hq*D)."""
    attn = layer.self_attn
    s = attn.spec
    n = x.shape[0]
    b, lmax, rows, bidx, pidx = _padded_layout(meta, x.device)
    qp = torch.zeros((b * lmax, s.num_heads, s.head_dim), dtype=x.dtype, device=x.device)
    kp = torch.zeros((b * lmax, s.num_kv_heads, s.head_dim), dtype=x.dtype, device=x.device)
    vp = torch.zeros_like(kp)
    _qkv(layer, x, cos, sin, out=(qp, kp, vp), row_map=rows)
    shape = lambda t: t.view(b, lmax, t.shape[1], s.head_dim).transpose(1, 2)  # noqa: E731
    o4 = F.scaled_dot_product_attention(shape(qp), shape(kp), shape(vp), is_causal=True, scale=s.attn_scale,
                                        enable_gqa=s.num_heads != s.num_kv_heads)
    del qp, kp, vp
    return o4[bidx, :, pidx].reshape(n, -1)


def _norm(x: torch.Tensor, mod) -> torch.Tensor:
    return kernels.rmsnorm(x, mod.weight, mod.eps, mod.gemma)


def _add_linear_(x: torch.Tensor, inp: torch.Tensor, lin, post_norm=None) -> None:
    """x += post_norm(lin(inp)), in place; the plain residual add rides on the GEMM (beta=1)."""
    if post_norm is None and lin.bias is None:
        x.addmm_(inp, lin.weight.t())
        return
    h = F.linear(inp, lin.weight, lin.bias)
    if post_norm is not None:
        h = _norm(h, post_norm)
    x.add_(h)


def _qkv(layer, x: torch.Tensor, cos, sin, out=None, row_map=None):
    attn = layer.self_attn
    s = attn.spec
    qkv = F.linear(_norm(x, layer.input_layernorm), attn.qkv_proj.weight, attn.qkv_proj.bias)
    qw = attn.q_norm.weight if s.qk_norm else None
    kw = attn.k_norm.weight if s.qk_norm else None
    eps = attn.q_norm.eps if s.qk_norm else 0.0
    return kernels.qk_norm_rope(qkv, cos, sin, s.num_heads, s.num_kv_heads, s.head_dim, qw, kw, eps,
                                s.gemma_norm, out=out, row_map=row_map)


def _qkv_whole(layer, x: torch.Tensor, cos, sin, chunk: int | None):
    """q, k, v of every row of ``x``, computed ``chunk`` rows at a time (no (N, qkv) activation) if set."""
    n = x.shape[0]
    if chunk is None or n <= chunk:
        return _qkv(layer, x, cos, sin)
    s = layer.self_attn.spec
    q = torch.empty((n, s.num_heads, s.head_dim), dtype=x.dtype, device=x.device)
    k = torch.empty((n, s.num_kv_heads, s.head_dim), dtype=x.dtype, device=x.device)
    v = torch.empty_like(k)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        _qkv(layer, x[a:b], cos[a:b], sin[a:b], out=(q[a:b], k[a:b], v[a:b]))
    return q, k, v


def _mlp_(layer, x: torch.Tensor) -> None:
    mlp = layer.mlp
    act = layer.self_attn.spec.activation
    if layer.sandwich:
        h = _norm(x, layer.pre_feedforward_layernorm)
        post = layer.post_feedforward_layernorm
    else:
        h = _norm(x, layer.post_attention_layernorm)
        post = None
    gu = F.linear(h, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
    del h
    a = kernels.act_mul(gu, act)
    del gu
    _add_linear_(x, a, mlp.down_proj, post)


def _tail_forward(layer, x: torch.Tensor, cos, sin, meta, tail: TailMeta) -> torch.Tensor:
    """The layer's output for the rows of ``tail`` only: keys and values of every row, the rest of those rows."""
    attn = layer.self_attn
    s = attn.spec
    q, k, v = _qkv_whole(layer, x, cos, sin, layer.mlp_chunk)
    o = tail_attention(q.index_select(0, tail.index), k, v, meta, tail, s.attn_scale, attn.window, s.attn_softcap)
    del q, k, v
    x = x.index_select(0, tail.index)
    _add_linear_(x, o.view(x.shape[0], -1), attn.o_proj, layer.post_attention_layernorm if layer.sandwich else None)
    del o
    _mlp_(layer, x)
    return x


def fused_layer_forward(layer, x: torch.Tensor, positions: torch.Tensor, meta,
                        tail: TailMeta | None = None) -> torch.Tensor:
    """Same function as ``DecoderLayer.forward`` on the plain modules, in fewer passes."""
    attn = layer.self_attn
    s = attn.spec
    n = x.shape[0]
    x = x if x.is_contiguous() else x.contiguous()
    cos, sin = _rope_table(attn, positions, meta)
    if tail is not None:
        return _tail_forward(layer, x, cos, sin, meta, tail)
    post_attn = layer.post_attention_layernorm if layer.sandwich else None
    chunk = layer.mlp_chunk
    # Multi-sequence steps are bounded by the step budget and run whole; only a single
    # sequence longer than the chunk (one that runs alone) is prefilled in hybrid chunks.
    if chunk is None or n <= chunk or len(meta.lengths) > 1:
        mode = "varlen"
        if (len(meta.lengths) > 1 and n >= MULTI_MIN_TOKENS and x.is_cuda and s.attn_softcap is None
                and attn.window is None):
            mode = MULTI_ATTENTION
        if mode == "padded":
            o = _padded_attention(layer, x, cos, sin, meta)
        else:
            q, k, v = _qkv(layer, x, cos, sin)
            if mode == "flash":
                o = flash.flash_varlen(q, k, v, meta, s.attn_scale)
            elif mode == "varlen":
                o = packed_attention(q, k, v, meta, s.attn_scale, attn.window, s.attn_softcap)
            else:
                raise ValueError(f"MULTI_ATTENTION must be 'flash', 'varlen' or 'padded'; got {mode!r}")
            del q, k, v
        _add_linear_(x, o.view(n, -1), attn.o_proj, post_attn)
        del o
        _mlp_(layer, x)
        return x

    q, k, v = _qkv_whole(layer, x, cos, sin, chunk)
    kernel_ok = q.is_cuda and s.attn_softcap is None
    if kernel_ok and LONG_ATTENTION == "sdpa" and attn.window is None:
        # whole-sequence causal SDPA (cuDNN / flash backends); its output is read back in chunks
        o4 = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                            is_causal=True, scale=s.attn_scale, enable_gqa=s.num_heads != s.num_kv_heads)
        del q, k, v
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            _add_linear_(x[a:b], o4[0, :, a:b].transpose(0, 1).reshape(b - a, -1), attn.o_proj, post_attn)
        del o4
    elif kernel_ok and _VARLEN is not None:
        # query chunks over keys [0, end): causal aligned bottom-right; the output never exists whole
        bounds, cu_q, cu_k = _query_chunks(meta, n, chunk, x.device)
        kw = varlen_kwargs(s.attn_scale, attn.window, True, s.num_heads != s.num_kv_heads)
        for i, (a, b) in enumerate(bounds):
            o = _VARLEN(q[a:b], k[:b], v[:b], cu_q[i], cu_k[i], b - a, b, **kw)
            _add_linear_(x[a:b], o.view(b - a, -1), attn.o_proj, post_attn)
            del o
        del q, k, v
    else:
        o = packed_attention(q, k, v, meta, s.attn_scale, attn.window, s.attn_softcap).view(n, -1)
        del q, k, v
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            _add_linear_(x[a:b], o[a:b], attn.o_proj, post_attn)
        del o
    for a in range(0, n, chunk):
        _mlp_(layer, x[a : a + chunk])
    return x
