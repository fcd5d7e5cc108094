"""Reference computations written out independently of the engine."""

from __future__ import annotations

import math

import numpy as np
import torch

PROB_TOL = 1e-4
COS_TOL = 0.99999

RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def format_instruction(instruction, query, doc):
    """Verbatim from the Qwen3-Reranker model card."""
    if instruction is None:
        instruction = RERANK_DEFAULT_TASK
    output = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(
        instruction=instruction, query=query, doc=doc
    )
    return output


def reranker_ids(tokenizer, query, doc, instruction=None, max_length=8192):
    """The model card's process_inputs for one pair (no padding needed for one sequence)."""
    prefix_tokens = tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False)
    pairs = [format_instruction(instruction, query, doc)]
    inputs = tokenizer(
        pairs, padding=False, truncation="longest_first", return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    return prefix_tokens + inputs["input_ids"][0] + suffix_tokens


def ref_ids(tokenizer, prompt) -> list[int]:
    """Token ids a user of transformers would feed for a text, chat or id prompt."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(prompt)


def ref_label_logprob(hf, prompt_ids: list[int], label_ids: list[int]) -> float:
    """log p(label | prompt) = sum of the label tokens' log-probabilities, by teacher forcing."""
    lp = hf.logprobs(prompt_ids + label_ids)
    n = len(prompt_ids)
    return sum(float(lp[n - 1 + j, t]) for j, t in enumerate(label_ids))


def ref_classify_probs(hf, tokenizer, prompt_ids, labels) -> dict[str, float]:
    """Label probabilities normalised over the labels: softmax of the labels' sequence log-probs."""
    scores = torch.tensor(
        [ref_label_logprob(hf, prompt_ids, tokenizer.encode(lab, add_special_tokens=False)) for lab in labels],
        dtype=torch.float64,
    )
    return dict(zip(labels, torch.softmax(scores, 0).tolist()))


def assert_probs_close(ours: dict[str, float], ref: dict[str, float], tol=PROB_TOL):
    assert list(ours) == list(ref)
    worst = max(abs(ours[k] - ref[k]) for k in ref)
    assert worst <= tol, f"max |dp| = {worst:.3g}: ours {ours} vs reference {ref}"
    assert math.isclose(sum(ours.values()), 1.0, abs_tol=1e-6)


def assert_topk_matches(result, ref_logprobs: torch.Tensor, k: int, tol=PROB_TOL, tie=1e-5):
    """Our top-k equals the reference's: values within tol, ids equal except inside exact ties."""
    assert result.error is None, result.error
    ids = [t.token_id for t in result.top_logprobs]
    vals = [t.logprob for t in result.top_logprobs]
    assert len(ids) == k and len(set(ids)) == k
    ref_vals, ref_top = ref_logprobs.topk(k + 1)
    ref_vals, ref_top = ref_vals.tolist(), ref_top.tolist()
    for i in range(k):
        assert abs(vals[i] - ref_vals[i]) <= tol, (i, vals, ref_vals)
        assert abs(vals[i] - float(ref_logprobs[ids[i]])) <= tol, (i, ids[i])
        isolated = (i == 0 or ref_vals[i - 1] - ref_vals[i] > tie) and ref_vals[i] - ref_vals[i + 1] > tie
        if isolated:
            assert ids[i] == ref_top[i], (i, ids, ref_top)
    assert result.token_id == ids[0] and result.logprob == vals[0]


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def normalized(v: torch.Tensor) -> np.ndarray:
    v = v.double()
    return (v / v.norm()).numpy()
