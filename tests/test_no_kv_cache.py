"""No KV cache: nothing per token outlives its layer or its call, and no step exceeds the
token budget (a longer request runs alone, up to max_model_len)."""

from __future__ import annotations

import gc
import re

import numpy as np
import pytest
import torch

from prefillonly import PromptTooLongError

from tiny_models import PROMPTS

N_TOKENS = 37  # a length no weight dimension of the tiny models has


def _prompt_of(llm, n: int) -> list[int]:
    ids = llm.tokenizer(" ".join(["memory"] * 200))["input_ids"]
    return ids[:n]


def _live_tensors_with_dim(n: int) -> list[torch.Tensor]:
    gc.collect()
    found = []
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and n in obj.shape:
                found.append(obj)
        except ReferenceError:
            continue
    return found


def _kv_shaped(t: torch.Tensor, spec) -> bool:
    kv = (spec.num_kv_heads, spec.head_dim)
    return t.dim() >= 3 and (tuple(t.shape[-2:]) == kv or tuple(t.shape[:2]) == (spec.num_kv_heads, N_TOKENS))


@pytest.mark.parametrize("name", ["gemma3", "qwen3_tied"])
def test_nothing_per_token_outlives_a_layer_or_a_call(name, tiny_llm):
    llm = tiny_llm(name)
    spec = llm.model.spec
    ids = _prompt_of(llm, N_TOKENS)
    assert not _live_tensors_with_dim(N_TOKENS)

    per_layer = []

    def before_layer(module, args):
        live = _live_tensors_with_dim(N_TOKENS)
        assert not any(_kv_shaped(t, spec) for t in live), [tuple(t.shape) for t in live]
        per_layer.append(sorted(tuple(t.shape) for t in live))

    hooks = [layer.register_forward_pre_hook(before_layer) for layer in llm.model.model.layers]
    try:
        res = llm.next_token(ids)
        emb = llm.embed(ids, pooling="mean")
    finally:
        for h in hooks:
            h.remove()
    assert res.error is None and emb.error is None
    assert len(per_layer) == 2 * spec.num_layers
    # the same live per-token tensors at every layer after the first (ids, positions, the
    # embedded input and the residual stream): memory does not grow with depth
    L = spec.num_layers
    for call in (per_layer[:L], per_layer[L:]):
        assert all(shapes == call[1] for shapes in call[1:]), per_layer
        assert call[1] == sorted([(N_TOKENS,), (N_TOKENS,), (N_TOKENS, spec.hidden_size), (N_TOKENS, spec.hidden_size)])
    # and nothing of the request is left once the call returns
    assert not _live_tensors_with_dim(N_TOKENS)


@pytest.mark.parametrize("name", ["gemma2", "qwen3_tied", "qwen3_cls3"])
def test_model_holds_no_cache_state(name, tiny_llm):
    llm = tiny_llm(name)
    model = llm.model

    def state():
        params = {n: (tuple(p.shape), p.data_ptr()) for n, p in model.named_parameters()}
        buffers = {n: tuple(b.shape) for n, b in model.named_buffers()}
        return params, buffers

    before = state()
    if model.lm_head is not None:
        llm.next_token(PROMPTS)
        llm.score("query", PROMPTS[:3])
    else:
        llm.classify(PROMPTS)
    llm.embed(PROMPTS)
    assert state() == before
    params, buffers = before
    # the only buffers are rotary inverse frequencies, one per layer
    assert all(re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary\.inv_freq", n) for n in buffers), buffers
    assert len(buffers) == model.spec.num_layers
    cache_like = re.compile(r"cache|past|key_value|kv|k_states|v_states|key_states|value_states", re.I)
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith("_") or value is None or isinstance(value, (bool, int, float, str)):
                continue  # sizes and switches such as kv_size, window, mlp_chunk
            assert not cache_like.search(attr), f"{mod_name}.{attr}"
            assert not isinstance(value, torch.Tensor), f"{mod_name}.{attr} is a tensor outside parameters/buffers"
            assert not (isinstance(value, (list, dict, tuple)) and value), f"{mod_name}.{attr} = {value!r}"


def test_layers_cost_no_memory_per_request(tiny_path, tmp_path):
    """A 2-layer and a 6-layer model leave the same (zero) per-token state after a call."""
    import transformers

    from prefillonly import LLM

    from tiny_models import copy_tokenizer, randomize, qwen3_config

    sizes = {}
    for layers in (2, 6):
        cfg = qwen3_config(True, layers)
        model = transformers.Qwen3ForCausalLM(cfg)
        randomize(model, layers)
        path = tmp_path / f"l{layers}"
        model.save_pretrained(path)
        copy_tokenizer(path)
        llm = LLM(path, dtype="float32", use_tqdm=False)
        peak = []

        def observe(step):
            peak.append(sum(t.numel() for t in _live_tensors_with_dim(N_TOKENS)))

        last = llm.model.model.layers[-1]
        hook = last.register_forward_pre_hook(lambda m, a: observe(None))
        try:
            assert llm.next_token(_prompt_of(llm, N_TOKENS)).error is None
        finally:
            hook.remove()
        sizes[layers] = (peak[0], len(_live_tensors_with_dim(N_TOKENS)))
    assert sizes[2] == sizes[6] and sizes[2][1] == 0, sizes


# -- the token budget -----------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 24, 64])
def test_no_step_exceeds_the_token_budget(budget, tiny_llm):
    llm = tiny_llm("qwen3_tied", max_num_batched_tokens=budget)
    items = PROMPTS * 3
    steps = []
    llm.runner.observers.append(lambda step: steps.append([len(s) for s in step.seqs]))
    try:
        out = llm.classify(items, labels=["very positive", " negative", "no"])
        embs = llm.embed(items)
    finally:
        llm.runner.observers.clear()
    assert all(r.error is None for r in out + embs)
    assert steps
    for lengths in steps:
        assert sum(lengths) <= budget or len(lengths) == 1, (budget, lengths)
    n_seqs = 3 * len(items) + len(items)  # 3 labels with a multi-token one: one sequence per label
    assert sum(len(s) for s in steps) == n_seqs
    if budget == 64:
        assert max(len(s) for s in steps) > 1  # it does pack


def test_request_longer_than_budget_runs_alone_up_to_max_model_len(tiny_path, tiny_llm, hf_ref):
    from prefillonly import LLM

    from hf_reference import assert_topk_matches

    max_len, budget = 96, 16
    llm = LLM(tiny_path("gemma2"), dtype="float32", max_num_batched_tokens=budget, max_model_len=max_len,
              use_tqdm=False)
    ids = _prompt_of(llm, 200)
    steps = []
    llm.runner.observers.append(lambda step: steps.append([len(s) for s in step.seqs]))
    try:
        results = llm.next_token([ids[:max_len], ids[:5], ids[:7], ids[:max_len - 1]], top_k=3)
    finally:
        llm.runner.observers.clear()
    assert sorted(steps) == sorted([[max_len], [max_len - 1], [7, 5]])
    hf = hf_ref("gemma2")
    for r, n in zip(results, [max_len, 5, 7, max_len - 1]):
        assert_topk_matches(r, hf.logprobs(ids[:n])[-1], 3)
    with pytest.raises(PromptTooLongError):
        llm.next_token(ids[: max_len + 1])


def test_results_identical_under_any_budget(tiny_llm):
    """The budget changes only how sequences are grouped, never a number."""
    ref = tiny_llm("gemma3").embed(PROMPTS)
    for budget in (1, 10, 50):
        got = tiny_llm("gemma3", max_num_batched_tokens=budget).embed(PROMPTS)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)
