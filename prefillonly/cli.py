"""The ``prefillonly`` command."""

from __future__ import annotations

import argparse
import sys

from .errors import PrefillOnlyError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or cached hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384, help="token budget of one step")
    p.add_argument("--max-model-len", type=int, default=None, help="longest request accepted (default: the model's)")


def _make_llm(args):
    from .default_model import default_model_path
    from .llm import LLM

    model = args.model
    if model is None:
        print("using the embedded default model (converted once, then cached)", file=sys.stderr)
        model = default_model_path()
    return LLM(model, dtype=args.dtype, device=args.device, max_num_batched_tokens=args.max_num_batched_tokens,
               max_model_len=args.max_model_len)


def _cmd_demo(args) -> int:
    from .demo import load_dataset, run_demo

    llm = _make_llm(args)
    rows = load_dataset(args.data)
    if args.limit:
        rows = rows[: args.limit]
    report, _ = run_demo(llm, rows, compare=not args.no_compare)
    print(f"prefillonly demo: sentiment classification on {llm.path.name} ({llm.device}, {str(llm.dtype).removeprefix('torch.')})")
    for line in report.lines():
        print("  " + line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefillonly", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="classify the bundled labelled set with the default model and report accuracy, speed and agreement with transformers")
    _engine_args(demo)
    demo.add_argument("--data", help="a JSONL file with 'text' and 'label' (positive/negative) fields")
    demo.add_argument("--limit", type=int, default=0, help="use only the first N rows")
    demo.add_argument("--no-compare", action="store_true", help="skip the comparison with transformers")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrefillOnlyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
