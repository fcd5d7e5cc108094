"""The ``prefillonly`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from .errors import InvalidRequestError, PrefillOnlyError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``error: ...``), like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or cached hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step (default 16384)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest request accepted (default: the model's)")


def _make_llm(args):
    from .default_model import default_model_path
    from .llm import LLM

    model = args.model
    if model is None:
        print("using the embedded default model (converted once, then cached)", file=sys.stderr)
        model = default_model_path()
    budget = 16384 if args.max_num_batched_tokens is None else args.max_num_batched_tokens  # 0 is refused, not "default"
    return LLM(model, dtype=args.dtype, device=args.device, max_num_batched_tokens=budget,
               max_model_len=args.max_model_len)


def _demo_rows(path: str | None, limit: int) -> list[dict]:
    """The demo's labelled rows, checked before any model loads: a bad --data file is one clear line."""
    from .demo import LABELS, load_dataset

    if limit < 0:
        raise InvalidRequestError("limit", f"must be 0 (all rows) or a positive number of rows; got {limit}")
    if path is None:
        return load_dataset()[:limit] if limit else load_dataset()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InvalidRequestError("data", f"cannot read {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InvalidRequestError("data", f"{path!r} is not UTF-8 text; pass a JSONL file") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError("data", f"{path!r} line {i} is not JSON ({e.msg}); pass a JSONL file") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or row.get("label") not in LABELS:
            raise InvalidRequestError("data", f"{path!r} line {i}: each row needs a string 'text' and a 'label' in {LABELS}")
        rows.append(row)
    if not rows:
        raise InvalidRequestError("data", f"{path!r} has no rows")
    return rows[:limit] if limit else rows


def _cmd_demo(args) -> int:
    from .demo import run_demo

    rows = _demo_rows(args.data, args.limit)
    llm = _make_llm(args)
    report, _ = run_demo(llm, rows, compare=not args.no_compare)
    print(f"prefillonly demo: sentiment classification on {llm.path.name} ({llm.device}, {str(llm.dtype).removeprefix('torch.')})")
    for line in report.lines():
        print("  " + line)
    return 0


def _cmd_run(args) -> int:
    from .jobs import JobSpec
    from .jobs.engine_processor import check_job

    options = {
        "labels": args.labels, "query": args.query, "instruction": args.instruction, "dimensions": args.dimensions,
        "normalize": False if args.no_normalize else None, "top_k": args.top_k, "truncate": args.truncate,
        "truncation_side": args.truncation_side, "pooling": args.pooling,
    }
    options = {k: v for k, v in options.items() if v is not None}
    engine = {"dtype": args.dtype if args.dtype != "auto" else None, "device": args.device,
              "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": args.max_model_len}
    engine = {k: v for k, v in engine.items() if v is not None}
    flags = {
        "input": args.input, "output": args.output, "task": args.task, "prompt": args.prompt,
        "messages_column": args.messages_column, "id_column": args.id_column, "output_format": args.output_format,
        "image_columns": args.image_column or None, "rows_per_shard": args.rows_per_shard,
        "batch_rows": args.batch_rows, "model": args.model, "task_options": options or None, "engine": engine or None,
    }
    if args.job:
        spec = JobSpec.from_file(args.job, **flags)
    else:
        spec = JobSpec.from_dict({k: v for k, v in flags.items() if v is not None})
    progress = not args.no_progress
    if args.data_parallel < 0:
        raise InvalidRequestError("data_parallel", f"must be a positive number of engine processes, got {args.data_parallel}")
    check_job(spec)  # option mistakes fail here, before any model, worker process or Ray actor starts
    if args.ray:
        from .jobs.ray_job import run_ray

        summary = run_ray(spec, num_workers=args.data_parallel or 1, progress=progress)
    elif args.data_parallel and args.data_parallel > 1:
        from .jobs.parallel import run_data_parallel

        summary = run_data_parallel(spec, args.data_parallel, progress=progress)
    else:
        from .jobs.local import run_local

        summary = run_local(spec, progress=progress)
    print(summary)
    return 0


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="run a task over JSONL/CSV/Parquet files; resumable, sharded output")
    run.add_argument("--job", help="a YAML or JSON job file; flags override its fields")
    run.add_argument("--input", help="a file, a glob or a directory of .jsonl/.csv/.parquet files")
    run.add_argument("--output", help="output directory (sharded; rerun the same command to resume)")
    run.add_argument("--task", choices=["classify", "score", "embed", "next_token"])
    run.add_argument("--prompt", help="prompt template with {column} fields, e.g. 'Review: {text}'")
    run.add_argument("--messages-column", help="a column of chat messages instead of --prompt")
    run.add_argument("--id-column", help="column with row ids (default: 'id' if present, else the row number)")
    run.add_argument("--image-column", action="append", help="column of image paths, URLs or bytes (repeatable)")
    run.add_argument("--output-format", choices=["parquet", "jsonl"])
    run.add_argument("--labels", nargs="+", help="classify: the candidate labels")
    run.add_argument("--query", help="score: the query every row's text is scored against")
    run.add_argument("--instruction", help="score/embed: the instruction")
    run.add_argument("--dimensions", type=int, help="embed: keep the first N dimensions")
    run.add_argument("--no-normalize", action="store_true", help="embed: skip L2 normalisation")
    run.add_argument("--pooling", choices=["last", "mean", "cls"], help="embed: pooling (default: the model's)")
    run.add_argument("--top-k", type=int, help="next_token: alternatives to keep")
    run.add_argument("--truncate", type=int, help="cut each prompt to N tokens instead of failing long rows")
    run.add_argument("--truncation-side", choices=["left", "right"])
    run.add_argument("--rows-per-shard", type=int)
    run.add_argument("--batch-rows", type=int, help="rows handed to the engine per call")
    run.add_argument("--data-parallel", type=int, default=0,
                     help="engine processes on this host, one per GPU; with --ray, the number of engine actors")
    run.add_argument("--ray", action="store_true",
                     help="run through Ray Data on the cluster at $RAY_ADDRESS, or on a local Ray instance "
                          "(pip install 'prefillonly[ray]'); same output, resumable")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _engine_args(run)
    run.set_defaults(func=_cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prefillonly", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="classify the bundled labelled set with the default model and report accuracy, speed and agreement with transformers")
    _engine_args(demo)
    demo.add_argument("--data", help="a JSONL file with 'text' and 'label' (positive/negative) fields")
    demo.add_argument("--limit", type=int, default=0, help="use only the first N rows")
    demo.add_argument("--no-compare", action="store_true", help="skip the comparison with transformers")
    demo.set_defaults(func=_cmd_demo)
    _run_parser(sub)
    return parser


def _one_line(message: str) -> str:
    """A multi-line message (a YAML parser's, say) folded onto one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip() not in ("", "^"))


def main(argv: list[str] | None = None) -> int:
    """Run the command: 0 on success; on failure one ``error: ...`` line on stderr and a non-zero code
    (2: bad arguments, input or model; 1: anything else; 130: interrupted).
    PREFILLONLY_DEBUG=1 shows the traceback of an unexpected error instead."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrefillOnlyError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unreadable file deep in a library: still one line, unless debugging
        if os.environ.get("PREFILLONLY_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {_one_line(str(e))} (PREFILLONLY_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
