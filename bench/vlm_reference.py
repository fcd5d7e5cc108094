"""bf16 noise against a float32 reference, for the VLM bench.

Our bf16 probabilities can miss the 2e-2 / 99% agreement with transformers bf16 on a random-weight model
(Qwen2.5-VL-3B) while matching transformers float32 to ~1e-6 in float32. To tell bf16 rounding from an
engine error, both engines' bf16 outputs on a few requests per workload are set against transformers
float32 on the same checkpoint, each on its own pixels (transformers its image processor's, ours PIL's):
ours is within bf16 noise when it is no further from float32 than transformers bf16 is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from bench.common import LABELS, agree_probs, free

MEAN_RATIO = 1.25  # ours' mean |dp| vs float32 may be this many times transformers'
ARGMAX_SLACK = 0.01  # ours' argmax agreement with float32 may be this far below transformers'
MEAN_FLOOR = 1e-4  # float32 runs (--smoke): both differences are ~0, far under any bf16 noise
RULE = (f"ours within bf16 noise: ours' mean |dp| vs float32 <= {MEAN_RATIO} x transformers bf16's (or <= "
        f"{MEAN_FLOOR:.0e}) and ours' argmax agreement with float32 >= transformers bf16's - "
        f"{ARGMAX_SLACK * 100:.0f} point")
REF_BATCH = 8  # float32 activations of large V2 images: smaller batches than the timed bf16 runs


def fp32_reference(path: Path, subsets: dict[str, dict], backend: str,
                   workers: int) -> dict[str, dict[str, np.ndarray]]:
    """p(yes) of transformers float32 (sdpa, TF32 off) per workload and pixel backend: the timed transformers
    engine's (default backend, same image device) and PIL, ours, when they differ. The model is freed after."""
    from transformers import AutoModelForImageTextToText

    from bench.vlm import HFEngine

    tf32, model = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32), None
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        model = model.to(common.DEV).eval()
        for wname, s in subsets.items():
            out[wname] = {}
            for b in dict.fromkeys([backend, "pil"]):
                engine = HFEngine(model, path, LABELS, None if b == backend else b, REF_BATCH,
                                  s["image_device"] if b == backend else "cpu", workers)
                out[wname][b] = engine.run(s["chats"])[:, 0]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model = engine = None
        free()
    return out


def _vs(p: np.ndarray, ref: np.ndarray) -> dict:
    return {k: v for k, v in agree_probs(p, ref).items() if k != "ok"}  # "ok" is the 2e-2 / 99% rule: not this one


def bf16_noise(s: dict, refs: dict[str, np.ndarray], backend: str) -> dict:
    """Ours (PIL pixels) and transformers bf16 (its pixels) each against float32 on its own pixels, so that
    resize differences (torchvision vs PIL) do not count as noise; and the verdict."""
    n = len(s["prefillonly"])
    res: dict[str, Any] = {"requests": n, "reference": f"transformers float32, sdpa; {backend} pixels for "
                           "transformers, pil for prefillonly", "prefillonly": _vs(s["prefillonly"], refs["pil"])}
    if s.get("transformers") is not None:  # the timed pass's outputs: all requests
        res["transformers"] = _vs(s["transformers"][:n], refs[backend])
    if s.get("transformers_pil") is not None:  # transformers bf16 on our pixels (--same-pixel-requests of them)
        m = min(n, len(s["transformers_pil"]))
        res["transformers_same_pixels"] = _vs(s["transformers_pil"][:m], refs["pil"][:m])
    ours, hf = res["prefillonly"], res.get("transformers")
    res["ours_within_bf16_noise"] = None if hf is None else bool(
        ours["mean_abs_dp"] <= max(MEAN_RATIO * hf["mean_abs_dp"], MEAN_FLOOR)
        and ours["argmax_agree"] >= hf["argmax_agree"] - ARGMAX_SLACK)
    res["rule"] = RULE
    return res


def _three(c: dict | None) -> str:
    return f"{c['max_abs_dp']:.1e}, {c['mean_abs_dp']:.1e}, {c['argmax_agree'] * 100:.1f}%" if c else ""


def noise_table(rows: list[dict], dtype: str = "bfloat16") -> list[str]:
    """Markdown lines: the float32-reference figures of the prefillonly rows that have them (none: no lines);
    ``dtype`` is the engines' (float32 with --smoke, where the figures test this code, not bf16 noise)."""
    got = [r for r in rows if "vs_fp32_reference" in r]
    if not got:
        return []
    dt = {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
    intro = (f"{dt} against transformers float32 (same checkpoint; each engine on its own pixels: transformers its "
             f"image processor's, ours PIL's) on the first requests of each workload; {RULE}.")
    head = (f"| model | workload | requests | prefillonly {dt}: max\\|dp\\|, mean\\|dp\\|, argmax | transformers {dt}: "
            "max\\|dp\\|, mean\\|dp\\|, argmax | ours within bf16 noise |")
    lines = ["", intro, "", head, "|---|---|---:|---|---|---|"]
    for r in got:
        c = r["vs_fp32_reference"]
        ok = c["ours_within_bf16_noise"]
        lines.append(f"| {r['model']} | {r['workload']} | {c['requests']} | {_three(c['prefillonly'])} | "
                     f"{_three(c.get('transformers'))} | {'—' if ok is None else ('yes' if ok else '**no**')} |")
    return lines
