"""CUDA graph replays against eager steps and the CPU, on the tests' tiny checkpoints of several text architectures.

    python -m bench.graphs_tiny > graphs_tiny.log

For each checkpoint (tests/tiny_models.py: Qwen3, Gemma 2 with soft-capping, Gemma 3 with sliding windows, Qwen2
with biases) and engine setting, prints the cosine of the embeddings and the difference in next-token log-prob
against our float32 engine on the CPU, for three prompts of different lengths in one call and one by one, and
whether graphs and the fused path are in use. float32 and soft-capped attention take the portable path, which
reads sequence lengths on the host: graphs are refused there (``engine.accel.graph_blocker``); forcing them
must raise. This found the replays' wrong answers that the blocker now prevents (bench/NOTES.md, session 8).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import build_tiny  # noqa: E402

from prefillonly import LLM  # noqa: E402

PROMPTS = ["Hi", "The capital of France is", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3]
VARIANTS = {"f32": dict(dtype="float32"), "f32_graphs_forced": dict(dtype="float32", cuda_graphs=True),
            "bf16": dict(dtype="bfloat16"), "bf16_nographs": dict(dtype="bfloat16", cuda_graphs=False),
            "bf16_plain": dict(dtype="bfloat16", fused_kernels=False)}


def answers(llm: LLM, one_by_one: bool) -> tuple[np.ndarray, list[float]]:
    if one_by_one:
        return (np.stack([llm.embed(p).embedding for p in PROMPTS]), [llm.next_token(p).logprob for p in PROMPTS])
    return (np.stack([r.embedding for r in llm.embed(PROMPTS)]), [r.logprob for r in llm.next_token(PROMPTS)])


def main() -> None:
    root = Path(tempfile.mkdtemp())
    for name in ("qwen3_tied", "gemma2", "gemma3", "qwen2_bias"):
        path = build_tiny(name, root / name)
        ref_emb, ref_lp = answers(LLM(path, dtype="float32", device="cpu", use_tqdm=False), False)
        for variant, kw in VARIANTS.items():
            try:
                llm = LLM(path, device="cuda", use_tqdm=False, **kw)
            except Exception as e:  # a refused option is a result too
                print(f"{name:12s} {variant:18s} refused: {type(e).__name__}: {e}", flush=True)
                continue
            for one_by_one in (False, True):
                emb, lp = answers(llm, one_by_one)
                print(f"{name:12s} {variant:18s} one_by_one={one_by_one!s:5s} cos {np.round((emb * ref_emb).sum(1), 5)} "
                      f"dlogprob {np.round(np.array(lp) - np.array(ref_lp), 5)} graphs={llm.runner.graphs is not None} "
                      f"fused={llm.model.model.layers[0].fast is not None}", flush=True)


if __name__ == "__main__":
    main()
