"""The main job on the embedded default model: label a bundled sentiment set.

It reports accuracy against the gold labels, throughput, and agreement with
transformers' own forward on the same checkpoint, so a fresh install shows
both that the engine works and that it is exact.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TEMPLATE = "Is the sentiment of this review positive or negative? Answer with one word.\n\nReview: {text}"
LABELS = ["positive", "negative"]


@dataclass
class DemoReport:
    rows: int
    accuracy: float
    seconds: float
    tokens: int
    agreement: float | None = None  # share of rows with the same argmax as transformers
    max_prob_diff: float | None = None

    def lines(self) -> list[str]:
        out = [
            f"rows            {self.rows}",
            f"accuracy        {self.accuracy:.3f}",
            f"throughput      {self.rows / self.seconds:.1f} req/s, {self.tokens / self.seconds:,.0f} tok/s ({self.seconds:.2f} s)",
        ]
        if self.agreement is not None:
            out.append(f"vs transformers same argmax on {self.agreement:.1%} of rows, max |dp| = {self.max_prob_diff:.2e}")
        return out


def load_dataset(path: str | Path | None = None) -> list[dict]:
    if path is None:
        text = resources.files("prefillonly").joinpath("data/sentiment.jsonl").read_text()
    else:
        text = Path(path).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_demo(llm, rows: list[dict], compare: bool = True) -> tuple[DemoReport, list]:
    prompts = [[{"role": "user", "content": TEMPLATE.format(text=r["text"])}] for r in rows]
    llm.classify(prompts[:2], labels=LABELS, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    results = llm.classify(prompts, labels=LABELS)
    seconds = time.perf_counter() - start
    tokens = sum(len(llm.encoder.encode(p, "prompt")) for p in prompts)
    correct = sum(r.label == row["label"] for r, row in zip(results, rows))
    report = DemoReport(len(rows), correct / len(rows), seconds, tokens)
    if compare:
        ref = transformers_label_probs(llm, prompts)
        ours = [[r.probs[label] for label in LABELS] for r in results]
        same = sum(max(range(len(LABELS)), key=a.__getitem__) == max(range(len(LABELS)), key=b.__getitem__)
                   for a, b in zip(ours, ref))
        report.agreement = same / len(rows)
        report.max_prob_diff = max(abs(x - y) for a, b in zip(ours, ref) for x, y in zip(a, b))
    return report, results


def transformers_label_probs(llm, prompts) -> list[list[float]]:
    """The same label probabilities from transformers' forward, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm.path, dtype=llm.dtype).to(llm.device).eval()
    label_ids = [llm.tokenizer.encode(label, add_special_tokens=False)[0] for label in LABELS]
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([llm.encoder.encode(p, "prompt")], device=llm.device)
            logits = model(ids).logits[0, -1, label_ids].double()
            out.append(torch.softmax(logits, dim=0).tolist())
    return out
