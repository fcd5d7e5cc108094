"""Every supported architecture, in several configurations, against transformers' own
forward on the same checkpoint files (float32, eager attention)."""

from __future__ import annotations

import pytest
import torch

from tiny_models import CAUSAL, NO_ID, PROMPTS, SEQCLS, SLIDING_WINDOW, TINY, YES_ID
from hf_reference import (COS_TOL, PROB_TOL, assert_probs_close, assert_topk_matches, cosine, normalized,
                          ref_classify_probs, ref_ids, reranker_ids)

CHAT = [
    [{"role": "user", "content": "Is water wet? Answer yes or no."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
]
SINGLE_TOKEN_LABELS = [" yes", " no", " maybe"]
MULTI_TOKEN_LABELS = ["very positive", " negative", "not sure at all", "positive"]


def test_prompts_exceed_the_sliding_window(qwen_tokenizer):
    lengths = [len(qwen_tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert min(lengths) < SLIDING_WINDOW
    assert sum(n > 4 * SLIDING_WINDOW for n in lengths) >= 1
    assert sum(n > SLIDING_WINDOW for n in lengths) >= len(PROMPTS) // 2


def test_label_sets_have_the_intended_token_counts(qwen_tokenizer):
    assert all(len(qwen_tokenizer.encode(lab, add_special_tokens=False)) == 1 for lab in SINGLE_TOKEN_LABELS)
    counts = [len(qwen_tokenizer.encode(lab, add_special_tokens=False)) for lab in MULTI_TOKEN_LABELS]
    assert max(counts) >= 3 and min(counts) == 1


@pytest.mark.parametrize("name", CAUSAL)
def test_next_token_matches_transformers(name, tiny_llm, hf_ref):
    llm, hf = tiny_llm(name), hf_ref(name)
    prompts = PROMPTS + CHAT + [[151643, 872, 13, 99, 5, 42, 1000, 22, 7, 9, 11]]
    results = llm.next_token(prompts, top_k=5)
    assert len(results) == len(prompts)
    for prompt, res in zip(prompts, results):
        lp = hf.logprobs(ref_ids(llm.tokenizer, prompt))[-1]
        assert_topk_matches(res, lp, 5)
        assert res.token == llm.tokenizer.decode([res.token_id])


@pytest.mark.parametrize("name", CAUSAL)
def test_classify_single_token_labels_match_transformers(name, tiny_llm, hf_ref):
    llm, hf = tiny_llm(name), hf_ref(name)
    tok = llm.tokenizer
    results = llm.classify(PROMPTS + CHAT, labels=SINGLE_TOKEN_LABELS)
    for prompt, res in zip(PROMPTS + CHAT, results):
        ids = ref_ids(tok, prompt)
        logits = hf.logits(ids)[-1]
        label_ids = [tok.encode(lab, add_special_tokens=False)[0] for lab in SINGLE_TOKEN_LABELS]
        ref = dict(zip(SINGLE_TOKEN_LABELS, torch.softmax(logits[label_ids], 0).tolist()))
        assert_probs_close(res.probs, ref)
        assert res.label == max(ref, key=ref.get)
        for lab, t in zip(SINGLE_TOKEN_LABELS, label_ids):
            assert res.logits[lab] == pytest.approx(float(logits[t]), abs=1e-4)


@pytest.mark.parametrize("name", CAUSAL)
def test_classify_multi_token_labels_match_transformers(name, tiny_llm, hf_ref):
    llm, hf = tiny_llm(name), hf_ref(name)
    prompts = PROMPTS[1:6]
    results = llm.classify(prompts, labels=MULTI_TOKEN_LABELS)
    for prompt, res in zip(prompts, results):
        ref = ref_classify_probs(hf, llm.tokenizer, ref_ids(llm.tokenizer, prompt), MULTI_TOKEN_LABELS)
        assert_probs_close(res.probs, ref)
        assert res.label == max(ref, key=ref.get)


@pytest.mark.parametrize("name", CAUSAL)
def test_score_matches_transformers_yes_no(name, tiny_llm, hf_ref):
    llm, hf = tiny_llm(name), hf_ref(name)
    query = "What is the capital of China?"
    docs = ["The capital of China is Beijing.", "Gravity is a force that attracts two bodies towards each other.",
            PROMPTS[4]]
    for instruction in (None, "Judge whether the document mentions a city"):
        results = llm.score(query, docs, instruction=instruction)
        for doc, res in zip(docs, results):
            logits = hf.logits(reranker_ids(llm.tokenizer, query, doc, instruction))[-1]
            ref = float(torch.sigmoid(logits[YES_ID] - logits[NO_ID]))
            assert res.error is None
            assert abs(res.score - ref) <= PROB_TOL, (doc, res.score, ref)
            # the same number the model card computes: softmax over [no, yes]
            card = float(torch.softmax(torch.stack([logits[NO_ID], logits[YES_ID]]), 0)[1])
            assert abs(res.score - card) <= PROB_TOL


@pytest.mark.parametrize("name", CAUSAL + SEQCLS + ["qwen3_backbone"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embed_matches_transformers_hidden_states(name, pooling, tiny_llm, hf_ref):
    llm, hf = tiny_llm(name), hf_ref(name)
    results = llm.embed(PROMPTS, pooling=pooling)
    for prompt, res in zip(PROMPTS, results):
        h = hf.hidden(ref_ids(llm.tokenizer, prompt))
        ref = normalized(h[-1] if pooling == "last" else h.mean(0))
        assert res.error is None
        assert res.embedding.shape == (TINY[name].make_config().hidden_size,)
        assert abs(float((res.embedding.astype("float64") ** 2).sum()) - 1.0) < 1e-5
        assert cosine(res.embedding, ref) >= COS_TOL
        assert abs(res.embedding - ref).max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen3_cls3", "llama_cls2"])
def test_sequence_classification_head_matches_transformers(name, tiny_llm, hf_ref):
    llm, hf = tiny_llm(name), hf_ref(name)
    config = hf.model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    results = llm.classify(PROMPTS)
    for prompt, res in zip(PROMPTS, results):
        logits = hf.logits(ref_ids(llm.tokenizer, prompt))  # (num_labels,): HF pools the last position itself
        ref = dict(zip(labels, torch.softmax(logits, 0).tolist()))
        assert_probs_close(res.probs, ref)
        assert res.label == max(ref, key=ref.get)
    if name == "qwen3_cls3":
        assert labels == ["negative", "neutral", "positive"]
    # passing its own labels is accepted; other labels are refused
    alone = llm.classify(PROMPTS[1], labels=labels).probs
    assert alone == pytest.approx(results[1].probs, abs=1e-6)
    from prefillonly import InvalidRequestError

    with pytest.raises(InvalidRequestError) as e:
        llm.classify(PROMPTS[1], labels=list(reversed(labels)))
    assert e.value.field == "labels"


def test_one_label_classifier_scores_with_its_head(tiny_llm, hf_ref):
    llm, hf = tiny_llm("qwen3_cls1"), hf_ref("qwen3_cls1")
    query = "What is the capital of China?"
    docs = ["The capital of China is Beijing.", "Gravity is a force.", PROMPTS[6]]
    for doc, res in zip(docs, llm.score(query, docs)):
        logit = hf.logits(reranker_ids(llm.tokenizer, query, doc))[0]
        assert abs(res.score - float(torch.sigmoid(logit))) <= PROB_TOL
    # classify() on a one-logit head is a sigmoid, not a (trivial) softmax over one label
    res = llm.classify(PROMPTS[2])
    logit = hf.logits(ref_ids(llm.tokenizer, PROMPTS[2]))[0]
    assert list(res.probs) == ["LABEL_0"]
    assert abs(res.probs["LABEL_0"] - float(torch.sigmoid(logit))) <= PROB_TOL


def test_bare_backbone_has_no_lm_head(tiny_llm, tiny_path):
    from prefillonly import InvalidRequestError
    from safetensors import safe_open

    with safe_open(str(tiny_path("qwen3_backbone") / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("model.") for k in keys)  # saved as Qwen3-Embedding ships
    llm = tiny_llm("qwen3_backbone")
    for call in (lambda: llm.next_token("hello"), lambda: llm.classify("hello", labels=["a", "b"]),
                 lambda: llm.score("q", ["d"])):
        with pytest.raises(InvalidRequestError) as e:
            call()
        assert e.value.field == "model"


def test_transformers4_style_config_reads_top_level_rope_theta(tiny_path, tmp_path, hf_ref):
    """A config.json written by transformers 4 (rope_theta at the top level) means the same model."""
    import json
    import shutil

    from prefillonly import LLM

    src = tiny_path("qwen3_untied")
    dest = tmp_path / "legacy"
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == 1000000.0  # not the 10000 default
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=1000000, rope_scaling=None, torch_dtype="float32")
    cfg.pop("dtype", None)
    (dest / "config.json").write_text(json.dumps(cfg))
    llm = LLM(dest, dtype="float32", use_tqdm=False)
    hf = hf_ref("qwen3_untied")
    for prompt, res in zip(PROMPTS, llm.next_token(PROMPTS, top_k=3)):
        assert_topk_matches(res, hf.logprobs(ref_ids(llm.tokenizer, prompt))[-1], 3)
