"""The public API's contracts: input order, single vs list input, rerank, embedding
dimensions, instructions and prompts, sentence-transformers pooling config, progress bar."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from prefillonly import (LLM, ClassifyResult, EmbedResult, InvalidRequestError, NextTokenResult, RerankResult,
                         ScoreResult)

from tiny_models import PROMPTS
from hf_reference import COS_TOL, cosine, normalized, ref_ids

QUERY = "What is the capital of China?"
DOCS = [
    "Gravity is a force that attracts two bodies towards each other.",
    "The capital of China is Beijing.",
    "Beijing is a large city in the north of China and it is the capital.",
    "Bananas are yellow.",
    "China's capital city, Beijing, hosted the 2008 Olympics.",
]


# -- order and shape of results ---------------------------------------------------------------


def test_results_come_back_in_input_order(tiny_llm):
    llm = tiny_llm("gemma2", max_num_batched_tokens=40)
    items = PROMPTS * 3
    random.Random(0).shuffle(items)
    alone = {p: llm.next_token(p, top_k=2) for p in PROMPTS}
    got = llm.next_token(items, top_k=2)
    assert len(got) == len(items)
    for p, r in zip(items, got):
        assert r.token_id == alone[p].token_id
        assert r.logprob == pytest.approx(alone[p].logprob, abs=1e-5)
    # and the ids each result describes are its own prompt's (lengths differ, so the scheduler reorders)
    embs = llm.embed(items)
    for p, e in zip(items, embs):
        np.testing.assert_allclose(e.embedding, llm.embed(p).embedding, atol=1e-5)


def test_single_and_list_inputs(tiny_llm):
    llm = tiny_llm("qwen3_tied")
    ids = llm.tokenizer("hello there, how are you")["input_ids"]
    chat = [{"role": "user", "content": "hello there"}]
    cases = [
        ("hello", NextTokenResult),
        (ids, NextTokenResult),  # one prompt given as token ids
        (chat, NextTokenResult),  # one prompt given as chat messages
    ]
    for prompt, cls in cases:
        single = llm.next_token(prompt)
        listed = llm.next_token([prompt])
        assert isinstance(single, cls) and isinstance(listed, list) and len(listed) == 1
        assert listed[0].token_id == single.token_id
        assert listed[0].logprob == pytest.approx(single.logprob, abs=1e-6)
    # token ids and text give the same answer
    assert llm.next_token(ids).top_logprobs[0].token_id == llm.next_token("hello there, how are you").token_id
    # a list of chats, a list of id lists, a tuple
    assert len(llm.next_token([chat, chat])) == 2
    assert len(llm.next_token([ids, ids[:3]])) == 2
    assert len(llm.next_token(("a", "b", "c"))) == 3
    assert isinstance(llm.classify("x", labels=["a", "b"]), ClassifyResult)
    assert isinstance(llm.score(QUERY, "doc"), ScoreResult)
    assert isinstance(llm.score(QUERY, ["doc"]), list)
    assert isinstance(llm.embed("x"), EmbedResult) and isinstance(llm.embed(["x"])[0], EmbedResult)
    # a single bad item raises; the same item in a list reports
    with pytest.raises(InvalidRequestError):
        llm.embed(" ")
    assert llm.embed([" "])[0].error.startswith("texts[0]: ")


def test_next_token_result_fields(tiny_llm):
    llm = tiny_llm("llama_gqa_untied")
    r = llm.next_token(PROMPTS[2], top_k=7)
    vals = [t.logprob for t in r.top_logprobs]
    assert len(vals) == 7 and vals == sorted(vals, reverse=True) and all(v <= 0 for v in vals)
    assert r.token_id == r.top_logprobs[0].token_id and r.logprob == vals[0]
    assert all(t.token == llm.tokenizer.decode([t.token_id]) for t in r.top_logprobs)
    assert llm.next_token(PROMPTS[2], top_k=1).token_id == r.token_id


# -- rerank ------------------------------------------------------------------------------------


def test_rerank_orders_by_score(tiny_llm):
    llm = tiny_llm("qwen3_untied")
    scores = [s.score for s in llm.score(QUERY, DOCS)]
    assert len(set(scores)) == len(DOCS)
    ranked = llm.rerank(QUERY, DOCS)
    assert all(isinstance(r, RerankResult) for r in ranked)
    assert [r.index for r in ranked] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    for r in ranked:
        assert r.score == pytest.approx(scores[r.index], abs=1e-6) and r.document == DOCS[r.index] and r.error is None


@pytest.mark.parametrize("top_n, expected", [(None, 5), (2, 2), (1, 1), (5, 5), (50, 5)])
def test_rerank_top_n(tiny_llm, top_n, expected):
    llm = tiny_llm("qwen3_untied")
    full = llm.rerank(QUERY, DOCS)
    got = llm.rerank(QUERY, DOCS, top_n=top_n)
    assert len(got) == expected
    assert [r.index for r in got] == [r.index for r in full[:expected]]


def test_rerank_single_document_and_instruction(tiny_llm):
    llm = tiny_llm("qwen3_untied")
    (only,) = llm.rerank(QUERY, DOCS[1])
    assert only.index == 0 and only.score == pytest.approx(llm.score(QUERY, DOCS[1]).score, abs=1e-6)
    instr = "Find passages that mention fruit"
    with_instr = llm.rerank(QUERY, DOCS, instruction=instr)
    scores = [s.score for s in llm.score(QUERY, DOCS, instruction=instr)]
    assert [r.index for r in with_instr] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    assert scores != [s.score for s in llm.score(QUERY, DOCS)]


# -- embeddings --------------------------------------------------------------------------------


def test_embed_dimensions_truncate_then_normalize(tiny_llm, hf_ref):
    name = "qwen3_backbone"
    llm, hf = tiny_llm(name), hf_ref(name)
    raw = llm.embed(PROMPTS[3], normalize=False).embedding
    h = hf.hidden(ref_ids(llm.tokenizer, PROMPTS[3]))[-1]
    np.testing.assert_allclose(raw, h.numpy(), atol=1e-4)  # unnormalised: the hidden state itself
    assert abs(np.linalg.norm(raw) - 1.0) > 0.1
    for d in (1, 8, 16, 31, 32):
        e = llm.embed(PROMPTS[3], dimensions=d).embedding
        assert e.shape == (d,)
        assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-5)
        assert cosine(e, normalized(h[:d])) >= COS_TOL
        np.testing.assert_allclose(e, raw[:d] / np.linalg.norm(raw[:d]), atol=1e-5)
        un = llm.embed(PROMPTS[3], dimensions=d, normalize=False).embedding
        np.testing.assert_allclose(un, raw[:d], atol=1e-6)


def test_embed_instruction_prefix(tiny_llm, hf_ref):
    """Qwen3-Embedding queries: f"Instruct: {task}\\nQuery:{query}"."""
    name = "qwen3_backbone"
    llm, hf = tiny_llm(name), hf_ref(name)
    task = "Given a web search query, retrieve relevant passages that answer the query"
    queries = ["What is the capital of China?", "Explain gravity"]
    got = llm.embed(queries, instruction=task)
    for q, e in zip(queries, got):
        text = f"Instruct: {task}\nQuery:{q}"
        ref = normalized(hf.hidden(llm.tokenizer(text)["input_ids"])[-1])
        assert cosine(e.embedding, ref) >= COS_TOL
        plain = llm.embed(q).embedding
        assert cosine(e.embedding, plain) < 0.999  # the instruction matters


def _with_st_files(src, dest, pooling: str | None, prompts: dict | None = None):
    shutil.copytree(src, dest)
    if pooling is not None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (dest / "modules.json").write_text(json.dumps(modules))
        (dest / "1_Pooling").mkdir()
        cfg = {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
               "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": pooling == "last", "include_prompt": True}
        (dest / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    if prompts is not None:
        (dest / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}))
    return dest


@pytest.mark.parametrize("pooling", ["mean", "last", "cls", None])
def test_pooling_from_sentence_transformers_config(pooling, tiny_path, tmp_path, hf_ref):
    name = "qwen3_backbone"
    path = _with_st_files(tiny_path(name), tmp_path / "st", pooling)
    llm = LLM(path, dtype="float32", use_tqdm=False)
    hf = hf_ref(name)
    for p in PROMPTS[1:4]:
        h = hf.hidden(ref_ids(llm.tokenizer, p))
        want = {"mean": h.mean(0), "last": h[-1], "cls": h[0], None: h[-1]}[pooling]  # LAST by default
        e = llm.embed(p).embedding
        assert cosine(e, normalized(want)) >= COS_TOL
        # an explicit pooling argument overrides the file
        assert cosine(llm.embed(p, pooling="mean").embedding, normalized(h.mean(0))) >= COS_TOL


def test_prompt_name_from_sentence_transformers_config(tiny_path, tmp_path):
    task = "Given a web search query, retrieve relevant passages that answer the query"
    prompts = {"query": f"Instruct: {task}\nQuery:", "document": ""}
    path = _with_st_files(tiny_path("qwen3_backbone"), tmp_path / "st", "last", prompts)
    llm = LLM(path, dtype="float32", use_tqdm=False)
    q = "What is the capital of China?"
    by_name = llm.embed(q, prompt_name="query").embedding
    np.testing.assert_allclose(by_name, llm.embed(q, instruction=task).embedding, atol=1e-6)
    np.testing.assert_allclose(by_name, llm.embed(prompts["query"] + q).embedding, atol=1e-6)
    np.testing.assert_allclose(llm.embed(q, prompt_name="document").embedding, llm.embed(q).embedding, atol=1e-6)
    with pytest.raises(InvalidRequestError) as e:
        llm.embed(q, prompt_name="passage")
    assert e.value.field == "prompt_name" and "query" in str(e.value)


def test_embed_of_causal_and_classifier_checkpoints_use_the_backbone(tiny_llm, hf_ref):
    """embed() on a CausalLM or a classifier reads the final-normed hidden states, not logits."""
    for name in ("gemma2", "qwen3_cls3"):
        llm, hf = tiny_llm(name), hf_ref(name)
        e = llm.embed(PROMPTS[4], normalize=False).embedding
        h = hf.hidden(ref_ids(llm.tokenizer, PROMPTS[4]))[-1]
        np.testing.assert_allclose(e, h.numpy(), atol=1e-4)


# -- progress bar ------------------------------------------------------------------------------


def test_progress_bar_can_be_switched_off(tiny_path, capfd):
    path = tiny_path("llama_gqa_untied")
    quiet = LLM(path, dtype="float32", use_tqdm=False)
    capfd.readouterr()
    quiet.next_token(PROMPTS)
    quiet.embed(PROMPTS)
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""
    quiet.next_token(PROMPTS, use_tqdm=True)  # per-call override
    assert "next_token" in capfd.readouterr().err

    loud = LLM(path, dtype="float32")  # on by default
    capfd.readouterr()
    loud.classify(PROMPTS, labels=["a", "b"])
    assert "classify" in capfd.readouterr().err
    loud.classify(PROMPTS, labels=["a", "b"], use_tqdm=False)
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""


def test_dtype_and_device_options(tiny_path):
    path = tiny_path("qwen3_tied")
    llm = LLM(path, dtype=torch.float32, device="cpu", use_tqdm=False)
    assert llm.dtype == torch.float32 and llm.device.type == "cpu"
    assert all(p.dtype == torch.float32 for p in llm.model.parameters())
    auto = LLM(path, use_tqdm=False)  # "auto": the checkpoint's dtype (float32 here)
    assert auto.dtype == torch.float32
    bf = LLM(path, dtype="bfloat16", use_tqdm=False)
    assert all(p.dtype == torch.bfloat16 for p in bf.model.parameters())
    a, b = llm.next_token(PROMPTS[4], top_k=5), bf.next_token(PROMPTS[4], top_k=5)
    assert a.token_id in [t.token_id for t in b.top_logprobs]  # bf16 is close, not exact
    assert llm.max_model_len == 512 and LLM(path, max_model_len=100, use_tqdm=False).max_model_len == 100
