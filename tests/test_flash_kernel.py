"""The Triton kernels on the CPU: the attention kernel (models.flash) against the portable attention
path, and the fused decoder layer (models.fastpath) against the plain modules.

Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported, hence the
subprocess) runs the kernel with numpy, so its indexing, causal masking, GQA head mapping,
padded head dims and tile schedule are checked here without a GPU. Its speed is measured on
the device (``python -m bench.run --checks --check-list flash_micro``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# triton (the test extra) publishes Linux wheels only; everywhere it installs, this runs
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="triton has no wheels for this platform")

ROOT = Path(__file__).resolve().parents[1]

SHIM = r"""
import numpy as np
import triton.runtime.interpreter as interp

# triton 3.6's interpreter turns a loaded scalar into an index with int() on a 1-element array,
# which numpy >= 2.4 refuses; index its single element instead.
_patch = getattr(interp, "_patch_lang_tensor", None)
if _patch is not None:
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
    interp._patch_lang_tensor = _patched
"""

CHILD = SHIM + r"""
import json, sys
import torch
from prefillonly.models.attention import AttentionMeta, _portable_attention
from prefillonly.models.flash import flash_varlen

torch.manual_seed(0)
out = []
for lengths, hq, hk, d, causal, cfg in json.loads(sys.argv[1]):
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, d) for h in (hq, hk, hk))
    meta = AttentionMeta.from_lengths(lengths, torch.device("cpu"))
    ref = _portable_attention(q, k, v, lengths, d ** -0.5, None, None, causal)
    for dtype in ("float32", "float16"):
        dt = getattr(torch, dtype)
        o = flash_varlen(q.to(dt), k.to(dt), v.to(dt), meta, d ** -0.5, causal=causal, config=tuple(cfg))
        out.append({"case": [lengths, hq, hk, d, causal, cfg], "dtype": dtype,
                    "err": float((o.float() - ref).abs().max())})
print(json.dumps(out))
"""

CASES = [
    # lengths, q heads, kv heads, head dim, causal, (positions per tile, BLOCK_N, warps, stages[, pack])
    ([5, 70, 33, 1, 64], 4, 2, 32, True, [16, 16, 4, 1]),  # GQA, tiles below/at/over the diagonal
    ([5, 70, 33, 1, 64], 4, 2, 32, True, [32, 16, 4, 1]),  # query tile wider than key tile
    ([5, 70, 33, 1, 64], 8, 2, 32, True, [16, 16, 4, 1, 4]),  # a GQA group of 4 heads stacked in one tile
    ([5, 70, 33, 1, 64], 8, 2, 32, True, [64, 16, 4, 1, 4]),  # capped at 128 rows: 2 heads per tile
    ([40, 17, 3], 6, 2, 32, True, [16, 32, 4, 1, 3]),  # group of 3: not a power of two, one head per tile
    ([5, 70, 33, 1, 64], 4, 4, 32, False, [16, 32, 4, 1]),  # vision towers: bidirectional
    ([40, 17], 6, 2, 80, True, [32, 32, 4, 1]),  # head dim 80 (Qwen2.5-VL) padded to 128
    ([40, 17], 2, 2, 20, False, [16, 16, 4, 1]),
]


def _interpreted(code: str, *args: str):
    """Run ``code`` in a child with Triton's interpreter on; its last stdout line, as JSON."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_flash_kernel_matches_portable_attention():
    results = _interpreted(CHILD, json.dumps(CASES))
    assert len(results) == 2 * len(CASES)
    for r in results:
        tol = 2e-6 if r["dtype"] == "float32" else 5e-3
        assert r["err"] < tol, r


def test_tile_table_puts_the_most_keys_first():
    from prefillonly.models.flash import tile_table

    seqs, starts = tile_table([10, 40, 25], 16, causal=True)
    tiles = list(zip(seqs, starts))
    assert sorted(tiles) == [(0, 0), (1, 0), (1, 16), (1, 32), (2, 0), (2, 16)]
    assert [m for _, m in tiles] == sorted((m for _, m in tiles), reverse=True)
    seqs, starts = tile_table([10, 40, 25], 16, causal=False)
    assert list(seqs)[:3] == [1, 1, 1] and list(seqs)[-1] == 0


FUSED_CHILD = SHIM + r"""
import json, sys
from prefillonly import LLM
from prefillonly.models import fastpath

llm = LLM(sys.argv[1], dtype="float32", device="cpu", use_tqdm=False)
prompts = [list(range(5 + i, 40 + 7 * i)) for i in range(6)]
plain = [r.embedding for r in llm.embed(prompts)]
fastpath.enable(llm.model, True)  # the CUDA fast path's layer code and Triton kernels, interpreted on the CPU
fused = [r.embedding for r in llm.embed(prompts)]
for layer in llm.model.model.layers:
    layer.mlp_chunk = 16  # hybrid prefilling of a prompt that runs alone
chunked = llm.embed(prompts[-1]).embedding
print(json.dumps({"fused": max(float(abs(a - b).max()) for a, b in zip(plain, fused)),
                  "chunked": float(abs(chunked - plain[-1]).max())}))
"""


def test_fused_decoder_layers_match_the_plain_path(tiny_path):
    """models.fastpath (norm, q/k-norm + rotary and gated-activation kernels, per-step rotary tables, hybrid
    chunks) against the plain modules on the same checkpoint, in float32."""
    res = _interpreted(FUSED_CHILD, str(tiny_path("qwen3_tied")))
    assert res["fused"] < 1e-5 and res["chunked"] < 1e-5, res


TOWER_CHILD = SHIM + r"""
import json
import torch
from prefillonly.models.vision.qwen_vit import QwenVisionSpec, QwenVisionTower

out = {}
for kind in ("qwen3_vl", "qwen2_5_vl"):
    torch.manual_seed(0)
    qwen3 = kind == "qwen3_vl"
    spec = QwenVisionSpec(kind=kind, hidden_size=64, num_heads=2, depth=3, intermediate_size=96,
                          activation="gelu_pytorch_tanh" if qwen3 else "silu", patch_size=4, temporal_patch_size=2,
                          in_channels=3, merge_size=2, out_hidden_size=48, window_size=None if qwen3 else 16,
                          fullatt_block_indexes=[] if qwen3 else [1], num_position_embeddings=64 if qwen3 else None,
                          deepstack_indexes=[0, 2] if qwen3 else [])
    tower = QwenVisionTower(spec).eval()
    with torch.no_grad():
        for name, p in tower.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight") else 0.2 * torch.randn_like(p))
    grids = [(1, 4, 6), (1, 8, 8), (1, 2, 2), (2, 4, 4)]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), spec.patch_dim)
    with torch.inference_mode():
        plain, plain_deep = tower(pixels, grids)
        tower.fused = True  # rotary split (v left in place), add+norm, gated activation and attention kernels
        fused, fused_deep = tower(pixels, grids)
    errs = [float((a - b).abs().max()) for a, b in zip([plain, *plain_deep], [fused, *fused_deep])]
    out[kind] = {"err": max(errs), "scale": float(plain.abs().max()), "levels": len(errs)}
print(json.dumps(out))
"""


def test_fused_vision_towers_match_the_plain_modules():
    """The Qwen towers' fused path (the CUDA one: Triton rotary with v read in place by the attention kernel,
    add+norm, gated activation, bidirectional flash attention over images and windows) against the plain
    modules, in float32 on the CPU."""
    res = _interpreted(TOWER_CHILD)
    assert res["qwen3_vl"]["levels"] == 3 and res["qwen2_5_vl"]["levels"] == 1, res
    for kind, r in res.items():
        assert r["scale"] > 0.1 and r["err"] < 1e-5 * max(1.0, r["scale"]), (kind, r)
