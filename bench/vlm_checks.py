"""The VLM benchmark's correctness checks: our engine against transformers float32 per Qwen-VL architecture
(medium random models on the device, tiny ones with ``--smoke``), the fused and the plain bf16 paths, and our
transformers pipeline against ``AutoProcessor``. Folded here from the former CUDA-only tests; ``bench.vlm``
runs them before timing.
"""

from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from bench.common import free, load_ours, log
from bench.vlm import HFEngine, chat, chat_template, finish_checkpoint, images_of, synth_image


def _check_config(arch: str, tiny: bool) -> tuple[dict, dict]:
    """(text, vision) config. Medium: vision heads of the released sizes (80 for Qwen2/2.5-VL, 64 for Qwen3-VL),
    several Qwen2.5-VL windows. Tiny (--smoke): the same structure at widths a CPU runs in seconds."""
    h, v, n, q3 = (64, 32, 2, 32) if tiny else (256, 320, 4, 256)  # LM width, ViT width and heads, Qwen3 ViT width
    lm = dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2 if tiny else 4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=h // 4, vocab_size=151936, max_position_embeddings=8192, rms_norm_eps=1e-6)
    u = h // 64  # M-RoPE sections sum to head_dim / 2 = h / 8
    if arch == "qwen3_vl":
        return (dict(lm, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4 * u, 2 * u, 2 * u],
                                          "mrope_interleaved": True}),
                dict(depth=4, hidden_size=q3, intermediate_size=2 * q3, out_hidden_size=h, num_heads=n, patch_size=16,
                     num_position_embeddings=64 if tiny else 2304, deepstack_visual_indexes=[0, 1, 2]))
    text = dict(lm, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2 * u, 3 * u, 3 * u]})
    if arch == "qwen2_vl":
        return text, dict(depth=4, embed_dim=v, hidden_size=h, num_heads=n, mlp_ratio=2, patch_size=14)
    return text, dict(depth=4, hidden_size=v, intermediate_size=2 * v, out_hidden_size=h, num_heads=n, patch_size=14,
                      window_size=112, fullatt_block_indexes=[1, 3])


def _check_checkpoint(arch: str, root: Path, tiny: bool) -> Path:
    import transformers as tf

    cfg_cls, model_cls = {"qwen2_vl": (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration),
                          "qwen2_5_vl": (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration),
                          "qwen3_vl": (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration)}[arch]
    text, vision = _check_config(arch, tiny)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():  # wider than the default init, so that wrong answers differ visibly
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 0.3)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.04)
    path = root / arch
    model.save_pretrained(path)
    for f in common.TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    pre = {"merge_size": 2, "temporal_patch_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}
    if arch == "qwen3_vl":
        pre.update(size={"shortest_edge": 4096, "longest_edge": 512 * 512}, patch_size=16, image_mean=[0.5] * 3,
                   image_std=[0.5] * 3)
    else:
        pre.update(min_pixels=3136, max_pixels=512 * 512, patch_size=14, image_mean=[0.48145466, 0.4578275, 0.40821073],
                   image_std=[0.26862954, 0.26130258, 0.27577711])
    finish_checkpoint(path, chat_template(default_system=False), pre)
    return path


def _check_chats() -> list[list[dict]]:
    imgs = [synth_image(448, 300, 41), synth_image(200, 520, 42), synth_image(96, 96, 43)]
    return [chat(imgs[0], "What is it?"),
            [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": imgs[1]},
                                          {"type": "text", "text": "with"}, {"type": "image", "image": imgs[2]}]}],
            [{"role": "user", "content": "No image in this one."}]]


def _check_arch(path: Path, labels: list[str]) -> dict:
    import transformers as tf

    cls = getattr(tf, json.loads((path / "config.json").read_text())["architectures"][0])
    refs = {}
    for dt in (torch.float32, torch.bfloat16):  # one request at a time, the PIL processor (our pixels)
        hf = cls.from_pretrained(path, dtype=dt).to(common.DEV).eval()
        engine = HFEngine(hf, path, labels, backend="pil", batch_size=1, workers=0)
        refs[dt], hf_backend = engine.run(_check_chats()), engine.backend
        del hf, engine
        free()
    res: dict[str, Any] = {"transformers_bf16_vs_fp32": float(np.abs(refs[torch.bfloat16] - refs[torch.float32]).max())}
    probs = {}
    # bf16 twice: the fused Triton kernels (the CUDA default, LM and vision tower) and the plain modules
    for name, dt, tol, kw in (("float32", "float32", 1e-4, {}), ("bfloat16", "bfloat16", 3e-2, {}),
                              ("bfloat16_plain", "bfloat16", 3e-2, {"fused_kernels": False})):
        llm, _, _ = load_ours(path, dtype=dt, **kw)
        got, again = (llm.classify(_check_chats(), labels=labels, use_tqdm=False) for _ in range(2))  # 2nd: cache hits
        p, q = (np.array([[r.probs[x] for x in labels] for r in rs]) for rs in (got, again))
        worst, hit = float(np.abs(p - refs[torch.float32]).max()), float(np.abs(p - q).max())
        errors = [r.error for r in got if r.error]
        probs[name] = p
        res[name] = {"max_abs_dp_vs_fp32": worst, "tol": tol, "cache_hit_max_dp": hit, "errors": errors,
                     "transformers_image_backend": hf_backend, "ok": worst <= tol and hit < 1e-3 and not errors}
        del llm
        free()
    res["bf16_fused_vs_plain"] = float(np.abs(probs["bfloat16"] - probs["bfloat16_plain"]).max())
    res["ok"] = all(res[k]["ok"] for k in ("float32", "bfloat16", "bfloat16_plain"))
    return res


def engine_checks(root: Path, tiny: bool = False) -> dict:
    """Ours (float32: |dp| <= 1e-4, bf16: <= 3e-2) against transformers float32, per architecture; ``tiny``
    (--smoke) swaps the medium models for tiny ones, to test this code rather than the kernels."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = {}
    try:
        for arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            try:
                out[arch] = _check_arch(_check_checkpoint(arch, root, tiny), ["yes", "no", "maybe"])
            except Exception:
                out[arch] = {"ok": False, "error": traceback.format_exc()[-2000:]}
            log(f"check {arch}: {json.dumps(out[arch], default=str)[:600]}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def processor_equivalence(path: Path, hf: HFEngine, chats: list[list[dict]]) -> dict:
    """HFEngine.prep gives what transformers' AutoProcessor gives (where it can be built: needs torchvision)."""
    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
    except Exception as e:
        why = (str(e).strip() or "?").splitlines()[0][:120]
        return {"skipped": f"AutoProcessor unavailable ({type(e).__name__}: {why})"}
    try:
        proc.tokenizer.padding_side = "left"
        texts = [hf.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        ref = proc(text=texts, images=[i for c in chats for i in images_of(c)], padding=True, return_tensors="pt")
        got = hf.prep(chats)  # not tuned yet: its image processor runs on the CPU, as AutoProcessor's
        same = all(torch.equal(ref[k], got[k]) for k in ("input_ids", "attention_mask", "image_grid_thw"))
        dpix = float((ref["pixel_values"].float() - got["pixel_values"].float()).abs().max())
        return {"ok": same and dpix < 1e-5, "same_ids_mask_grids": same, "max_abs_dpixel": dpix}
    except Exception:
        return {"ok": False, "error": traceback.format_exc()[-1500:]}
