"""Speed options (engine.accel): on CPU the defaults leave the plain float32 path untouched,
explicit requests that cannot be honoured fail clearly, and the fast token-id checks keep
their meaning. The fused CUDA path itself is checked against the plain one on a GPU by
``python -m bench.run --checks`` (bench/checks.py)."""

from __future__ import annotations

import pytest
import torch

from prefillonly import LLM
from prefillonly.errors import InvalidRequestError
from prefillonly.prompts import is_token_ids


def test_cpu_defaults_keep_the_plain_path(tiny_path):
    llm = LLM(tiny_path("qwen3_tied"), dtype="float32", device="cpu", use_tqdm=False)
    assert llm.runner.graphs is None
    for layer in llm.model.model.layers:
        assert layer.fast is None
        assert layer.mlp_chunk is None


@pytest.mark.parametrize("kwargs", [{"fused_kernels": True}, {"cuda_graphs": True}, {"prefill_chunk_size": -1},
                                    {"fused_kernels": "yes"}])
def test_options_that_cannot_run_here_are_refused(tiny_path, kwargs):
    with pytest.raises(InvalidRequestError):
        LLM(tiny_path("qwen3_tied"), dtype="float32", device="cpu", use_tqdm=False, **kwargs)


def test_prefill_chunk_size_on_cpu_chunks_the_plain_mlp_only(tiny_path, tiny_llm):
    chunked = LLM(tiny_path("qwen3_tied"), dtype="float32", device="cpu", use_tqdm=False, prefill_chunk_size=4)
    assert all(layer.mlp_chunk == 4 and layer.fast is None for layer in chunked.model.model.layers)
    prompt = list(range(5, 30))
    a = chunked.next_token(prompt, top_k=3)
    b = tiny_llm("qwen3_tied").next_token(prompt, top_k=3)
    assert a.token_id == b.token_id
    assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_token_id_check_semantics():
    assert is_token_ids([1, 2, 3])
    assert not is_token_ids([1, True, 3])
    assert not is_token_ids([1, 2.0])
    assert not is_token_ids([])
    assert not is_token_ids("abc")


def test_out_of_vocabulary_ids_are_still_named(tiny_llm):
    llm = tiny_llm("qwen3_tied")
    with pytest.raises(InvalidRequestError, match="-1"):
        llm.next_token([5, -1, 7])


def test_cuda_graphs_only_where_attention_reads_offsets_on_the_device(tiny_llm):
    """A captured graph keeps the host's sequence lengths from its capture, so graphs are refused where
    attention takes the portable path (float32, soft-capping): on a GPU those replays gave wrong results."""
    from prefillonly.engine import accel
    from prefillonly.models import attention, fastpath

    qwen, gemma2 = tiny_llm("qwen3_tied").model, tiny_llm("gemma2").model
    assert "torch.float32" in accel.graph_blocker(qwen, torch.float32)
    assert "soft-capped" in accel.graph_blocker(gemma2, torch.bfloat16)
    half = accel.graph_blocker(qwen, torch.bfloat16)
    assert (half is None) == (attention._VARLEN is not None)
    # graph steps stay below the fused multi-sequence kernel, whose tile list is built on the host
    assert accel.GRAPH_MAX_TOKENS <= fastpath.MULTI_MIN_TOKENS
