"""prefillonly vs transformers on vision-language models, one GPU, random bf16 weights in the real configs.

    python -m bench.vlm --out results_vlm.json [--models Qwen3-VL-2B-Instruct,Qwen2.5-VL-3B-Instruct]
        [--workloads V1,V2,V3] [--passes 3] [--commit SHA] [--n-images 256]
    python -m bench.vlm --smoke      # CPU, float32, shrunk configs, tiny workloads: tests this script

A request is one user turn (image, then a yes/no question) scored with labels ["yes", "no"], timed end to
end from chat messages (PIL image + text) to probabilities. With N = ``--n-images``: V1, N distinct
448x448 images; V2, N/2 distinct images of 224..1344 px per side, mixed aspect ratios; V3, N/4 images
with 10 questions each (our encoder cache encodes each image once per pass; it is cleared before every
pass). transformers runs its strongest fair way: bf16, sdpa, no KV cache, last-position logits, requests
sorted by image size into left-padded batches of a size tuned on a subset, its image processor
(torchvision when installed) in threads ahead of the GPU as a DataLoader would. Figures: median of
``--passes`` timed passes after one untimed warm pass. After a model's timed runs, the first ``--ref-requests``
of each workload go through transformers float32 too, to show whether ours is within bf16 noise of it
(bench/vlm_reference.py). The engine checks are what the former CUDA-only
tests checked: ours against transformers float32 on medium random Qwen2-VL, Qwen2.5-VL, Qwen3-VL
(several images, text only), float32 and bf16, cache hits.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench.common import (CONFIGS, LABELS, GiB, agree_probs, build_checkpoint, free, gpu_busy, load_ours, log,
                          mem_base, run_meta, timed, write_results)

import numpy as np
import torch
from PIL import Image, ImageChops

MODELS = ["Qwen3-VL-2B-Instruct", "Qwen2.5-VL-3B-Instruct"]
SPEED_TARGETS = {"V1": 2.2, "V2": 3.0, "V3": 3.5}  # prefillonly req/s over transformers'
MEMORY_TARGET_GIB = 2.0  # activations above the weights
IMAGE_PAD = "<|image_pad|>"
QUESTIONS = ["Is there a cat in this picture?", "Is this photo taken outdoors?", "Is the sky visible?", "Is it night?",
             "Does the image contain any text?", "Are there people in the image?", "Is the main object red?",
             "Is this a drawing rather than a photo?", "Is there water in the scene?", "Is the image blurry?"]


def chat_template(default_system: bool) -> str:
    """The released Qwen-VL rendering of a chat with image parts (Qwen2.5-VL adds a default system turn)."""
    system = ("{%- if messages[0].role != 'system' %}"
              "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}") if default_system else ""
    return (system + "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
            "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for part in message.content %}"
            "{%- if part.type == 'image' or 'image' in part or 'image_url' in part %}"
            "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
            "{%- elif 'text' in part %}{{- part.text }}{%- endif %}{%- endfor %}{%- endif %}"
            "{{- '<|im_end|>\\n' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


_GRAIN: dict[int, Image.Image] = {}  # one grain image per size bound, cropped per image


def synth_image(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random colour field plus grain: resizes like a photo, not like flat colour or pure noise."""
    side = max(1408, w, h)
    if side not in _GRAIN:
        _GRAIN[side] = Image.fromarray(np.random.default_rng(0).integers(0, 48, (side, side, 3), dtype=np.uint8))
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (3 + h // 96, 3 + w // 96, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    x, y = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
    return ImageChops.add(img, _GRAIN[side].crop((x, y, x + w, y + h)), 1.0, -24)


@dataclass
class Workload:
    name: str
    what: str
    chats: list[list[dict]]  # one chat per request
    n_images: int


def chat(image: Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def make_workload(name: str, a: argparse.Namespace) -> Workload:
    """Distinct seeded images per workload; V3 shares each image object among its questions."""
    n = {"V1": a.n_images, "V2": a.n_images // 2, "V3": a.n_images // 4}[name]
    rng, side = np.random.default_rng(int(name[1])), a.v1_side
    sizes = ([tuple(int(v) for v in rng.integers(a.v2_min, a.v2_max + 1, 2)) for _ in range(n)] if name == "V2"
             else [(side, side)] * n)
    synth_image(max(map(max, sizes)), 1, 0)  # the grain is built once, before the threads share it
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda i: synth_image(*sizes[i], 10_000 * int(name[1]) + i), range(n)))
    questions = QUESTIONS[: a.v3_questions] if name == "V3" else None
    chats = ([chat(img, q) for img in images for q in questions] if questions
             else [chat(img, QUESTIONS[i % len(QUESTIONS)]) for i, img in enumerate(images)])
    what = {"V1": f"{n} images {side}x{side}", "V2": f"{n} images, {a.v2_min}..{a.v2_max} px per side",
            "V3": f"{n} images {side}x{side} x {a.v3_questions} questions"}[name]
    return Workload(name, what, chats, n)


def images_of(messages: list[dict]) -> list[Any]:
    return [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p.get("type") == "image"]


def vl_config(name: str, smoke: bool) -> Any:
    """The real config; for --smoke shrunk to a few narrow layers with the same structure."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(CONFIGS / name)
    if not smoke:
        return cfg
    d = cfg.to_dict()
    t, v, qwen3 = d["text_config"], d["vision_config"], d["model_type"] == "qwen3_vl"
    t.update(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, rope_parameters=dict(t["rope_parameters"], mrope_section=[4, 2, 2] if qwen3 else [2, 3, 3]))
    if "layer_types" in t:
        t.update(layer_types=["full_attention"] * 3, max_window_layers=3)
    v.update(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    if qwen3:
        v["deepstack_visual_indexes"] = [1, 2, 3]  # three levels, as the real [5, 11, 17]
    else:
        v["fullatt_block_indexes"] = [1, 3]  # window attention elsewhere, as the real [7, 15, 23, 31]
    return type(cfg).from_dict(d)


def finish_checkpoint(path: Path, template: str, preprocessor: dict) -> None:
    """Add what a VL checkpoint needs beyond the text one: its chat template and image preprocessor."""
    tc = json.loads((path / "tokenizer_config.json").read_text())
    tc["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def make_vl_checkpoint(name: str, out_dir: Path, smoke: bool) -> Any:
    from transformers import AutoModelForImageTextToText

    cfg = vl_config(name, smoke)
    model = build_checkpoint(cfg, AutoModelForImageTextToText, out_dir, dtype=torch.float32 if smoke else torch.bfloat16)
    pre = json.loads((CONFIGS / name / "preprocessor_config.json").read_text())
    finish_checkpoint(out_dir, chat_template(default_system=cfg.model_type != "qwen3_vl"), pre)
    return model


def prefetched(fn: Callable[[Any], Any], items: list[Any], workers: int) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) in order, computed in threads up to 2 x ``workers`` + 1 items ahead of the consumer."""
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        todo = iter(items)
        ahead = deque((x, pool.submit(fn, x)) for x in itertools.islice(todo, 2 * workers + 1))
        while ahead:
            x, fut = ahead.popleft()
            ahead.extend((y, pool.submit(fn, y)) for y in itertools.islice(todo, 1))
            yield x, fut.result()


class HFEngine:
    """transformers end to end: chat template, then what ``AutoProcessor`` does (``processor_equivalence``
    checks it) in two calls, since the processor needs torchvision for a video processor even without video."""

    def __init__(self, model: Any, path: Path, labels: list[str], backend: str | None = None,
                 batch_size: int = 16, image_device: str = "cpu", workers: int = 8) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        self.model, self.batch_size, self.image_device, self.workers = model, batch_size, image_device, workers
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"  # the last position is every row's last token
        self.proc = AutoImageProcessor.from_pretrained(path, **({"backend": backend} if backend else {}))
        self.backend = getattr(self.proc, "backend", None) or ("torchvision" if "Fast" in type(self.proc).__name__
                                                                  else "pil")
        self.ids = [self.tok.encode(x, add_special_tokens=False)[0] for x in labels]
        self.image_id = self.tok.convert_tokens_to_ids(IMAGE_PAD)
        self.mm_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters  # transformers >= 5.x
        self.tokens = self.padded = 0
        self._tok_lock = threading.Lock()  # a fast tokenizer shared by threads can fail with "Already borrowed"

    def prep(self, chats: list[list[dict]]) -> dict[str, torch.Tensor]:
        texts = [self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        images = [img for c in chats for img in images_of(c)]
        enc = {}
        if images:
            kw = {"device": self.image_device} if self.image_device != "cpu" else {}
            out = self.proc(images=images, return_tensors="pt", **kw)
            counts = iter((out["image_grid_thw"].prod(-1) // self.proc.merge_size**2).tolist())
            texts = [re.sub(re.escape(IMAGE_PAD), lambda _: IMAGE_PAD * next(counts), t) for t in texts]
            enc.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
        with self._tok_lock:
            t = self.tok(texts, padding=True, return_tensors="pt")
        enc.update(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        if self.mm_types:
            enc["mm_token_type_ids"] = (t["input_ids"] == self.image_id).int()
        if common.DEV == "cuda":
            enc = {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in enc.items()}
        return enc

    @torch.inference_mode()
    def run(self, chats: list[list[dict]]) -> np.ndarray:
        """(n, labels) probabilities, normalised over the labels, in input order."""
        area = [sum(im.width * im.height for im in images_of(c)) for c in chats]  # ~ tokens: less padding
        order = sorted(range(len(chats)), key=lambda i: -area[i])
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        parts, tokens, padded = [], 0, 0
        for idx, enc in prefetched(lambda b: self.prep([chats[i] for i in b]), batches, self.workers):
            tokens += int(enc["attention_mask"].sum())  # still on the CPU: no sync
            padded += enc["attention_mask"].numel()
            enc = {k: v.to(common.DEV, non_blocking=True) for k, v in enc.items()}
            logits = self.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1, self.ids]
            parts.append((idx, torch.softmax(logits.float(), -1)))
        out = np.empty((len(chats), len(self.ids)))
        for idx, p in parts:
            out[idx] = p.cpu().numpy()
        self.tokens, self.padded = tokens, padded
        return out

    def tune(self, chats: list[list[dict]], sizes: list[int], devices: list[str], n: int) -> dict:
        """Time one pass over a spread-out subset per (image device, batch size); keep the fastest."""
        subset = chats[:: max(1, len(chats) // n)][:n]
        self.batch_size, self.image_device = sizes[0], devices[0]
        self.run(subset[: max(sizes)])  # warm: kernels, allocator
        sweep: dict[str, Any] = {}
        for dev, bs in itertools.product(devices, sizes):
            self.batch_size, self.image_device = bs, dev
            try:
                t = time.perf_counter()
                self.run(subset)  # ends with the probabilities on the CPU: synchronised
                sweep[f"{dev}/{bs}"] = time.perf_counter() - t
            except Exception as e:  # an OOM or an unsupported option loses only its own point
                sweep[f"{dev}/{bs}"] = f"{type(e).__name__}: {str(e)[:200]}"
                free()
        best = min((k for k, v in sweep.items() if isinstance(v, float)), key=sweep.get)
        dev, bs = best.split("/")
        self.image_device, self.batch_size = dev, int(bs)
        return {"subset": len(subset), "seconds": sweep, "best": best}


def ours_run(llm: Any, chats: list[list[dict]]) -> np.ndarray:
    """p(yes) of every request; the encoder cache starts empty so a pass cannot reuse an earlier one."""
    llm.model.encoder_cache.clear()
    res = llm.classify(chats, labels=LABELS, use_tqdm=False)
    bad = [r.error for r in res if r.error is not None]
    if bad:
        raise RuntimeError(f"{len(bad)} request(s) failed, first: {bad[0]}")
    return np.array([r.probs["yes"] for r in res])


# -- the run ----------------------------------------------------------------------------------


class VLBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a, self.tmp, self.out, self.t0 = args, Path(args.tmp), Path(args.out), time.perf_counter()
        for d in (self.tmp, self.out.parent):
            d.mkdir(parents=True, exist_ok=True)
        self.dtype = "float32" if args.smoke else "bfloat16"
        self.rows: list[dict] = []
        self.checks: dict = {}
        self.errors: dict = {}
        self.workloads: dict[str, Workload] = {}

    def save(self) -> None:
        meta = run_meta(self.a.commit, self.a.passes, dtype=self.dtype, smoke=self.a.smoke, speed_targets=SPEED_TARGETS,
                        memory_target_gib=MEMORY_TARGET_GIB, workloads={k: w.what for k, w in self.workloads.items()})
        write_results(self.out, {"meta": meta, "checks": self.checks, "rows": self.rows, "errors": self.errors},
                      markdown)

    def late(self, what: str) -> bool:
        """Past --deadline-s: start nothing new, so the device call ends with its results written."""
        if time.perf_counter() - self.t0 <= self.a.deadline_s:
            return False
        self.errors[what] = f"skipped: past --deadline-s {self.a.deadline_s}"
        log(f"{what}: {self.errors[what]}")
        self.save()
        return True

    def run(self) -> VLBench:
        self.save()
        if self.a.checks:
            log(f"engine checks ({'tiny' if self.a.smoke else 'medium'} random Qwen2-VL / Qwen2.5-VL / Qwen3-VL)")
            from bench.vlm_checks import engine_checks

            self.checks["engines"] = engine_checks(self.tmp / "checks", tiny=self.a.smoke)
            self.save()
        for name in self.a.models.split(","):
            if self.late(name):
                break
            self.guard(name, lambda: self.model(name))
        return self

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn(), or None with its traceback recorded: one failure must not cost the rest of the run."""
        try:
            return fn()
        except Exception:
            self.errors[what] = traceback.format_exc()[-3000:]
            log(f"{what} FAILED:\n{self.errors[what]}")
        finally:
            free()
            self.save()

    def workload(self, name: str) -> Workload:
        return self.workloads.get(name) or self.workloads.setdefault(name, make_workload(name, self.a))

    def model(self, name: str) -> None:
        a, path, wnames = self.a, self.tmp / name, self.a.workloads.split(",")
        base = mem_base()
        log(f"{name}: building random {self.dtype} weights from the real config")
        hf = HFEngine(make_vl_checkpoint(name, path, a.smoke), path, LABELS, workers=a.hf_workers)
        w_hf = mem_base() - base
        llm, _, w_ours = load_ours(path, dtype=self.dtype)
        log(f"{name}: weights transformers {w_hf / GiB:.2f} GiB, prefillonly {w_ours / GiB:.2f} GiB; "
            f"transformers image processor: {hf.backend}")
        from bench.vlm_checks import processor_equivalence

        equal = processor_equivalence(path, hf, self.workload(wnames[0]).chats[:4])
        self.checks[f"{name}_processor_equivalence"] = equal
        gpu_ok = hf.backend == "torchvision" and common.DEV == "cuda"  # only torchvision processes on the GPU
        devices = [d for d in a.hf_image_devices.split(",") if d == "cpu" or gpu_ok]
        subsets: dict[str, dict] = {}  # the bf16 outputs of the first --ref-requests requests, per workload
        for wname in wnames:
            if self.late(f"{name}/{wname}"):
                break
            w = self.workload(wname)
            log(f"{name} {wname}: {w.what}, {len(w.chats)} requests")
            ref = self.guard(f"{name}/{wname}/transformers", lambda: self.time_hf(name, w, hf, w_hf, devices))
            ours = self.guard(f"{name}/{wname}/prefillonly", lambda: self.time_ours(name, w, llm, w_ours, ref))
            if ours is not None and a.ref_requests > 0:
                n, h = a.ref_requests, ref or {}
                subsets[wname] = {"chats": w.chats[:n], "prefillonly": ours[:n], "transformers": h.get("p"),
                                  "transformers_pil": h.get("pil"), "image_device": h.get("image_device", "cpu")}
        backend = hf.backend
        hf = llm = None  # the bf16 engines go before the float32 model comes (not del: lambdas above use them)
        free()
        if subsets and not self.late(f"{name}/fp32_reference"):
            self.guard(f"{name}/fp32_reference", lambda: self.fp32_reference(name, path, backend, subsets))

    def fp32_reference(self, name: str, path: Path, backend: str, subsets: dict[str, dict]) -> None:
        """Both engines' bf16 outputs against transformers float32, into the prefillonly rows."""
        from bench.vlm_reference import bf16_noise, fp32_reference

        log(f"{name}: transformers float32 reference on the first {self.a.ref_requests} requests of each workload")
        refs = fp32_reference(path, subsets, backend, self.a.hf_workers)
        for wname, s in subsets.items():
            res = bf16_noise(s, refs[wname], backend)
            row = next(r for r in self.rows if (r["model"], r["workload"], r["engine"]) == (name, wname, "prefillonly"))
            row["vs_fp32_reference"] = res
            log(f"  {wname} vs float32: prefillonly {res['prefillonly']}; transformers {res.get('transformers')}; "
                f"ours within bf16 noise: {res['ours_within_bf16_noise']}")
            if self.a.smoke:  # float32 against float32
                assert res["prefillonly"]["max_abs_dp"] < 1e-4 and res["ours_within_bf16_noise"], res

    def row(self, name: str, w: Workload, engine: str, r: dict, start: int, weights: int) -> dict:
        t, act = r["median_s"], max(r["peak_bytes"] - start, 0)  # activations: above what stood before the run
        row = {"model": name, "workload": w.name, "what": w.what, "engine": engine, "requests": len(w.chats),
               "images": w.n_images, "median_s": t, "times_s": r["times_s"], "requests_per_s": len(w.chats) / t,
               "images_per_s": w.n_images / t, "weights_gib": weights / GiB, "activations_gib": act / GiB,
               "peak_gib": (weights + act) / GiB}
        log(f"  {name} {w.name} {engine:13s} {t * 1e3:9.1f} ms  {row['requests_per_s']:8.1f} req/s  "
            f"peak {row['peak_gib']:.2f} GiB (weights {row['weights_gib']:.2f} + {row['activations_gib']:.2f})")
        return row

    def time_hf(self, name: str, w: Workload, hf: HFEngine, weights: int, devices: list[str]) -> dict:
        a = self.a
        sweep = hf.tune(w.chats, [int(b) for b in a.hf_batch_sizes.split(",")], devices, a.hf_tune_requests)
        log(f"  transformers tuning: {sweep}")
        start = mem_base()
        r = timed(lambda: hf.run(w.chats)[:, 0], a.passes)
        row = self.row(name, w, "transformers", r, start, weights)
        row.update(batch_size=hf.batch_size, image_device=hf.image_device, image_backend=hf.backend, tuning=sweep,
                   tokens=hf.tokens, padded_tokens=hf.padded)
        self.rows.append(row)
        ref = {"p": r["out"], "median_s": r["median_s"], "image_device": hf.image_device}
        if hf.backend != "pil":  # our pixels (PIL resize), to tell engine error from resize differences
            pil = HFEngine(hf.model, self.tmp / name, LABELS, "pil", hf.batch_size, workers=a.hf_workers)
            ref["pil"] = pil.run(w.chats[: a.same_pixel_requests])[:, 0]
        return ref

    def time_ours(self, name: str, w: Workload, llm: Any, weights: int, ref: dict | None) -> np.ndarray:
        """Times ours and records its row; returns its p(yes) of the last pass, for the float32 reference."""
        a = self.a
        stats0 = dict(vars(llm.model.encoder_stats))
        start = mem_base()
        r = timed(lambda: ours_run(llm, w.chats), a.passes)
        row = self.row(name, w, "prefillonly", r, start, weights)
        stats = vars(llm.model.encoder_stats).items()
        row["encoder_per_pass"] = {k: (v - stats0[k]) / (a.passes + 1) for k, v in stats}
        row["memory_target_met"] = row["activations_gib"] <= MEMORY_TARGET_GIB
        if ref is not None:
            speed = ref["median_s"] / row["median_s"]
            row.update(vs_transformers_speed=speed, speed_target=SPEED_TARGETS.get(w.name),
                       speed_target_met=speed >= SPEED_TARGETS.get(w.name, 0),
                       vs_transformers=agree_probs(r["out"], ref["p"]))
            if "pil" in ref:
                row["vs_transformers_same_pixels"] = agree_probs(r["out"][: len(ref["pil"])], ref["pil"])
            log(f"  speed {row['vs_transformers_speed']:.2f}x (target {row['speed_target']}x); "
                f"agreement {row['vs_transformers']}; same pixels {row.get('vs_transformers_same_pixels')}")
            if a.smoke:
                assert row["vs_transformers"]["max_abs_dp"] < 1e-4, row["vs_transformers"]
        if common.DEV == "cuda" and a.profile:
            # within one profiled pass: against the unprofiled pass the profiler's own overhead would hide the idle
            busy = gpu_busy(lambda: ours_run(llm, w.chats))
            row.update(gpu_busy=busy, gpu_idle=max(0.0, 1 - busy["kernel_busy_s"] / busy["profiled_wall_s"]))
            log(f"  GPU idle {row['gpu_idle'] * 100:.1f}% (kernels {busy['kernel_busy_s']:.3f} s in a profiled pass of "
                f"{busy['profiled_wall_s']:.3f} s: head {busy['head_s'] * 1e3:.0f} ms, gaps {busy['gaps_s'] * 1e3:.0f} ms, "
                f"tail {busy['tail_s'] * 1e3:.0f} ms)")
        llm.model.encoder_cache.clear()
        self.rows.append(row)
        return r["out"]


# -- report -----------------------------------------------------------------------------------


def _yn(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def _agree(c: dict | None) -> str:
    return f"{c['max_abs_dp']:.1e}, {c['argmax_agree'] * 100:.1f}%" if c else ""


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"Device: {m['device']}; torch {m['torch']} (CUDA {m['cuda']}); transformers {m.get('transformers')}; "
             f"commit {m['commit']}; {m['date']}; {m['dtype']} random weights in the real configs; median of "
             f"{m['passes']} timed passes after one warm pass; end to end from chat messages (PIL image + question) "
             "to p(yes).", "",
             "| model | workload | engine | req/s | images/s | vs transformers | peak GiB (weights + act.) | GPU idle "
             "| vs transformers: max\\|dp\\|, argmax | same pixels: max\\|dp\\|, argmax |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    targets = ["", "Targets:", ""]
    for r in data["rows"]:
        if r["engine"] == "prefillonly":
            eng, ratio = "prefillonly", f"{r['vs_transformers_speed']:.2f}x" if "vs_transformers_speed" in r else ""
            agree = r.get("vs_transformers")
            targets.append(f"* {r['model']} {r['workload']}: speed {ratio or '—'} (target {SPEED_TARGETS.get(r['workload'])}x) "
                           f"{_yn(r.get('speed_target_met'))}; activations {r['activations_gib']:.2f} GiB (target <= "
                           f"{m['memory_target_gib']}) {_yn(r['memory_target_met'])}; agreement (max |dp| <= 2e-2, argmax "
                           f">= 99%) {_yn(agree['ok'] if agree else None)}")
        else:
            eng, ratio = f"transformers (batch {r['batch_size']}, {r['image_backend']} on {r['image_device']})", "1.00x"
        idle = f"{r['gpu_idle'] * 100:.1f}%" if "gpu_idle" in r else ""
        lines.append(f"| {r['model']} | {r['workload']}: {r['what']} | {eng} | {r['requests_per_s']:,.1f} | "
                     f"{r['images_per_s']:,.1f} | {ratio} | {r['peak_gib']:.2f} ({r['weights_gib']:.2f} + "
                     f"{r['activations_gib']:.2f}) | {idle} | {_agree(r.get('vs_transformers'))} | "
                     f"{_agree(r.get('vs_transformers_same_pixels'))} |")
    from bench.vlm_reference import noise_table

    lines += noise_table(data["rows"], m["dtype"])
    for arch, res in data["checks"].get("engines", {}).items():
        detail = (f"float32 {res['float32']['max_abs_dp_vs_fp32']:.1e}, bf16 {res['bfloat16']['max_abs_dp_vs_fp32']:.1e} "
                  f"(plain modules {res['bfloat16_plain']['max_abs_dp_vs_fp32']:.1e}, fused vs plain "
                  f"{res['bf16_fused_vs_plain']:.1e}; transformers bf16 itself {res['transformers_bf16_vs_fp32']:.1e})"
                  if "float32" in res else "error")
        targets.append(f"* check {arch} vs transformers float32: {detail}: {_yn(res['ok'])}")
    for name, c in data["checks"].items():
        if name != "engines":
            targets.append(f"* check {name}: {_yn(c['ok']) if 'ok' in c else c.get('skipped')}")
    targets += [f"* error {k}: {(v.strip().splitlines() or [''])[-1]}" for k, v in data["errors"].items()]
    return "\n".join(lines + targets) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--out", default="results_vlm.json")
    add("--models", default=",".join(MODELS))
    add("--workloads", default="V1,V2,V3")
    add("--passes", type=int, default=3)
    add("--commit", default=os.environ.get("BENCH_COMMIT", "unknown"))
    add("--tmp", default="/tmp/prefillonly-bench-vlm")
    add("--n-images", type=int, default=256, help="distinct images: V1 all, V2 half, V3 a quarter (x questions)")
    add("--v1-side", type=int, default=448, help="V1 and V3: image side")
    add("--v2-min", type=int, default=224)
    add("--v2-max", type=int, default=1344)
    add("--v3-questions", type=int, default=10)
    add("--hf-batch-sizes", default="8,16,32", help="transformers batch sizes tried on a subset, best kept")
    add("--hf-image-devices", default="cpu", help="where transformers' (torchvision) image processor may run: cpu,cuda")
    add("--hf-tune-requests", type=int, default=96, help="requests in the tuning subset")
    add("--hf-workers", type=int, default=min(8, os.cpu_count() or 1), help="transformers preprocessing threads")
    add("--same-pixel-requests", type=int, default=64, help="requests transformers re-runs with our (PIL) pixels")
    add("--ref-requests", type=int, default=32, help="first requests of each workload also run in transformers float32 "
        "after a model's timed runs, to set both engines' bf16 against (0: none)")
    add("--no-checks", dest="checks", action="store_false", help="skip the engine checks")
    add("--no-profile", dest="profile", action="store_false", help="skip the GPU-idle profile")
    add("--deadline-s", type=float, default=540, help="start no model or workload after this many seconds")
    add("--smoke", action="store_true", help="CPU, float32, shrunk configs, tiny workloads; asserts |dp| < 1e-4")
    args = p.parse_args(argv)
    common.STAMP = True
    if args.smoke:
        common.use_cpu()
        args.n_images, args.v1_side, args.v2_min, args.v2_max = 4, 96, 56, 200
        args.v3_questions, args.hf_batch_sizes, args.hf_tune_requests = 4, "2,4", 4
        args.tmp += "-smoke"
    b = VLBench(args).run()
    b.save()
    print(markdown(json.loads(b.out.read_text())))
    if args.smoke:
        bad = [k for k, v in b.checks.get("engines", {}).items() if not v["ok"]] + list(b.errors)
        assert not bad, f"smoke run failed: {bad}"


if __name__ == "__main__":
    main()
