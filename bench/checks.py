"""GPU self-checks run before the benchmark: kernels vs the plain modules, varlen attention, graphs.

Each check returns a dict (never raises); ``ok`` says whether it passed.
"""

from __future__ import annotations

import inspect
import traceback

import torch
import torch.nn.functional as F


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _guard(fn):
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # a failed check is a result, not a crash
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}

    wrapped.__name__ = fn.__name__
    return wrapped


def _cuda_seconds(fn, reps: int = 7) -> float:
    """Median GPU time of ``fn`` in seconds (CUDA events), after one untimed call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return sorted(times)[reps // 2]


@_guard
def varlen_signature() -> dict:
    from torch.nn.attention.varlen import varlen_attn

    return {"ok": True, "signature": str(inspect.signature(varlen_attn))}


def _ref_attention(q, k, v, lengths, scale):
    out = torch.empty_like(q)
    s = 0
    g = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (t[s : s + n].transpose(0, 1).float() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        out[s : s + n] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1).to(q.dtype)
        s += n
    return out


@_guard
def varlen_gqa_and_chunks() -> dict:
    """Packed GQA attention vs float32 SDPA; query-chunked (bottom-right causal) vs whole."""
    from prefillonly.models.attention import _VARLEN, _VARLEN_GQA, AttentionMeta, packed_attention

    dev = torch.device("cuda")
    torch.manual_seed(1)
    lengths = [1, 7, 130, 515, 1024]
    n = sum(lengths)
    q = torch.randn(n, 16, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(n, 8, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(n, 8, 128, device=dev, dtype=torch.bfloat16)
    meta = AttentionMeta.from_lengths(lengths, dev)
    out = packed_attention(q, k, v, meta, 128**-0.5)
    ref = _ref_attention(q, k, v, lengths, 128**-0.5)
    res = {"gqa_kwarg": _VARLEN_GQA, "packed_rel": _rel(out, ref)}
    # one long sequence, queries in chunks over keys [0, end)
    L, c = 5000, 1024
    q1, k1, v1 = q.new_empty(0), None, None
    q1 = torch.randn(L, 16, 128, device=dev, dtype=torch.bfloat16)
    k1 = torch.randn(L, 8, 128, device=dev, dtype=torch.bfloat16)
    v1 = torch.randn(L, 8, 128, device=dev, dtype=torch.bfloat16)
    whole = packed_attention(q1, k1, v1, AttentionMeta.from_lengths([L], dev), 128**-0.5)
    kw = {"scale": 128**-0.5, "window_size": (-1, 0)}
    if _VARLEN_GQA:
        kw["enable_gqa"] = True
    parts = []
    for a in range(0, L, c):
        b = min(L, a + c)
        cu_q = torch.tensor([0, b - a], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, b], dtype=torch.int32, device=dev)
        parts.append(_VARLEN(q1[a:b], k1[:b], v1[:b], cu_q, cu_k, b - a, b, **kw))
    chunked = torch.cat(parts)
    res["chunked_vs_whole_maxabs"] = float((chunked.float() - whole.float()).abs().max())
    res["ok"] = res["packed_rel"] < 1e-2 and res["chunked_vs_whole_maxabs"] < 1e-2
    return res


@_guard
def kernels_vs_plain() -> dict:
    """Each fused kernel against the plain module in bf16 on the GPU, and both against float32."""
    from prefillonly.models import kernels
    from prefillonly.models.layers import RMSNorm, Rotary, apply_rotary
    from prefillonly.models.spec import RopeSpec

    dev = torch.device("cuda")
    torch.manual_seed(2)
    res = {}
    for d in (1024, 2560):
        x = torch.randn(4099, d, device=dev)
        w = 1 + 0.1 * torch.randn(d, device=dev)
        norm32 = RMSNorm(d, 1e-6).to(dev)
        norm32.weight.data = w.clone()
        ref = norm32(x)
        norm16 = RMSNorm(d, 1e-6).to(dev).to(torch.bfloat16)
        norm16.weight.data = w.bfloat16()
        plain = norm16(x.bfloat16())
        fused = kernels.rmsnorm(x.bfloat16(), w.bfloat16(), 1e-6)
        res[f"rmsnorm{d}"] = {"fused_vs_plain_maxabs": float((fused.float() - plain.float()).abs().max()),
                              "plain_rel32": _rel(plain, ref), "fused_rel32": _rel(fused, ref)}
    # qk-norm + rope + split
    hq, hk, hd, n = 16, 8, 128, 3001
    qkv = torch.randn(n, (hq + 2 * hk) * hd, device=dev)
    pos = torch.randint(0, 40000, (n,), device=dev)
    inv = 1.0 / (1e6 ** (torch.arange(0, hd, 2).float() / hd))
    rot = Rotary(RopeSpec(inv, 1.0)).to(dev)
    qw, kw = 1 + 0.1 * torch.randn(hd, device=dev), 1 + 0.1 * torch.randn(hd, device=dev)

    def plain_path(t, dtype):
        qn, kn = RMSNorm(hd, 1e-6).to(dev).to(dtype), RMSNorm(hd, 1e-6).to(dev).to(dtype)
        qn.weight.data, kn.weight.data = qw.to(dtype), kw.to(dtype)
        q, k, v = t.to(dtype).split([hq * hd, hk * hd, hk * hd], -1)
        q, k, v = qn(q.reshape(n, hq, hd)), kn(k.reshape(n, hk, hd)), v.reshape(n, hk, hd)
        cos, sin = rot.cos_sin(pos, dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    r32 = plain_path(qkv, torch.float32)
    p16 = plain_path(qkv, torch.bfloat16)
    cos, sin = rot.cos_sin(pos, torch.float32)
    f16 = kernels.qk_norm_rope(qkv.bfloat16(), cos[:, : hd // 2].contiguous(), sin[:, : hd // 2].contiguous(),
                               hq, hk, hd, qw.bfloat16(), kw.bfloat16(), 1e-6)
    f16_full = kernels.qk_norm_rope(qkv.bfloat16(), cos, sin, hq, hk, hd, qw.bfloat16(), kw.bfloat16(), 1e-6)
    res["qk_norm_rope"] = {
        name: {"plain_rel32": _rel(p, r), "fused_rel32": _rel(f, r), "fused_full_table_rel32": _rel(ff, r),
               "fused_vs_plain_maxabs": float((f.float() - p.float()).abs().max())}
        for name, p, f, ff, r in zip("qkv", p16, f16, f16_full, r32)
    }
    gu = torch.randn(4097, 2 * 3072, device=dev)
    ref = F.silu(gu[:, :3072]) * gu[:, 3072:]
    g16 = gu.bfloat16()
    plain = F.silu(g16[:, :3072]) * g16[:, 3072:]
    fused = kernels.act_mul(g16, "silu")
    res["act_mul"] = {"fused_vs_plain_maxabs": float((fused.float() - plain.float()).abs().max()),
                      "plain_rel32": _rel(plain, ref), "fused_rel32": _rel(fused, ref)}
    worst = max(
        [v["fused_rel32"] / max(v["plain_rel32"], 1e-9) for k, v in res.items() if k.startswith("rmsnorm")]
        + [v["fused_rel32"] / max(v["plain_rel32"], 1e-9) for v in res["qk_norm_rope"].values()]
        + [res["act_mul"]["fused_rel32"] / res["act_mul"]["plain_rel32"]]
    )
    res["worst_fused_over_plain_error"] = worst
    res["ok"] = worst < 1.5  # the fused kernels are at least about as accurate as the plain bf16 path
    return res


@_guard
def fused_model_vs_plain(model_dir: str) -> dict:
    """Whole-model final hidden states against a float32 copy: plain bf16, fused, hybrid (single long
    sequence, both long-attention modes) and graph replays. Each bf16 variant must be about as close
    to float32 as the plain bf16 path is (a random model amplifies rounding, so bf16 paths differ
    from each other by about that much too)."""
    from prefillonly.engine import batch
    from prefillonly.engine.accel import configure
    from prefillonly.engine.batch import build_step
    from prefillonly.engine.loader import load_model, read_checkpoint
    from prefillonly.engine.sequence import Sequence
    from prefillonly.models import fastpath

    dev = torch.device("cuda")
    ck = read_checkpoint(model_dir)
    g = torch.Generator().manual_seed(3)
    rand = lambda n: Sequence(torch.randint(0, 150000, (n,), generator=g).tolist())  # noqa: E731
    multi = [rand(n) for n in (3, 64, 300, 1000, 2500)]
    long_default, multi_default = fastpath.LONG_ATTENTION, fastpath.MULTI_ATTENTION
    one = [rand(3000)]
    small = [[rand(64)], [rand(64), rand(17)], [rand(17)]]

    def run(m, seqs):
        st = build_step(seqs, dev)
        return m.final_norm(m.hidden_states(st).index_select(0, st.row_index)).float()

    res = {}
    with torch.inference_mode():
        m32 = load_model(ck, torch.float32, dev)
        ref_multi, ref_one = run(m32, multi), run(m32, one)
        ref_small = [run(m32, b) for b in small]
        del m32
        torch.cuda.empty_cache()
        m = load_model(ck, torch.bfloat16, dev)
        configure(m, dev, torch.bfloat16, fused_kernels=False, cuda_graphs=False, prefill_chunk_size=0)
        res["plain_rel32"] = _rel(run(m, multi), ref_multi)
        res["plain_single_rel32"] = _rel(run(m, one), ref_one)
        res["plain_small_rel32"] = max(_rel(run(m, b), r) for b, r in zip(small, ref_small))
        configure(m, dev, torch.bfloat16, fused_kernels=True, cuda_graphs=False, prefill_chunk_size=0)
        res["fused_rel32"] = _rel(run(m, multi), ref_multi)  # the last layer on each sequence's last row only
        batch.LAST_LAYER_TAIL = False
        res["fused_notail_rel32"] = _rel(run(m, multi), ref_multi)
        batch.LAST_LAYER_TAIL = True
        configure(m, dev, torch.bfloat16, fused_kernels=True, cuda_graphs=False, prefill_chunk_size=512)
        for mode in ("varlen", "sdpa"):
            fastpath.LONG_ATTENTION = mode
            res[f"hybrid_{mode}_single_rel32"] = _rel(run(m, one), ref_one)
        fastpath.LONG_ATTENTION = long_default
        configure(m, dev, torch.bfloat16, fused_kernels=True, cuda_graphs=False, prefill_chunk_size=None)
        for mode in ("varlen", "flash", "padded"):
            fastpath.MULTI_ATTENTION = mode
            try:
                res[f"multi_{mode}_rel32"] = _rel(run(m, multi), ref_multi)
            except Exception as e:
                res[f"multi_{mode}_rel32"] = f"{type(e).__name__}: {str(e)[:300]}"
        fastpath.MULTI_ATTENTION = multi_default
        graphs = configure(m, dev, torch.bfloat16, fused_kernels=True, cuda_graphs=True, prefill_chunk_size=None)
        errs = []
        for b, r in zip(small + small, ref_small + ref_small):  # capture, then replay
            st = build_step(b, dev)
            assert graphs.accepts(st)
            errs.append(_rel(m.final_norm(graphs.run(st).index_select(0, st.row_index)).float(), r))
        res["graph_small_rel32"] = max(errs)
        res["graphs_captured"] = [list(k) for k in graphs.graphs]
    tol = lambda ref: 1.5 * ref + 2e-3  # noqa: E731
    res["ok"] = (res["fused_rel32"] <= tol(res["plain_rel32"]) and res["fused_notail_rel32"] <= tol(res["plain_rel32"])
                 and res["hybrid_varlen_single_rel32"] <= tol(res["plain_single_rel32"])
                 and res["hybrid_sdpa_single_rel32"] <= tol(res["plain_single_rel32"])
                 and res["graph_small_rel32"] <= tol(res["plain_small_rel32"])
                 and all(isinstance(res[f"multi_{mode}_rel32"], float) and res[f"multi_{mode}_rel32"] <= tol(res["plain_rel32"]) for mode in ("varlen", "flash")))
    return res


@_guard
def long_attention_micro(length: int = 32768) -> dict:
    """One causal sequence, Qwen3-0.6B heads (16 q / 8 kv, d 128): time and extra memory per kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from prefillonly.models.attention import _VARLEN, _VARLEN_GQA

    dev = torch.device("cuda")
    L, hq, hk, d = length, 16, 8, 128
    q = torch.randn(L, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(L, hk, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(L, hk, d, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    kw = {"scale": d**-0.5, "window_size": (-1, 0)}
    if _VARLEN_GQA:
        kw["enable_gqa"] = True

    def chunked(c=8192):
        for a in range(0, L, c):
            b = min(L, a + c)
            _VARLEN(q[a:b], k[:b], v[:b], torch.tensor([0, b - a], dtype=torch.int32, device=dev),
                    torch.tensor([0, b], dtype=torch.int32, device=dev), b - a, b, **kw)

    def sdpa(backend=None):
        args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        if backend is None:
            return F.scaled_dot_product_attention(*args, is_causal=True, scale=d**-0.5, enable_gqa=True)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(*args, is_causal=True, scale=d**-0.5, enable_gqa=True)

    cases = {
        "varlen_whole": lambda: _VARLEN(q, k, v, cu, cu, L, L, **kw),
        "varlen_qchunks8192": chunked,
        "sdpa_auto": sdpa,
        "sdpa_cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": lambda: sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    flops = 2 * L * L * hq * d
    res = {}
    for name, fn in cases.items():
        try:
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            t = _cuda_seconds(fn, 5)
            res[name] = {"ms": t * 1e3, "tflops": flops / t / 1e12,
                         "extra_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    res["ok"] = True
    return res


@_guard
def multi_attention_micro() -> dict:
    """Attention of one packed multi-sequence step (W1- and W2-like lengths) in each mode, time only."""
    from prefillonly.models.attention import AttentionMeta, packed_attention

    dev = torch.device("cuda")
    hq, hk, d = 16, 8, 128
    res = {}
    g = torch.Generator().manual_seed(5)
    for name, lo, hi, budget in (("w1_like", 540, 620, 16384), ("w2_like", 250, 280, 16384)):
        lengths = []
        while sum(lengths) + hi <= budget:
            lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
        n = sum(lengths)
        meta = AttentionMeta.from_lengths(lengths, dev)
        q = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(n, hk, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(n, hk, d, device=dev, dtype=torch.bfloat16)
        b, lmax = len(lengths), max(lengths)
        rows = torch.cat([torch.arange(i * lmax, i * lmax + L) for i, L in enumerate(lengths)]).to(dev)
        bidx = torch.cat([torch.full((L,), i) for i, L in enumerate(lengths)]).to(dev)
        pidx = torch.cat([torch.arange(L) for L in lengths]).to(dev)
        cu = meta.cu_seqlens

        def padded():
            qp = torch.zeros(b * lmax, hq, d, device=dev, dtype=q.dtype)
            kp = torch.zeros(b * lmax, hk, d, device=dev, dtype=q.dtype)
            vp = torch.zeros(b * lmax, hk, d, device=dev, dtype=q.dtype)
            qp[rows], kp[rows], vp[rows] = q, k, v  # in the engine the q/k/v kernel scatters for free
            sh = lambda t: t.view(b, lmax, t.shape[1], d).transpose(1, 2)  # noqa: E731
            o4 = F.scaled_dot_product_attention(sh(qp), sh(kp), sh(vp), is_causal=True, scale=d**-0.5, enable_gqa=True)
            return o4[bidx, :, pidx]

        def cudnn(expand):
            kk, vv = (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)) if expand else (k, v)
            return torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, cu, cu, lmax, lmax, True, 0.0, True, False,
                                                          scale=d**-0.5)[0]

        ref = packed_attention(q, k, v, meta, d**-0.5)
        cases = {"varlen": lambda: packed_attention(q, k, v, meta, d**-0.5), "padded": padded,
                 # cuDNN's ragged path through the private aten op (off in torch's varlen_attn): 0.3-0.7 TFLOP/s
                 # on an H100 with torch 2.11 (bench/NOTES.md), kept here to re-measure on newer builds
                 "cudnn": lambda: cudnn(False), "cudnn_x": lambda: cudnn(True)}
        flops = sum(2 * L * L * hq * d for L in lengths)
        out = {"tokens": n, "seqs": b}
        for cname, fn in cases.items():
            try:
                o = fn()
                err = float((o.float().reshape(n, -1) - ref.float().reshape(n, -1)).abs().max())
                t = _cuda_seconds(fn)
                out[cname] = {"ms": t * 1e3, "tflops": flops / t / 1e12, "maxabs_vs_varlen": err}
            except Exception as ex:
                out[cname] = {"error": f"{type(ex).__name__}: {str(ex)[:300]}"}
        res[name] = out
    res["ok"] = True
    return res


def _steps(n: int, lo: int, hi: int, budget: int, seed: int) -> list[list[int]]:
    """The lengths of the scheduler's steps (engine.scheduler.plan_steps) over a random mix."""
    from prefillonly.engine.scheduler import plan_steps
    from prefillonly.engine.sequence import Sequence

    g = torch.Generator().manual_seed(seed)
    seqs = [Sequence([0] * L) for L in torch.randint(lo, hi + 1, (n,), generator=g).tolist()]
    return [[len(seqs[i]) for i in step] for step in plan_steps(seqs, budget)]


# (positions per tile, BLOCK_N, warps, stages, pack): decoder layouts (GQA, causal) and vision towers
FLASH_CONFIGS = ((64, 64, 4, 3, 1), (64, 64, 4, 2, 1), (64, 64, 4, 3, 2), (64, 64, 8, 3, 2), (64, 64, 8, 2, 2),
                 (32, 64, 4, 3, 2), (64, 32, 4, 3, 2), (128, 64, 8, 3, 1))
TOWER_CONFIGS = ((64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2),
                 (64, 128, 4, 3), (64, 128, 4, 2), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 4))


@_guard
def flash_micro() -> dict:
    """Our Triton attention (models.flash) against torch's flash varlen: accuracy, then the time of one
    layer's attention over every step of W1/W2-like mixes and vision-tower-like layouts, per config."""
    from prefillonly.models import flash
    from prefillonly.models.attention import AttentionMeta, packed_attention

    dev = torch.device("cuda")
    torch.manual_seed(4)
    res: dict = {"accuracy": {}}
    worst = 0.0
    for name, lengths, hq, hk, d, causal in (("gqa128", [1, 7, 64, 130, 515, 1024], 16, 8, 128, True),
                                             ("mha64_full", [16, 784, 1000, 3], 16, 16, 64, False),
                                             ("mha80_full", [64] * 9 + [200], 16, 16, 80, False)):
        n = sum(lengths)
        q, k, v = (torch.randn(n, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hk, hk))
        meta = AttentionMeta.from_lengths(lengths, dev)
        ref = packed_attention(q.float(), k.float(), v.float(), meta, d**-0.5, causal=causal)
        base = _rel(packed_attention(q, k, v, meta, d**-0.5, causal=causal), ref)
        for cfg in FLASH_CONFIGS[:4] + TOWER_CONFIGS[3:4]:
            err = _rel(flash.flash_varlen(q, k, v, meta, d**-0.5, causal=causal, config=cfg), ref)
            res["accuracy"][f"{name} {cfg}"] = {"flash_rel32": err, "varlen_rel32": base}
            worst = max(worst, err / max(base, 1e-6))
    layouts = {  # name: (steps, hq, hk, d, causal)
        "w1_steps": (_steps(512, 128, 1024, 16384, 1), 16, 8, 128, True),
        "w2_steps": (_steps(2048, 16, 512, 16384, 2), 16, 8, 128, True),
        "vl_lm_mixed": (_steps(96, 100, 1800, 16384, 3), 16, 8, 128, True),
        "tower_q3_448": ([[784] * 20], 16, 16, 64, False),
        "tower_q3_mixed": (_steps(24, 196, 7056, 32768, 5), 16, 16, 64, False),
        "tower_q25_window": ([[64] * 400], 16, 16, 80, False),
        "tower_q25_mixed": (_steps(24, 256, 5184, 32768, 6), 16, 16, 80, False),
    }
    for name, (steps, hq, hk, d, causal) in layouts.items():
        metas = [AttentionMeta.from_lengths(s, dev) for s in steps]
        tensors = [tuple(torch.randn(sum(s), h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hk, hk))
                   for s in steps]
        flops = sum((2 if causal else 4) * L * L * hq * d for s in steps for L in s)
        out: dict = {"steps": len(steps), "tokens": sum(map(sum, steps))}

        def run(fn):
            t = _cuda_seconds(lambda: [fn(*qkv, m) for qkv, m in zip(tensors, metas)], 5)
            return {"ms": t * 1e3, "tflops": flops / t / 1e12}

        out["varlen"] = run(lambda q, k, v, m: packed_attention(q, k, v, m, d**-0.5, causal=causal))
        for cfg in FLASH_CONFIGS if causal else TOWER_CONFIGS:
            key = "-".join(map(str, cfg))
            try:
                out[key] = run(lambda q, k, v, m: flash.flash_varlen(q, k, v, m, d**-0.5, causal=causal, config=cfg))
            except Exception as e:  # a config that does not fit (shared memory, registers) is a result
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        best = min((v["ms"], k) for k, v in out.items() if isinstance(v, dict) and "ms" in v and k != "varlen")
        out["best"] = {"config": best[1], "speedup_vs_varlen": out["varlen"]["ms"] / best[0]}
        res[name] = out
    res["ok"] = worst < 1.5
    return res


@_guard
def tower_sdpa_micro() -> dict:
    """The vision tower's bidirectional attention (head dim 64) by our kernel against torch's SDPA backends called
    once per image (cuDNN, flash), on mixed-size steps and on the long and short images of those steps apart:
    whether a hybrid (a library kernel for long images) would beat ours."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from prefillonly.models import flash
    from prefillonly.models.attention import AttentionMeta, packed_attention

    dev = torch.device("cuda")
    torch.manual_seed(6)
    h, d = 16, 64
    steps = _steps(24, 196, 7056, 32768, 5)
    lengths = [L for s in steps for L in s]
    groups = {"all": lengths, "long_ge2048": [L for L in lengths if L >= 2048],
              "short_lt2048": [L for L in lengths if L < 2048], "one_7056": [7056], "twenty_784": [784] * 20}
    res: dict = {}
    for name, ls in groups.items():
        n = sum(ls)
        q, k, v = (torch.randn(n, h, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        meta = AttentionMeta.from_lengths(ls, dev)
        starts = [0]
        for L in ls:
            starts.append(starts[-1] + L)
        flops = sum(4 * L * L * h * d for L in ls)

        def per_image(backend):
            out = torch.empty_like(q)
            with sdpa_kernel(backend):
                for s0, L in zip(starts, ls):
                    view = lambda t: t.narrow(0, s0, L).transpose(0, 1).unsqueeze(0)  # noqa: E731
                    o = F.scaled_dot_product_attention(view(q), view(k), view(v), scale=d**-0.5)
                    out.narrow(0, s0, L).copy_(o[0].transpose(0, 1))
            return out

        cases = {"ours": lambda: flash.flash_varlen(q, k, v, meta, d**-0.5, causal=False, config=flash.TOWER_CONFIG),
                 "cudnn_per_image": lambda: per_image(SDPBackend.CUDNN_ATTENTION),
                 "flash_per_image": lambda: per_image(SDPBackend.FLASH_ATTENTION)}
        ref = packed_attention(q.float(), k.float(), v.float(), meta, d**-0.5, causal=False) if n <= 40000 else None
        out: dict = {"images": len(ls), "tokens": n}
        for cname, fn in cases.items():
            try:
                o = fn()
                t = _cuda_seconds(fn, 5)
                out[cname] = {"ms": t * 1e3, "tflops": flops / t / 1e12,
                              "rel32": _rel(o, ref) if ref is not None else None}
            except Exception as e:  # a backend that cannot run this shape is a result
                out[cname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res[name] = out
    res["ok"] = True
    return res

def gelu_epilogue() -> dict:
    """The vision towers' fc1 + tanh-GELU as one cuBLASLt call (``torch._addmm_activation``) against the two-pass
    form: which GELU the epilogue computes (tanh or erf, against float32), and the time at a tower's shapes."""
    dev = torch.device("cuda")
    torch.manual_seed(5)
    res: dict = {}
    x32, w32, b32 = torch.randn(4096, 1024, device=dev), torch.randn(4096, 1024, device=dev) / 32, torch.randn(4096, device=dev)
    pre = torch.addmm(b32, x32, w32.t())
    for approx in ("tanh", "none"):
        ref = F.gelu(pre, approximate=approx)
        res[f"fp32_vs_{approx}"] = _rel(torch._addmm_activation(b32, x32, w32.t(), use_gelu=True), ref)
        xb, wb, bb = x32.bfloat16(), w32.bfloat16(), b32.bfloat16()
        res[f"bf16_epilogue_vs_{approx}32"] = _rel(torch._addmm_activation(bb, xb, wb.t(), use_gelu=True), ref)
        res[f"bf16_twopass_vs_{approx}32"] = _rel(F.gelu(F.linear(xb, wb, bb), approximate=approx), ref)
    for rows in (16384, 65536):
        x = torch.randn(rows, 1024, device=dev, dtype=torch.bfloat16)
        w, b = torch.randn(4096, 1024, device=dev, dtype=torch.bfloat16) / 32, torch.randn(4096, device=dev, dtype=torch.bfloat16)
        flops = 2 * rows * 1024 * 4096
        two = _cuda_seconds(lambda: F.gelu(F.linear(x, w, b), approximate="tanh"))
        one = _cuda_seconds(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
        plain = _cuda_seconds(lambda: F.linear(x, w, b))
        res[f"rows{rows}"] = {"two_pass_ms": two * 1e3, "epilogue_ms": one * 1e3, "linear_only_ms": plain * 1e3,
                              "linear_tflops": flops / plain / 1e12}
    res["ok"] = res["fp32_vs_tanh"] < 1e-5
    return res


@_guard
def gemm_layouts() -> dict:
    """The towers' and the decoder's GEMMs at their real shapes: weights as stored (x @ W^T, cuBLAS's TN) against
    weights kept transposed (x @ W', NN), through cuBLAS and cuBLASLt: whether a layout or library beats the
    default at small K (the Qwen3-VL tower's K = 1024)."""
    dev = torch.device("cuda")
    torch.manual_seed(7)
    shapes = {  # name: (rows, out, in, epilogue)
        "tower_qkv": (32768, 3072, 1024, "bias"), "tower_proj": (32768, 1024, 1024, "bias"),
        "tower_fc1": (32768, 4096, 1024, "gelu"), "tower_fc2": (32768, 1024, 4096, "bias"),
        "lm_qkv": (16384, 4096, 2048, "none"), "lm_o": (16384, 2048, 2048, "residual"),
        "lm_gate_up": (16384, 12288, 2048, "none"), "lm_down": (16384, 2048, 6144, "residual"),
    }
    res: dict = {}
    default_lib = torch.backends.cuda.preferred_blas_library()
    for name, (m, n, k, epi) in shapes.items():
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        wt = w.t().contiguous()
        b = torch.randn(n, device=dev, dtype=torch.bfloat16)
        r = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

        def call(weight):  # weight: (k, n), a transposed view of w or its contiguous copy
            if epi == "bias":
                return torch.addmm(b, x, weight)
            if epi == "gelu":
                return torch._addmm_activation(b, x, weight, use_gelu=True)
            if epi == "residual":
                return r.addmm_(x, weight)
            return x @ weight

        out: dict = {}
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            for layout, weight in (("tn", w.t()), ("nn", wt)):
                t = _cuda_seconds(lambda: call(weight), 9)
                out[f"{lib}_{layout}"] = round(2 * m * n * k / t / 1e12, 1)
        torch.backends.cuda.preferred_blas_library(default_lib)
        out["same_result"] = _rel(call(wt), call(w.t())) if epi != "residual" else None
        res[name] = out
    res["ok"] = True
    return res
