"""No result depends on what else is in its batch: alone, packed into one step, or spread
over many small steps (including sequences longer than the sliding window and longer
than the token budget)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from tiny_models import PROMPTS, SLIDING_WINDOW

ITEMS = PROMPTS + [[{"role": "user", "content": "Summarise the plot of Hamlet in one sentence, please."}]]
LABELS = ["very positive", " negative", "not sure at all"]
TOL = 1e-5
TINY_BUDGET = 16


@contextlib.contextmanager
def watch_steps(llm):
    steps = []

    def observe(step):
        steps.append((step.num_tokens, len(step.seqs), [len(s) for s in step.seqs]))

    llm.runner.observers.append(observe)
    try:
        yield steps
    finally:
        llm.runner.observers.remove(observe)


def _flatten(task, res):
    """The numbers a result carries, in a fixed order."""
    assert res.error is None, res.error
    if task == "next_token":
        return [t.token_id for t in res.top_logprobs], [t.logprob for t in res.top_logprobs]
    if task == "classify":
        return [res.label], list(res.probs.values())
    if task == "score":
        return [], [res.score]
    return [], list(res.embedding)


def _call(llm, task, items):
    if task == "next_token":
        return llm.next_token(items, top_k=4)
    if task == "classify":
        return llm.classify(items, labels=LABELS)
    if task == "score":
        return llm.score("a question about stories and numbers", items)
    if task == "embed_mean":
        return llm.embed(items, pooling="mean")
    return llm.embed(items, pooling="last")


TASKS = ["next_token", "classify", "score", "embed_mean", "embed_last"]


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen3_tied", "llama_gqa_untied"])
def test_results_do_not_depend_on_the_batch(name, tiny_llm):
    big = tiny_llm(name)
    small = tiny_llm(name, max_num_batched_tokens=TINY_BUDGET)
    lengths = [len(big.encoder.encode(p, "p")) for p in ITEMS]
    assert min(lengths) < SLIDING_WINDOW < max(lengths) and max(lengths) > TINY_BUDGET
    for task in TASKS:
        items = ITEMS if task != "score" else [p for p in ITEMS if isinstance(p, str)]
        with watch_steps(big) as one:
            packed = _call(big, task, items)
        assert len(one) == 1, f"{task}: expected one packed step, got {one}"
        with watch_steps(small) as many:
            stepped = _call(small, task, items)
        assert len(many) >= 4, many
        assert all(n <= TINY_BUDGET or k == 1 for n, k, _ in many), many
        if task != "score":  # reranker templates alone exceed the tiny budget
            assert any(k > 1 for _, k, _ in many), f"{task}: short sequences should still share steps: {many}"
        alone = [_call(big, task, [item])[0] for item in items]
        for i, (a, p, s) in enumerate(zip(alone, packed, stepped)):
            ids_a, vals_a = _flatten(task, a)
            for other in (p, s):
                ids_o, vals_o = _flatten(task, other)
                assert ids_o == ids_a, (task, i)
                np.testing.assert_allclose(vals_o, vals_a, atol=TOL, rtol=0, err_msg=f"{task} item {i}")


def test_mixed_pooling_and_multi_row_sequences_share_a_step(tiny_llm):
    """MEAN-pooled, LAST-pooled and multi-row continuation sequences in the same packed step."""
    llm = tiny_llm("gemma3")
    from prefillonly.engine import Pooling, Sequence
    from prefillonly.tasks.embed import IdentityHead

    enc = llm.encoder
    ids = [enc.encode(p, "p") for p in PROMPTS[2:6]]
    seqs = [Sequence(ids[0], Pooling.MEAN), Sequence(ids[1], Pooling.LAST), Sequence(ids[2], (0, 3, 5)),
            Sequence(ids[3], Pooling.MEAN), Sequence(ids[0], Pooling.CLS)]
    together = llm.runner.run(seqs, IdentityHead())
    for seq, out in zip(seqs, together):
        ref = llm.runner.run([seq], IdentityHead())[0]
        assert out.shape == (seq.num_rows, 32)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=TOL, rtol=0)
    # CLS of a sequence is row 0, which is also row 0 of the explicit-rows selection of the same ids
    first = llm.runner.run([Sequence(ids[0], (0,))], IdentityHead())[0]
    np.testing.assert_allclose(together[4].numpy(), first.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_attention_query_blocks_match_transformers(name, tiny_llm, hf_ref, monkeypatch):
    """Long prompts run attention in query blocks; block edges must not move the sliding window."""
    import prefillonly.models.attention as attention

    from hf_reference import assert_topk_matches, ref_ids

    monkeypatch.setattr(attention, "_QUERY_BLOCK", 5)
    llm, hf = tiny_llm(name), hf_ref(name)
    for prompt, res in zip(PROMPTS, llm.next_token(PROMPTS, top_k=3)):
        assert_topk_matches(res, hf.logprobs(ref_ids(llm.tokenizer, prompt))[-1], 3)


@pytest.mark.parametrize("chunk", [1, 7])
def test_chunked_prefill_matches_transformers(chunk, tiny_llm, hf_ref):
    """Hybrid prefilling (token-wise work in chunks) computes the same function."""
    from hf_reference import assert_probs_close, assert_topk_matches, ref_classify_probs, ref_ids

    llm, hf = tiny_llm("gemma2", prefill_chunk_size=chunk), hf_ref("gemma2")
    assert all(layer.mlp_chunk == chunk for layer in llm.model.model.layers)
    for prompt, res in zip(PROMPTS, llm.next_token(PROMPTS, top_k=3)):
        assert_topk_matches(res, hf.logprobs(ref_ids(llm.tokenizer, prompt))[-1], 3)
    for prompt, res in zip(PROMPTS[2:5], llm.classify(PROMPTS[2:5], labels=LABELS)):
        assert_probs_close(res.probs, ref_classify_probs(hf, llm.tokenizer, ref_ids(llm.tokenizer, prompt), LABELS))


def test_a_long_call_starts_before_every_item_is_checked(tiny_llm, monkeypatch):
    """A list much larger than a step is checked in windows: the first step runs after a step's worth
    of items, later items are checked while steps run, and each result is what it is alone; an item
    that fails in a later window fails alone."""
    llm = tiny_llm("qwen3_tied", max_num_batched_tokens=24)
    prompts = [list(range(5 + i, 5 + i + n)) for i, n in enumerate([7, 12, 3, 9, 15, 4, 11, 6] * 5)]
    prompts[33] = [5, 6, -1]  # outside the vocabulary
    checked: list[str] = []
    encode = llm.encoder.encode
    monkeypatch.setattr(llm.encoder, "encode", lambda p, f, *a, **kw: (checked.append(f), encode(p, f, *a, **kw))[1])
    checked_at_step: list[int] = []
    llm.runner.observers.append(lambda step: checked_at_step.append(len(checked)))
    try:
        together = llm.embed(prompts)
    finally:
        llm.runner.observers.clear()
    assert checked_at_step[0] < 5 < len(prompts) == len(checked)
    assert len(set(checked_at_step)) > 3  # checking went on between steps
    assert "-1" in together[33].error and "texts[33]" in together[33].error
    for i, (p, r) in enumerate(zip(prompts, together)):
        if i != 33:
            np.testing.assert_allclose(r.embedding, llm.embed(p).embedding, atol=TOL, rtol=0)
