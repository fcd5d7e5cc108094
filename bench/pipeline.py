"""Issue 6's device check: ``prefillonly run`` from file to results against the engine in memory, on W1.

    python -m bench.pipeline --out results_pipeline.json [--rows 8192] [--passes 3] [--batch-rows N]
    python -m bench.pipeline --smoke --out /tmp/pipeline_smoke.json   # CPU, float32, tiny Qwen3: tests this script

W1 is Qwen3-0.6B (random bf16 weights in the real config), prompts of lengths
uniform in [128, 1024] tokens, yes/no label scoring. A pipeline run pays for
process start and model load, so it runs on ``--rows`` rows (default 8192,
W1's length mix) for the start-up to be amortised:

1. A Parquet file (``id``, ``text``) is written whose texts tokenise to exactly
   the drawn lengths with the real Qwen3 tokenizer: each text is ordinary
   lower-case words that are single tokens with and without a leading space,
   so one word is one token (checked by re-tokenising every text).
2. In memory: ``LLM.classify(texts, labels=["yes", "no"])`` on the same texts
   (a warm pass, then the median of ``--passes``), and for reference the same
   from pre-tokenised ids (``--ref-passes``). Tokenisation alone is timed too,
   batched and one text at a time.
3. The pipeline, Parquet in, Parquet out, same template and labels, each run
   into a fresh output directory, median of ``--passes`` runs:
   (w) warm engine: ``run_job`` with the engine processor on the engine of
   step 2, in this process: the pipeline's own cost, engine warm-up excluded;
   (b) ``python -m prefillonly run`` as a subprocess, its job summary's rows/s:
   the job after the model is loaded (the engine's first-batch warm-up included);
   (a) the same subprocess end to end: process start, imports, model load, job.
4. Rows/s and tokens/s of each, the ratios pipeline / in-memory against the
   90% target, and the pipeline's probabilities against the in-memory ones.
   Printed, and written as JSON (``--out``) and markdown (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import common
from bench.common import (CONFIGS, LABELS, TOKENIZER, agree_probs, build_checkpoint, free, load_ours, log, run_meta,
                          sync, timed_passes)

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.90
TEMPLATE = "{text}"
SMOKE_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, layer_types=["full_attention"] * 2, max_window_layers=2)
_SUMMARY = re.compile(r"([\d,]+) rows \(([\d,]+) results, ([\d,]+) errors\) in ([\d.]+) s, ([\d,.]+) rows/s"
                      r"(?:, ([\d,]+) tokens/s)?")


# -- input ------------------------------------------------------------------------------------


def word_tokens(tok: Any, limit: int = 1000) -> list[str]:
    """Lower-case words that are one token both alone and after a space, most common (lowest id) first.

    Qwen's pre-tokenizer cuts text into " word" chunks, so a text made of such
    words has exactly one token per word, whatever the neighbours.
    """
    words = []
    for piece, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        word = piece[1:]
        if piece[0] != "\u0120" or not (3 <= len(word) <= 10 and word.isascii() and word.isalpha() and word.islower()):
            continue
        if len(tok.encode(word, add_special_tokens=False)) == 1 and len(tok.encode(" " + word, add_special_tokens=False)) == 1:
            words.append(word)
            if len(words) >= limit:
                break
    return words


def make_texts(tok: Any, n: int, lo: int, hi: int, seed: int = 1) -> tuple[list[str], list[int]]:
    """``n`` texts of uniform token lengths in [lo, hi] (checked), and those lengths."""
    rng = random.Random(seed)
    words = word_tokens(tok)
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    texts = [" ".join(rng.choices(words, k=length)) for length in lengths]
    got = [len(ids) for ids in tok(texts, add_special_tokens=True, return_attention_mask=False)["input_ids"]]
    bad = [i for i, (a, b) in enumerate(zip(got, lengths)) if a != b]
    if bad:
        raise RuntimeError(f"{len(bad)} texts do not tokenise to their drawn length (first: row {bad[0]}, "
                           f"{got[bad[0]]} != {lengths[bad[0]]})")
    return texts, lengths


def write_input(path: Path, texts: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts)}), path)
    return path


# -- in memory --------------------------------------------------------------------------------


def tokenizer_costs(llm: Any, texts: list[str], lengths: list[int]) -> dict:
    """Host cost of tokenisation: the batched call on all texts, one text at a time on a subset."""
    enc = llm.encoder
    t = time.perf_counter()
    enc.encode_texts(texts)
    batched = time.perf_counter() - t
    sub = texts[: min(len(texts), 1024)]
    t = time.perf_counter()
    for text in sub:
        llm.tokenizer.encode(text)
    serial = time.perf_counter() - t
    return {"cpu_count": os.cpu_count(), "batched_s": batched,
            "batched_us_per_1k_tokens": batched / sum(lengths) * 1e9,
            "per_text_us_per_1k_tokens": serial / sum(lengths[: len(sub)]) * 1e9,
            "per_text_s_extrapolated": serial * len(texts) / len(sub)}


def _rates(times: list[float], rows: int, tokens: int) -> dict:
    med = statistics.median(times)
    return {"median_s": med, "times_s": times, "rows_per_s": rows / med, "tokens_per_s": tokens / med}


def _log_rates(name: str, r: dict) -> None:
    log(f"  {name:34s} {r['median_s']:7.3f} s  {r['rows_per_s']:9,.1f} rows/s  {r['tokens_per_s']:11,.0f} tok/s"
        f"  (passes {', '.join(f'{x:.3f}' for x in r['times_s'])})")


def job_spec(input_path: Path, out: Path, ckpt: Path, args: argparse.Namespace) -> Any:
    """The job the CLI command of :func:`cli_command` builds, for the in-process runs."""
    from prefillonly.jobs import JobSpec

    extra = {"batch_rows": args.batch_rows} if args.batch_rows else {}
    return JobSpec(input=str(input_path), output=str(out), task="classify", prompt=TEMPLATE,
                   task_options={"labels": list(LABELS)}, model=str(ckpt),
                   engine={"dtype": args.dtype, "device": common.DEV}, **extra)


def in_memory(ckpt: Path, texts: list[str], lengths: list[int], input_path: Path, args: argparse.Namespace) -> dict:
    """The engine's own throughput on the texts (and on their ids), and the job on the same warm engine."""
    from prefillonly.jobs.engine_processor import EngineProcessor
    from prefillonly.jobs.local import fingerprint_extra
    from prefillonly.jobs.runner import run_job

    llm, _, _ = load_ours(ckpt, dtype=args.dtype)
    ids = llm.encoder.encode_texts(texts)

    def run_text() -> list:
        return llm.classify(texts, labels=LABELS, use_tqdm=False)

    def run_ids() -> list:
        return llm.classify(ids, labels=LABELS, use_tqdm=False)

    t = time.perf_counter()
    llm.classify(texts[:1024], labels=LABELS, use_tqdm=False)  # warm: kernels compiled, graphs captured
    sync()
    warm_s = time.perf_counter() - t
    text_times, results = timed_passes(run_text, args.passes)
    ids_times, _ = timed_passes(run_ids, args.ref_passes)
    job_times: list[float] = []
    for i in range(args.passes):  # the whole job minus process start and model load: warm engine
        spec = job_spec(input_path, Path(args.tmp) / f"pipeline-warm-{i}", ckpt, args)
        shutil.rmtree(spec.output, ignore_errors=True)
        summary = run_job(spec, EngineProcessor(llm, spec), progress=False, fingerprint_extra=fingerprint_extra(llm))
        sync()
        job_times.append(summary.wall_s)
    costs = tokenizer_costs(llm, texts, lengths)
    probs = [r.probs["yes"] if r.error is None else float("nan") for r in results]
    errors = sum(r.error is not None for r in results)
    del llm
    free()
    tokens, rows = sum(lengths), len(texts)
    out = {"warm_s": warm_s, "errors": errors, "tokenizer": costs, "probs_yes": probs,
           "text": _rates(text_times, rows, tokens), "ids": _rates(ids_times, rows, tokens),
           "job_warm_engine": _rates(job_times, rows, tokens)}
    log(f"  warm pass {warm_s:.2f} s")
    _log_rates("in memory, classify(texts)", out["text"])
    _log_rates("in memory, classify(ids)", out["ids"])
    _log_rates("pipeline, warm engine (run_job)", out["job_warm_engine"])
    c = costs
    log(f"  tokenizer on {c['cpu_count']} cores: batched {c['batched_us_per_1k_tokens']:.0f} µs/1k tokens "
        f"({c['batched_s']:.3f} s for all rows), one text at a time {c['per_text_us_per_1k_tokens']:.0f} µs/1k tokens")
    return out


# -- the pipeline -----------------------------------------------------------------------------


def cli_command(input_path: Path, out: Path, ckpt: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "prefillonly", "run", "--input", str(input_path), "--output", str(out),
           "--task", "classify", "--prompt", TEMPLATE, "--labels", *LABELS, "--model", str(ckpt),
           "--dtype", args.dtype, "--device", common.DEV, "--no-progress"]
    if args.batch_rows:
        cmd += ["--batch-rows", str(args.batch_rows)]
    return cmd


def parse_summary(stdout: str) -> dict:
    """The job summary line ``prefillonly run`` prints last."""
    m = None
    for line in stdout.strip().splitlines()[::-1]:
        m = _SUMMARY.search(line)
        if m:
            break
    if m is None:
        raise RuntimeError(f"no job summary in the output of prefillonly run:\n{stdout[-2000:]}")
    def num(s: str | None) -> float:
        return float(s.replace(",", "")) if s else 0.0

    return {"rows": int(num(m[1])), "results": int(num(m[2])), "errors": int(num(m[3])), "job_s": num(m[4]),
            "rows_per_s": num(m[5]), "tokens_per_s": num(m[6])}


def pipeline_runs(input_path: Path, ckpt: Path, rows: int, tokens: int, args: argparse.Namespace) -> list[dict]:
    """``--passes`` runs of the CLI as a subprocess, each into a fresh output directory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    runs = []
    for i in range(args.passes):
        out = Path(args.tmp) / f"pipeline-out-{i}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = cli_command(input_path, out, ckpt, args)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"prefillonly run exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
        summary = parse_summary(proc.stdout)
        if summary["rows"] != rows:
            raise RuntimeError(f"the job handled {summary['rows']} rows of {rows}")
        run = {"wall_s": wall, "startup_s": wall - summary["job_s"], "rows_per_s_end_to_end": rows / wall,
               "tokens_per_s_end_to_end": tokens / wall, **summary, "output": str(out)}
        log(f"  pipeline run {i}: {wall:6.2f} s end to end ({rows / wall:8,.1f} rows/s), job {summary['job_s']:6.2f} s "
            f"({summary['rows_per_s']:8,.1f} rows/s, {summary['tokens_per_s']:10,.0f} tok/s), start-up {run['startup_s']:.2f} s")
        runs.append(run)
    return runs


def output_probs(out: str) -> dict[int, float]:
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["id", "probs"]).flatten()
    return dict(zip(table.column("id").to_pylist(), table.column("probs.yes").to_pylist()))


# -- the run ----------------------------------------------------------------------------------


def _median_run(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"meta": run_meta(args.commit, args.passes, rows=args.rows, lengths=[args.lo, args.hi],
                                             batch_rows=args.batch_rows or "default", dtype=args.dtype,
                                             ref_passes=args.ref_passes, smoke=args.smoke, target=TARGET)}
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    texts, lengths = make_texts(tok, args.rows, args.lo, args.hi)
    input_path = write_input(tmp / "pipeline-in" / "rows.parquet", texts)
    tokens = sum(lengths)
    log(f"input: {args.rows:,} rows, {tokens:,} tokens (mean {tokens / args.rows:.0f}), "
        f"{input_path.stat().st_size / 2**20:.1f} MiB Parquet ({time.perf_counter() - t0:.1f} s to make)")
    data["input"] = {"rows": args.rows, "tokens": tokens, "bytes": input_path.stat().st_size}

    cfg = AutoConfig.from_pretrained(CONFIGS / "Qwen3-0.6B", **(SMOKE_CONFIG if args.smoke else {}))
    ckpt = tmp / "Qwen3-0.6B-pipeline"
    free(build_checkpoint(cfg, AutoModelForCausalLM, ckpt, dtype=getattr(torch, args.dtype)))

    tok.save_pretrained(ckpt)  # tokenizer.json, as real checkpoints ship it: the CLI loads it, not converts
    log(f"in memory (this process; warm pass on {min(args.rows, 1024)} rows):")
    mem = in_memory(ckpt, texts, lengths, input_path, args)
    ref_probs = mem.pop("probs_yes")
    data["in_memory"] = mem
    log(f"pipeline (prefillonly run, a subprocess per run): {' '.join(cli_command(input_path, tmp / 'OUT', ckpt, args))}")
    runs = pipeline_runs(input_path, ckpt, args.rows, tokens, args)
    got = output_probs(runs[-1]["output"])
    agreement = agree_probs([got[i] for i in range(args.rows)], ref_probs)
    base = mem["text"]["rows_per_s"]
    warm = mem["job_warm_engine"]["rows_per_s"]
    job = _median_run(runs, "rows_per_s")
    e2e = _median_run(runs, "rows_per_s_end_to_end")
    data["pipeline"] = {
        "runs": runs, "agreement_with_in_memory": agreement,
        "warm_engine": {"rows_per_s": warm, "tokens_per_s": mem["job_warm_engine"]["tokens_per_s"],
                        "vs_in_memory_text": warm / base, "vs_in_memory_ids": warm / mem["ids"]["rows_per_s"],
                        "meets_target": warm / base >= TARGET},
        "cli_job": {"rows_per_s": job, "tokens_per_s": _median_run(runs, "tokens_per_s"),
                    "vs_in_memory_text": job / base, "vs_in_memory_ids": job / mem["ids"]["rows_per_s"],
                    "meets_target": job / base >= TARGET},
        "cli_end_to_end": {"rows_per_s": e2e, "tokens_per_s": e2e * tokens / args.rows, "vs_in_memory_text": e2e / base,
                       "meets_target": e2e / base >= TARGET, "startup_s": _median_run(runs, "startup_s")},
    }
    data["total_s"] = time.perf_counter() - t0
    return data


def markdown(data: dict) -> str:
    m, mem, p = data["meta"], data["in_memory"], data["pipeline"]
    rows, tokens = data["input"]["rows"], data["input"]["tokens"]
    tk = mem["tokenizer"]
    lines = [
        f"Device: {m['device']}; torch {m['torch']}; transformers {m.get('transformers')}; commit {m['commit']}; "
        f"{m['date']}; {m['dtype']}. W1 mix: {rows:,} rows, lengths uniform in {m['lengths']}, {tokens:,} tokens; "
        f"yes/no classify; batch rows {m['batch_rows']}. In memory: warm pass, then the median of {m['passes']} "
        f"(ids: {m['ref_passes']}); pipeline: median of {len(p['runs'])} runs of `prefillonly run` as a subprocess.",
        "",
        "| path | rows/s | tokens/s | vs in-memory (text) | target 90% |",
        "|---|---:|---:|---:|---|",
        f"| in memory, `LLM.classify(texts)` | {mem['text']['rows_per_s']:,.1f} | {mem['text']['tokens_per_s']:,.0f} | 1.00 | |",
        f"| in memory, `LLM.classify(ids)` (reference) | {mem['ids']['rows_per_s']:,.1f} | {mem['ids']['tokens_per_s']:,.0f} | "
        f"{mem['ids']['rows_per_s'] / mem['text']['rows_per_s']:.2f} | |",
        f"| pipeline on a warm engine (in-process `run_job`, parquet to parquet) | {p['warm_engine']['rows_per_s']:,.1f} | "
        f"{p['warm_engine']['tokens_per_s']:,.0f} | {p['warm_engine']['vs_in_memory_text']:.3f} | "
        f"{'met' if p['warm_engine']['meets_target'] else 'NOT met'} |",
        f"| pipeline, `prefillonly run`, job after model load (job summary) | {p['cli_job']['rows_per_s']:,.1f} | {p['cli_job']['tokens_per_s']:,.0f} | "
        f"{p['cli_job']['vs_in_memory_text']:.3f} | {'met' if p['cli_job']['meets_target'] else 'NOT met'} |",
        f"| pipeline, `prefillonly run`, end to end (process start + model load + job) | {p['cli_end_to_end']['rows_per_s']:,.1f} | "
        f"{p['cli_end_to_end']['tokens_per_s']:,.0f} | {p['cli_end_to_end']['vs_in_memory_text']:.3f} | "
        f"{'met' if p['cli_end_to_end']['meets_target'] else 'NOT met'} |",
        "",
        f"Pipeline start-up (end to end minus the job): median {p['cli_end_to_end']['startup_s']:.2f} s. "
        f"Pipeline probabilities vs in memory: max |dp| {p['agreement_with_in_memory']['max_abs_dp']:.2e}, "
        f"argmax {p['agreement_with_in_memory']['argmax_agree'] * 100:.1f}%.",
        f"Tokenizer on {tk['cpu_count']} cores: batched {tk['batched_us_per_1k_tokens']:.0f} µs per 1k tokens "
        f"({tk['batched_s']:.3f} s for all rows), one text at a time {tk['per_text_us_per_1k_tokens']:.0f} µs per 1k tokens.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results_pipeline.json")
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--lo", type=int, default=128, help="shortest prompt, tokens (W1: 128)")
    p.add_argument("--hi", type=int, default=1024, help="longest prompt, tokens (W1: 1024)")
    p.add_argument("--passes", type=int, default=None, help="timed in-memory passes, and pipeline runs (3; smoke 2)")
    p.add_argument("--ref-passes", type=int, default=1, help="timed in-memory passes from ids (a reference)")
    p.add_argument("--batch-rows", type=int, default=0, help="prefillonly run --batch-rows (0: the job default)")
    p.add_argument("--commit", default=os.environ.get("BENCH_COMMIT", "unknown"))
    p.add_argument("--tmp", default="/tmp/prefillonly-bench-pipeline")
    p.add_argument("--smoke", action="store_true", help="CPU, float32, a 2-layer Qwen3, few rows: tests this script")
    args = p.parse_args(argv)
    args.dtype = "bfloat16"
    args.passes = args.passes or (2 if args.smoke else 3)
    if args.smoke:
        common.use_cpu()
        # One thread for the engine, in this process and in the CLI's: the other cores
        # play the host, as beside a GPU (and torch's threads spinning on a busy 2-core
        # box would otherwise swamp every figure).
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        args.dtype = "float32"
        args.rows, args.lo, args.hi = min(args.rows, 192), min(args.lo, 32), min(args.hi, 160)
        args.batch_rows = args.batch_rows or 48
        args.tmp += "-smoke"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = run(args)
    except Exception:
        log(traceback.format_exc())
        return 1
    common.write_results(out, data, markdown)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
