"""Where the host's time goes in one VLM pass: a timeline of the main thread plus its cProfile.

    python -m bench.vlm_hostprof [--model Qwen3-VL-2B-Instruct] [--workloads V1,V2] [--n-images 192]
                                 [--variants base,noview,noflash,switch1ms,workers8] [--kernels] [--cprofile]
    python -m bench.vlm_hostprof --smoke      # CPU, shrunk config: tests this script

Random bf16 weights in the real config (as bench.vlm), one warm pass, then one pass timed phase by phase:
rendering (before the first step), per step the wait for its pixels, the host time to launch it (tower
calls included, with their stream syncs) and the wait for the previous step's output; then one pass under
cProfile (main thread only: time in ``synchronize``/``to`` is the GPU draining, in ``acquire``/``wait``
the workers' pixels or the GIL). GPU idle is what these leave uncovered by kernels. ``--kernels`` adds the
profiler's kernel table of one pass and the GPU time between the tower calls' start and end events.
``--variants`` repeats the timeline with host settings changed in the same process (worker threads, the
GIL switch interval, the Pillow memory view), to choose them by measurement.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import common
from bench.vlm import LABELS, make_vl_checkpoint, make_workload


def _label(name: str) -> Any:
    from torch.profiler import record_function

    return record_function(name)


def _timed_items(gen: Any, label: str, record: Any) -> Any:
    """``gen``'s items; ``record(seconds)`` gets the time spent producing each one (labelled for a trace)."""
    try:
        while True:
            t = time.perf_counter()
            try:
                with _label(label):
                    item = next(gen)
            except StopIteration:
                return
            record(time.perf_counter() - t)
            yield item
    finally:
        gen.close()


def _watch_images(seqs: list, t0: float) -> list[dict[str, float]]:
    """Per image of a step, in ms from the call's start: when its hash was ready and when a worker preprocessed
    it (the first step's images are what the GPU waits for before its first kernel)."""
    from prefillonly.models.vision.vlm import _step_images

    rows: list[dict[str, float]] = []
    for item in _step_images(seqs):
        row = {"tokens": item.num_tokens}
        rows.append(row)
        if not isinstance(item._key, str):  # a Future: a worker is hashing the pixels
            item._key.add_done_callback(lambda _, row=row: row.__setitem__("hashed", (time.perf_counter() - t0) * 1e3))

        def timed(*a: Any, _process: Any = item.process, _row: dict = row, **k: Any) -> Any:
            _row["start"] = (time.perf_counter() - t0) * 1e3
            try:
                return _process(*a, **k)
            finally:
                _row["end"] = (time.perf_counter() - t0) * 1e3

        item.process = timed
    return rows


def _timeline(llm: Any, chats: list) -> dict[str, Any]:
    """One pass with the runner's and the model's entry points timed (wall, main thread)."""
    runner, model = llm.runner, llm.model
    marks: dict[str, Any] = {"steps": [], "tower_s": 0.0, "tower_calls": 0}
    execute, collected, prepare, encode = runner._execute, runner._collected, model.prepare_steps, model.tower.encode

    def timed_prepare(steps: list) -> Any:
        marks.setdefault("render_s", time.perf_counter() - marks["t0"])  # prompts rendered, steps planned
        if "first_images" not in marks and steps:
            marks["first_images"] = _watch_images(steps[0], marks["t0"])
        return _timed_items(prepare(steps), "pixels_wait", lambda dt: marks["steps"].append({"pixels_wait_s": dt}))

    def add_collect(dt: float) -> None:
        if marks["steps"]:
            marks["steps"][-1]["collect_s"] = marks["steps"][-1].get("collect_s", 0.0) + dt

    def timed_collected(pending: list) -> Any:
        """The wait for a step's outputs: the time inside the runner's generator, not the caller's."""
        return _timed_items(collected(pending), "collect", add_collect)

    def step_timer(fn: Any, key: str) -> Any:
        """``fn`` timed into the current step's ``key`` (and labelled for a trace)."""

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                with _label(key.removesuffix("_s")):
                    return fn(*a, **k)
            finally:
                if marks["steps"]:
                    marks["steps"][-1][key] = time.perf_counter() - t

        return timed

    def timed_encode(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        ev = None
        if common.DEV == "cuda":
            import torch

            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        try:
            with _label("tower"):
                return encode(*a, **k)
        finally:
            if ev is not None:
                ev[1].record()
                marks.setdefault("tower_events", []).append(ev)
            marks["tower_s"] += time.perf_counter() - t
            marks["tower_calls"] += 1

    runner._execute, runner._collected = step_timer(execute, "launch_s"), timed_collected
    model.prepare_steps, model.tower.encode = timed_prepare, timed_encode
    try:
        model.encoder_cache.clear()
        common.sync()
        if common.DEV == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        marks["t0"] = time.perf_counter()
        llm.classify(chats, labels=LABELS, use_tqdm=False)
        common.sync()
        marks["total_s"] = time.perf_counter() - marks.pop("t0")
        marks["tower_gpu_s"] = sum(a.elapsed_time(b) for a, b in marks.pop("tower_events", [])) / 1e3
        if common.DEV == "cuda":
            marks["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        del runner._execute, runner._collected, model.prepare_steps, model.tower.encode
    return marks


def _variant(name: str, llm: Any) -> Any:
    """Apply one host setting; returns a function that undoes it."""
    from prefillonly.vision import image_io, preprocess_pool

    if name == "base":
        return lambda: None
    if name == "noview":
        saved = image_io._pillow_rgbx
        image_io._pillow_rgbx = lambda img: None
        return lambda: setattr(image_io, "_pillow_rgbx", saved)
    if name.startswith("switch"):
        old = sys.getswitchinterval()
        sys.setswitchinterval(float(name[len("switch"):].removesuffix("ms")) / 1e3)
        return lambda: sys.setswitchinterval(old)
    if name.startswith("firststep"):
        from prefillonly.engine import runner

        saved_fraction = runner.FIRST_STEP_FRACTION
        runner.FIRST_STEP_FRACTION = int(name[len("firststep"):])
        return lambda: setattr(runner, "FIRST_STEP_FRACTION", saved_fraction)
    if name in ("noflash", "notowerflash"):  # torch's flash varlen instead of models.flash
        from prefillonly.models import fastpath, flash

        saved_multi, saved_tower = fastpath.MULTI_ATTENTION, flash.TOWER
        flash.TOWER = False
        if name == "noflash":
            fastpath.MULTI_ATTENTION = "varlen"
        return lambda: (setattr(fastpath, "MULTI_ATTENTION", saved_multi), setattr(flash, "TOWER", saved_tower))
    if name == "longestfirst":  # image models' steps from the longest sequences down (before #21)
        from prefillonly.engine import runner

        runner.SHORTEST_FIRST = False
        return lambda: setattr(runner, "SHORTEST_FIRST", True)
    if name.startswith("towerpatches"):
        from prefillonly.models.vision import vlm

        saved_patches = vlm.TOWER_MAX_PATCHES
        vlm.TOWER_MAX_PATCHES = int(name[len("towerpatches"):])
        return lambda: setattr(vlm, "TOWER_MAX_PATCHES", saved_patches)
    if name.startswith("prefetch"):  # image steps prepared ahead of the one running
        from prefillonly.models.vision import vlm

        saved_ahead = vlm.PREFETCH_STEPS
        vlm.PREFETCH_STEPS = int(name[len("prefetch"):])
        return lambda: setattr(vlm, "PREFETCH_STEPS", saved_ahead)
    if name == "onewindow":  # image models check the whole call before the first step (before #24)
        from prefillonly import llm as llm_module

        llm_module.STREAM_IMAGES = False
        return lambda: setattr(llm_module, "STREAM_IMAGES", True)
    if name == "hostpatchify":  # Qwen pixels patchified by the worker threads (before #25)
        from prefillonly.models.vision import vlm

        vlm.DEVICE_PATCHIFY = False
        return lambda: setattr(vlm, "DEVICE_PATCHIFY", True)
    if name == "notail":  # the last decoder layer computes every row (before #26)
        from prefillonly.engine import batch

        batch.LAST_LAYER_TAIL = False
        return lambda: setattr(batch, "LAST_LAYER_TAIL", True)
    if name.startswith("budget"):  # the runner's step budget (max_num_batched_tokens)
        saved_budget = llm.runner.max_num_batched_tokens
        llm.runner.max_num_batched_tokens = int(name[len("budget"):])
        return lambda: setattr(llm.runner, "max_num_batched_tokens", saved_budget)
    if name == "noupstream":  # pixel uploads on the compute stream (before #22)
        from prefillonly.models.vision import vlm

        vlm.UPLOAD_STREAM = False
        return lambda: setattr(vlm, "UPLOAD_STREAM", True)
    if name == "noepilogue":  # fc1, then GELU as its own pass (the towers' MLP before #20)
        from prefillonly.models.vision import qwen_vit

        qwen_vit.GELU_EPILOGUE = False
        return lambda: setattr(qwen_vit, "GELU_EPILOGUE", True)
    if name.startswith("workers"):
        saved = preprocess_pool._executor
        preprocess_pool._executor = ThreadPoolExecutor(int(name[len("workers"):]), thread_name_prefix="vl-image")
        return lambda: setattr(preprocess_pool, "_executor", saved)
    raise SystemExit(f"--variants: unknown variant {name!r}")


def _sync_points(fn: Any) -> list[tuple[str, int]]:
    """The host stacks (our frames) that synchronised with the GPU during ``fn()``, with their counts."""
    import traceback
    import warnings
    from collections import Counter

    import torch

    seen: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        frames = [f for f in traceback.extract_stack()[:-1] if "/prefillonly/" in f.filename or "/bench/" in f.filename]
        seen["".join(traceback.format_list(frames[-4:]))] += 1

    old = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = old
    return seen.most_common(12)


def _summary(m: dict[str, Any], n: int) -> str:
    steps = m["steps"]
    tot = {k: sum(s.get(k, 0.0) for s in steps) for k in ("pixels_wait_s", "launch_s", "collect_s")}
    return (f"{n / m['total_s']:.1f} req/s, {m['total_s'] * 1e3:.0f} ms: render {m.get('render_s', 0) * 1e3:.0f} ms, "
            f"{len(steps)} steps: pixels wait {tot['pixels_wait_s'] * 1e3:.0f} ms, launch {tot['launch_s'] * 1e3:.0f} ms, "
            f"collect {tot['collect_s'] * 1e3:.0f} ms; tower {m['tower_calls']} calls, host {m['tower_s'] * 1e3:.0f} ms, "
            f"GPU {m.get('tower_gpu_s', 0.0) * 1e3:.0f} ms; peak {m.get('peak_gib', 0.0):.2f} GiB")


def _print_kernels(llm: Any, chats: list, label: str) -> None:
    """One profiled pass: kernel time, the idle split (head, gaps, tail) and the top kernels."""
    llm.model.encoder_cache.clear()
    busy = common.gpu_busy(lambda: llm.classify(chats, labels=LABELS, use_tqdm=False))
    wall = busy["profiled_wall_s"]
    print(f"{label} kernels: busy {busy['kernel_busy_s'] * 1e3:.0f} ms of {wall * 1e3:.0f} ms "
          f"(idle {1 - busy['kernel_busy_s'] / max(wall, 1e-9):.0%}: head {busy['head_s'] * 1e3:.0f} ms, "
          f"gaps {busy['gaps_s'] * 1e3:.0f} ms, tail {busy['tail_s'] * 1e3:.0f} ms; profiler on)")
    for t, count, key in busy["top_kernels_s"]:
        print(f"  {t * 1e3:8.1f} ms {count:6d}  {key}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen3-VL-2B-Instruct")
    p.add_argument("--workloads", default="V1,V2")
    p.add_argument("--n-images", type=int, default=192)
    p.add_argument("--variants", default="base",
                   help="comma-separated: base, noview, noflash, notowerflash, noepilogue, longestfirst, noupstream, "
                        "onewindow, hostpatchify, notail, budget<tokens>, prefetch<steps>, towerpatches<n>, switch<ms>ms, workers<n>, "
                        "firststep<fraction of the budget>")
    p.add_argument("--repeats", type=int, default=3, help="timelines per variant (the median is printed)")
    p.add_argument("--kernels", action="store_true", help="the profiler's kernel table of one pass per variant")
    p.add_argument("--cprofile", action="store_true", help="the main thread's cProfile of one pass")
    p.add_argument("--steps", action="store_true", help="print every step of the base timeline")
    p.add_argument("--trace", default=None, help="write a Chrome trace of one timeline pass per workload here (a folder)")
    p.add_argument("--sync-debug", action="store_true", help="where one pass synchronises with the GPU (CUDA)")
    p.add_argument("--tmp", default="/tmp/prefillonly-vlm-hostprof")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    a.v1_side, a.v2_min, a.v2_max, a.v3_questions = 448, 224, 1344, 10
    if a.smoke:
        common.use_cpu()
        a.n_images, a.v1_side, a.v2_min, a.v2_max, a.v3_questions = 8, 96, 56, 200, 2
    path = Path(a.tmp) / a.model
    hf = make_vl_checkpoint(a.model, path, a.smoke)
    del hf
    common.free()
    llm, _, _ = common.load_ours(path, dtype="float32" if a.smoke else "bfloat16")
    for wl in a.workloads.split(","):
        chats = make_workload(wl, a).chats
        n = len(chats)
        llm.classify(chats, labels=LABELS, use_tqdm=False)  # warm: kernels, allocators, pinned memory
        for variant in a.variants.split(","):
            undo = _variant(variant, llm)
            try:
                runs = [_timeline(llm, chats) for _ in range(a.repeats)]
                if a.kernels:
                    _print_kernels(llm, chats, f"{wl} [{variant}]")
            finally:
                undo()
            m = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
            print(f"{a.model} {wl} [{variant}] {n} requests: {_summary(m, n)}; "
                  f"all passes {[round(r['total_s'] * 1e3) for r in runs]} ms", flush=True)
            if a.steps and variant == "base":
                for k, s in enumerate(m["steps"]):
                    print(f"  step {k}: " + ", ".join(f"{key} {v * 1e3:.1f} ms" for key, v in s.items()))
                for row in m.get("first_images", []):
                    print("  step 0 image: " + ", ".join(f"{key} {v:.1f}" for key, v in row.items()))
        if a.trace:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if common.DEV == "cuda" else [])
            with profile(activities=acts) as prof:
                _timeline(llm, chats)
            Path(a.trace).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(a.trace) / f"{wl}.json"))
        if a.sync_debug and common.DEV == "cuda":
            llm.model.encoder_cache.clear()
            for where, count in _sync_points(lambda: llm.classify(chats, labels=LABELS, use_tqdm=False)):
                print(f"{wl} sync x{count}:\n{where}")
        if a.cprofile:
            prof = cProfile.Profile()
            llm.model.encoder_cache.clear()
            prof.enable()
            llm.classify(chats, labels=LABELS, use_tqdm=False)
            common.sync()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
            print(out.getvalue())


if __name__ == "__main__":
    main()
