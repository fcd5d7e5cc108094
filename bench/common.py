"""What the text bench (``bench.run``) and the VLM bench (``bench.vlm``) share.

Device switch, logging, memory accounting, the matmul ceiling, timing and
GPU-busy profiling, random checkpoints in real configs, agreement of label
probabilities and the results file. Both scripts measure the same way because
they call the same code.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
TOKENIZER = HERE / "tokenizer_qwen3"
LABELS = ["yes", "no"]
GiB = 1024**3

DEV = "cuda"  # use_cpu() switches to "cpu": the scripts' dry runs test themselves without a GPU
STAMP = False  # log() prefixes wall-clock time and seconds since start when set
_T0 = time.perf_counter()


def use_cpu() -> None:
    global DEV
    DEV = "cpu"


def log(*a: Any) -> None:
    if STAMP:
        a = (f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:5.0f}s]", *a)
    print(*a, flush=True)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def mem_allocated() -> int:
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def mem_peak() -> int:
    return torch.cuda.max_memory_allocated() if DEV == "cuda" else 0


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free(*objs: Any) -> None:
    """Collect garbage and give cached blocks back, so the next engine's peak starts clean."""
    for o in objs:
        del o
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def mem_base() -> int:
    """Bytes still allocated once garbage is collected: what the next measurement stands on."""
    free()
    return mem_allocated()


def matmul_ceiling() -> dict:
    """Measured bf16 8192^3 matmul rate, the denominator of every MFU figure."""
    if DEV != "cuda":
        return {"tflops": 1.0, "median_s": 0.0}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    t = statistics.median(times)
    del a, b
    torch.cuda.empty_cache()
    return {"tflops": 2 * n**3 / t / 1e12, "median_s": t}


# -- timing -----------------------------------------------------------------------------------


def timed_passes(fn: Callable[[], Any], passes: int) -> tuple[list[float], Any]:
    """Wall seconds of ``passes`` calls of ``fn`` (the device drained before and after each), and the last output."""
    times, out = [], None
    for _ in range(passes):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return times, out


def timed(fn: Callable[[], Any], passes: int) -> dict:
    """One untimed warm pass, then ``passes`` timed ones; peak memory over all of them."""
    reset_peak()
    fn()
    sync()
    times, out = timed_passes(fn, passes)
    return {"median_s": statistics.median(times), "times_s": times, "peak_bytes": mem_peak(),
            "out": out}


def gpu_busy(fn: Callable[[], Any]) -> dict:
    """Kernel time (union of device intervals) of one pass, from the profiler, and where the GPU idles:
    before its first kernel (``head_s``), after its last (``tail_s``) and between (``gaps_s``, the
    largest with their offset from the call's start). The profiler slows the host, so idle is inflated."""
    from torch.profiler import ProfilerActivity, profile, record_function

    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        with record_function("bench_call"):
            fn()
            sync()
        wall = time.perf_counter() - t
    spans, call = [], None
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            tr = e.time_range
            spans.append((tr.start, tr.end))
        elif e.name == "bench_call":
            call = (e.time_range.start, e.time_range.end)
    spans.sort()
    busy, cur_s, cur_e = 0.0, None, None
    gaps = []
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
                gaps.append((s - cur_e, cur_e))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    idle = {}
    if call is not None and spans:
        c0 = call[0]
        gaps.sort(reverse=True)
        idle = {"head_s": (spans[0][0] - c0) / 1e6, "tail_s": max(0.0, call[1] - cur_e) / 1e6,
                "gaps_s": sum(g for g, _ in gaps) / 1e6,
                "largest_gaps_ms_at_ms": [(round(g / 1e3, 3), round((at - c0) / 1e3, 1)) for g, at in gaps[:12]]}
    top = []
    try:
        for evt in prof.key_averages():
            t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            if t and str(getattr(evt, "device_type", "")).endswith("CUDA"):
                top.append((t / 1e6, evt.count, evt.key[:90]))
        top.sort(reverse=True)
    except Exception as e:  # the breakdown is a nicety
        top = [(0.0, 0, f"breakdown failed: {e}")]
    return {"kernel_busy_s": busy / 1e6, "profiled_wall_s": wall, "events": len(spans), **idle,
            "top_kernels_s": top[:30]}


# -- checkpoints and engines ------------------------------------------------------------------


def build_checkpoint(cfg: Any, model_cls: Any, out_dir: Path, seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16) -> Any:
    """Random weights in ``cfg``, saved with the Qwen3 tokenizer; returns the transformers model on DEV.

    The model is built directly on the device (no hub, no CPU copy) and is the
    transformers side of the comparison, so both engines read the same weights.
    """
    torch.manual_seed(seed)
    with torch.device(DEV):
        model = model_cls.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model = model.to(DEV).eval()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, out_dir / f.name)
    return model


def load_ours(path: Path, dtype: str = "bfloat16", **kw: Any) -> tuple[Any, int, int]:
    """prefillonly on DEV: (llm, bytes allocated before it, its weights' bytes)."""
    from prefillonly import LLM

    base = mem_base()
    llm = LLM(str(path), dtype=dtype, device=DEV, use_tqdm=False, **kw)
    sync()
    return llm, base, mem_allocated() - base


# -- results ----------------------------------------------------------------------------------


def agree_probs(a: Any, b: Any) -> dict:
    """Largest and mean |p_a - p_b|, how often both pick the same label (p > 0.5); ok: <= 2e-2 and >= 99%."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    dp, same = np.abs(a - b), ((a > 0.5) == (b > 0.5)).mean()
    return {"max_abs_dp": float(dp.max()), "mean_abs_dp": float(dp.mean()),
            "argmax_agree": float(same), "ok": bool(dp.max() <= 2e-2 and same >= 0.99)}


def run_meta(commit: str, passes: int, **extra: Any) -> dict:
    """Where and with what a run was made."""
    meta = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "passes": passes, **extra,
        "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / GiB if DEV == "cuda" else 0,
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except Exception:
        pass
    return meta


def write_results(out: Path, data: dict, markdown: Callable[[dict], str]) -> None:
    """JSON to ``out`` and the markdown table next to it (``.md``)."""
    out.write_text(json.dumps(data, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(data))
