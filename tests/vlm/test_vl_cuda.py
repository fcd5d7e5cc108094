"""The CUDA path (varlen attention, bf16, fused decoder layers) on medium-size random Qwen-VL checkpoints.

Skipped without a GPU. Vision heads have the real head sizes (80 for
Qwen2/2.5-VL, 64 for Qwen3-VL) so the varlen kernel runs as it does for the
released models, with enough patches for several Qwen2.5-VL windows.
"""

from __future__ import annotations

import json

import pytest
import torch

from prefillonly import LLM

from .vlm_helpers import (
    CLIP_MEAN,
    CLIP_STD,
    VL_TEMPLATE,
    hf_inputs,
    hf_render,
    rand_image,
    tokenizer_dir,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LM = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=151936, max_position_embeddings=8192, rms_norm_eps=1e-6)
MEDIUM = {
    "qwen2_vl": (dict(LM, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
                 dict(depth=4, embed_dim=320, hidden_size=256, num_heads=4, mlp_ratio=4, patch_size=14)),
    "qwen2_5_vl": (dict(LM, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
                   dict(depth=4, hidden_size=320, intermediate_size=640, out_hidden_size=256, num_heads=4,
                        patch_size=14, window_size=112, fullatt_block_indexes=[1, 3])),
    "qwen3_vl": (dict(LM, head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                        "mrope_section": [12, 10, 10], "mrope_interleaved": True}),
                 dict(depth=4, hidden_size=256, intermediate_size=512, out_hidden_size=256, num_heads=4, patch_size=16,
                      num_position_embeddings=2304, deepstack_visual_indexes=[0, 1, 2])),
}
IMGS = [rand_image(448, 300, 41), rand_image(200, 520, 42), rand_image(96, 96, 43)]


def _build(arch, root):
    import shutil

    import transformers as tf

    text, vision = MEDIUM[arch]
    cls = {"qwen2_vl": (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration),
           "qwen2_5_vl": (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration),
           "qwen3_vl": (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration)}[arch]
    torch.manual_seed(0)
    model = cls[1](cls[0](text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 0.3)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.04)
    path = root / arch
    model.save_pretrained(path)
    for f in tokenizer_dir().iterdir():
        shutil.copy(f, path / f.name)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = VL_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if arch == "qwen3_vl":
        pre = {"size": {"shortest_edge": 4096, "longest_edge": 512 * 512}, "patch_size": 16, "merge_size": 2,
               "temporal_patch_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    else:
        pre = {"min_pixels": 3136, "max_pixels": 512 * 512, "patch_size": 14, "merge_size": 2,
               "temporal_patch_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path


def _chats():
    return [
        [{"role": "user", "content": [{"type": "image", "image": IMGS[0]}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": IMGS[1]},
                                      {"type": "text", "text": "with"}, {"type": "image", "image": IMGS[2]}]}],
        [{"role": "user", "content": "No image in this one."}],
    ]


@pytest.mark.parametrize("arch", list(MEDIUM))
def test_cuda_matches_transformers(arch, tmp_path):
    import transformers as tf

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    path = _build(arch, tmp_path)
    labels = ["yes", "no", "maybe"]
    hf = getattr(tf, json.loads((path / "config.json").read_text())["architectures"][0])
    hf32 = hf.from_pretrained(path, dtype=torch.float32).cuda().eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    ids = [tok.encode(x, add_special_tokens=False)[0] for x in labels]
    refs, refs16 = [], []
    hf16 = hf.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    for chat in _chats():
        images = [p["image"] for m in chat if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
        inp = {k: v.cuda() for k, v in hf_inputs(path, tok, hf_render(tok, chat), images).items()}
        with torch.no_grad():
            refs.append(torch.softmax(hf32(**inp).logits[0, -1, ids].double(), -1).cpu())
            refs16.append(torch.softmax(hf16(**inp).logits[0, -1, ids].double(), -1).cpu())
    del hf32, hf16
    noise = max(abs(float(a[j] - b[j])) for a, b in zip(refs, refs16) for j in range(len(labels)))
    print(f"{arch}: transformers bf16 vs fp32 max |dp| = {noise:.2e}")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        llm = LLM(path, dtype=dtype, device="cuda", use_tqdm=False)
        got = llm.classify(_chats(), labels=labels)
        worst = max(abs(r.probs[l] - float(ref[j])) for r, ref in zip(got, refs) for j, l in enumerate(labels))
        print(f"{arch} {dtype}: max |dp| vs transformers fp32 = {worst:.2e}")
        assert all(r.error is None for r in got)
        assert worst <= tol
        again = llm.classify(_chats(), labels=labels)  # encoder cache hits give the same answers
        assert max(abs(a.probs[l] - b.probs[l]) for a, b in zip(got, again) for l in labels) < 1e-3
        del llm
        torch.cuda.empty_cache()
