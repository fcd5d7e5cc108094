"""bfloat16 precision of the Qwen vision towers: ours must stay at least as close to float32 as transformers' bf16.

A small random tower per architecture (ViT heads of the released head_dim,
6 blocks; Qwen2.5-VL with several windows and two full-attention blocks), its
weights rounded to bfloat16 first so that only the activations' rounding
counts, as for a released checkpoint. The reference is transformers' float32
forward on the same pixels. Our tower keeps its residual stream in float32
(see qwen_vit's docstring), which on CPU halves the error (about 0.6x of
transformers' bf16); with a bfloat16 stream the ratio is 1.0, so the bound
(0.8) catches the stream going back to bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from prefillonly.models.vision.qwen_vit import QwenVisionTower, qwen_vision_spec

from .vlm_helpers import ARCHS, _hf_classes

RATIO = 0.8  # ours / transformers, relative L2 error of the merged features vs float32

VISION = {  # head_dim 80 (Qwen2/2.5-VL) and 64 (Qwen3-VL), as released
    "qwen2_vl": dict(depth=6, embed_dim=160, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=6, hidden_size=160, intermediate_size=320, out_hidden_size=64, num_heads=2,
                       patch_size=14, window_size=112, fullatt_block_indexes=[2, 5], spatial_merge_size=2,
                       temporal_patch_size=2),
    "qwen3_vl": dict(depth=6, hidden_size=128, intermediate_size=256, out_hidden_size=64, num_heads=2, patch_size=16,
                     num_position_embeddings=256, deepstack_visual_indexes=[1, 4], spatial_merge_size=2,
                     temporal_patch_size=2),
}


def _vision_classes():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q2
    from transformers.models.qwen3_vl import modeling_qwen3_vl as q3

    return {"qwen2_vl": q2.Qwen2VisionTransformerPretrainedModel,
            "qwen2_5_vl": q25.Qwen2_5_VisionTransformerPretrainedModel, "qwen3_vl": q3.Qwen3VLVisionModel}


def _towers(arch: str):
    config_cls, _ = _hf_classes(arch)
    config = config_cls(text_config=ARCHS[arch]["text"], vision_config=VISION[arch])
    vcfg = config.vision_config
    vcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = _vision_classes()[arch](vcfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.normal_(0.0, 0.02)
            else:  # norm weights around 1
                p.normal_(1.0, 0.1)
            p.copy_(p.bfloat16().float())  # a bf16 checkpoint: only the activations' rounding differs
    sd = hf.state_dict()
    state = {}
    for key, value in sd.items():
        if ".mlp.gate_proj." in key:  # Qwen2.5-VL: our gate/up projections are one fused matrix
            up = sd[key.replace("gate_proj", "up_proj")]
            state[key.replace("gate_proj", "gate_up_proj")] = torch.cat([value, up])
        elif ".mlp.up_proj." not in key:
            state[key] = value
    ours = QwenVisionTower(qwen_vision_spec(config, arch)).eval()
    ours.load_state_dict(state, strict=True)
    return hf, ours


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_bf16_tower_is_at_least_as_close_to_float32_as_transformers(arch):
    hf, ours = _towers(arch)
    spec = ours.spec
    grids = [(1, 8, 12), (1, 4, 4)]  # two images: several Qwen2.5-VL windows, partial ones
    n = sum(t * h * w for t, h, w in grids)
    torch.manual_seed(1)
    pixels = torch.randn(n, spec.patch_dim)
    thw = torch.tensor(grids)

    def hf_run(dtype):
        hf.to(dtype)
        with torch.inference_mode():
            return hf(pixels.to(dtype), grid_thw=thw).pooler_output.float()

    def ours_run(dtype):
        ours.to(dtype)
        with torch.inference_mode():
            return ours(pixels, grids)[0].float()

    ref = hf_run(torch.float32)
    assert (ours_run(torch.float32) - ref).abs().max() <= 1e-4 * ref.abs().max()
    rel = lambda x: float((x - ref).norm() / ref.norm())  # noqa: E731
    err_hf, err_ours = rel(hf_run(torch.bfloat16)), rel(ours_run(torch.bfloat16))
    assert err_hf > 1e-3  # the comparison means something: bf16 does round
    assert err_ours <= RATIO * err_hf, f"{arch}: ours bf16 {err_ours:.2e} vs transformers bf16 {err_hf:.2e}"
