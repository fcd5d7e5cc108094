"""The last layer computes only the rows a task reads (``StepInput.tail``): the same answers as computing
every row, for single- and multi-token labels, sliding windows, soft-capping and GQA."""

from __future__ import annotations

import contextlib

import pytest
import torch

from prefillonly.engine import batch
from prefillonly.engine.batch import build_step
from prefillonly.engine.sequence import Pooling, Sequence
from prefillonly.models.attention import AttentionMeta, TailMeta, packed_attention, tail_attention

from tiny_models import PROMPTS

CPU = torch.device("cpu")


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 2.0)])
def test_tail_attention_equals_the_full_attention_rows(window, softcap):
    g = torch.Generator().manual_seed(0)
    lengths, keep = [5, 1, 9, 3], [1, 1, 4, 3]
    n = sum(lengths)
    q = torch.randn(n, 4, 8, generator=g)
    k, v = torch.randn(n, 2, 8, generator=g), torch.randn(n, 2, 8, generator=g)
    meta = AttentionMeta.from_lengths(lengths, CPU)
    tail = TailMeta.from_lengths(lengths, keep, CPU)
    assert tail.index.tolist() == [4, 5, 11, 12, 13, 14, 15, 16, 17]
    full = packed_attention(q, k, v, meta, 0.3, window, softcap)
    part = tail_attention(q[tail.index], k, v, meta, tail, 0.3, window, softcap)
    torch.testing.assert_close(part, full[tail.index], rtol=0, atol=1e-6)


def test_heads_read_the_same_rows_with_and_without_the_tail(tiny_llm):
    """LAST, multi-token (a suffix of rows) and CLS sequences in one step; CLS reads row 0, so it keeps all."""
    llm = tiny_llm("qwen3_tied")
    seqs = [Sequence(list(range(10, 30)), Pooling.LAST), Sequence(list(range(40, 52)), (8, 9, 11)),
            Sequence(list(range(60, 67)), Pooling.CLS), Sequence([5], Pooling.LAST)] + [
            Sequence(list(range(100, 160)), Pooling.LAST)]
    with torch.inference_mode():
        step = build_step(seqs, llm.device)
        assert step.tail is not None and step.tail.lengths == [1, 4, 7, 1, 1]
        with _tail(False):
            whole = build_step(seqs, llm.device)
        assert whole.tail is None
        got = llm.model.hidden_states(step).index_select(0, step.row_index)
        want = llm.model.hidden_states(whole).index_select(0, whole.row_index)
    assert got.shape == (7, llm.model.spec.hidden_size)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@contextlib.contextmanager
def _tail(on: bool):
    saved = batch.LAST_LAYER_TAIL
    batch.LAST_LAYER_TAIL = on
    try:
        yield
    finally:
        batch.LAST_LAYER_TAIL = saved


@pytest.mark.parametrize("name", ["llama_gqa_untied", "gemma2", "gemma3"])
def test_answers_are_the_same_with_and_without_the_tail(name, tiny_llm):
    llm = tiny_llm(name)
    labels = ["yes", " definitely not", "maybe so"]  # multi-token labels read a suffix of rows
    tails = []
    llm.runner.observers.append(lambda step: tails.append(step.tail is not None))
    try:
        with_tail = (llm.classify(PROMPTS, labels=labels), llm.next_token(PROMPTS, top_k=3))
        with _tail(False):
            without = (llm.classify(PROMPTS, labels=labels), llm.next_token(PROMPTS, top_k=3))
    finally:
        llm.runner.observers.clear()
    assert tails and all(tails[: len(tails) // 2]) and not any(tails[len(tails) // 2:])
    for a, b in zip(with_tail[0], without[0]):
        assert a.label == b.label
        assert list(a.probs) == list(b.probs)
        assert max(abs(a.probs[k] - b.probs[k]) for k in a.probs) < 1e-5
    for a, b in zip(with_tail[1], without[1]):
        assert [t.token_id for t in a.top_logprobs] == [t.token_id for t in b.top_logprobs]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.top_logprobs, b.top_logprobs)) < 1e-5
