"""Bad input gets a clear, typed error naming the offending field; a bad item in a list
fails alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from prefillonly import LLM, CheckpointError, InvalidRequestError, PromptTooLongError

from tiny_models import PROMPTS

LONG = " ".join(["alpha beta gamma delta"] * 40)  # ~160 tokens
MAX_LEN = 64


@pytest.fixture(scope="module")
def llm(tiny_llm):
    return tiny_llm("qwen3_tied", max_model_len=MAX_LEN)


def _raises(exc, field, call):
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}"
    assert info.value.field == field, (info.value.field, str(info.value))
    assert str(info.value).startswith(f"{field}: ") and len(info.value.reason) > 10
    return info.value


# -- requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["", "   \n\t"])
def test_empty_prompt(llm, empty):
    _raises(InvalidRequestError, "prompts", lambda: llm.next_token(empty))
    _raises(InvalidRequestError, "prompts", lambda: llm.classify(empty, labels=["a", "b"]))
    _raises(InvalidRequestError, "texts", lambda: llm.embed(empty))
    _raises(InvalidRequestError, "documents", lambda: llm.score("query", empty))
    _raises(InvalidRequestError, "query", lambda: llm.score(empty, "document"))


def test_empty_lists(llm):
    _raises(InvalidRequestError, "prompts", lambda: llm.next_token([]))
    _raises(InvalidRequestError, "labels", lambda: llm.classify("text", labels=[]))
    _raises(InvalidRequestError, "documents", lambda: llm.score("q", []))
    _raises(InvalidRequestError, "documents", lambda: llm.rerank("q", []))


def test_label_that_tokenises_to_nothing(llm):
    err = _raises(InvalidRequestError, "labels[1]", lambda: llm.classify("text", labels=["yes", ""]))
    assert "''" in str(err)
    _raises(InvalidRequestError, "labels", lambda: llm.classify("text", labels=["yes", "yes"]))
    _raises(InvalidRequestError, "labels[1]", lambda: llm.classify("text", labels=["yes", 3]))
    # one label cannot be normalised into a probability
    _raises(InvalidRequestError, "labels", lambda: llm.classify("text", labels=[" yes"]))
    _raises(InvalidRequestError, "labels", lambda: llm.classify("text", labels=["very positive"]))


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda m: m.next_token(123), "prompts"),
        (lambda m: m.next_token(None), "prompts"),
        (lambda m: m.next_token({"text": "hi"}), "prompts"),
        (lambda m: m.classify("hi", labels="yes"), "labels"),
        (lambda m: m.classify("hi", labels=None), "labels"),
        (lambda m: m.next_token("hi", top_k="3"), "top_k"),
        (lambda m: m.next_token("hi", top_k=0), "top_k"),
        (lambda m: m.next_token("hi", top_k=True), "top_k"),
        (lambda m: m.next_token("hi", top_k=10**9), "top_k"),
        (lambda m: m.next_token("hi", truncate=-1), "truncate"),
        (lambda m: m.next_token("hi", truncate=0), "truncate"),
        (lambda m: m.next_token("hi", truncate="5"), "truncate"),
        (lambda m: m.next_token("hi", truncation_side="middle"), "truncation_side"),
        (lambda m: m.score("q", None), "documents"),
        (lambda m: m.score("q", 17), "documents"),
        (lambda m: m.score(None, ["d"]), "query"),
        (lambda m: m.score("q", ["d"], instruction=5), "instruction"),
        (lambda m: m.rerank("q", None), "documents"),
        (lambda m: m.rerank("q", ["a", "b"], top_n=-1), "top_n"),
        (lambda m: m.rerank("q", ["a", "b"], top_n="2"), "top_n"),
        (lambda m: m.embed("hi", dimensions=0), "dimensions"),
        (lambda m: m.embed("hi", dimensions=33), "dimensions"),
        (lambda m: m.embed("hi", dimensions=4.0), "dimensions"),
        (lambda m: m.embed("hi", pooling="max"), "pooling"),
        (lambda m: m.embed("hi", instruction=1), "instruction"),
        (lambda m: m.embed("hi", instruction="x", prompt_name="query"), "instruction"),
        (lambda m: m.embed("hi", prompt_name="query"), "prompt_name"),
        (lambda m: m.next_token([5, 10**9]), "prompts"),
        (lambda m: m.next_token([{"role": "user"}]), "prompts[0].content"),
        (lambda m: m.next_token([{"role": "developer", "content": "hi"}]), "prompts[0].role"),
    ],
)
def test_wrong_argument_types_and_values(llm, call, field):
    with pytest.raises(InvalidRequestError) as info:
        call(llm)
    assert info.value.field == field, str(info.value)


def test_invalid_request_error_is_a_value_error(llm):
    with pytest.raises(ValueError):
        llm.next_token(123)


def test_llm_constructor_arguments(tiny_path):
    path = tiny_path("qwen3_tied")
    _raises(InvalidRequestError, "max_num_batched_tokens", lambda: LLM(path, max_num_batched_tokens=0))
    _raises(InvalidRequestError, "dtype", lambda: LLM(path, dtype="float8"))
    for bad in (0, -3, "64", 1.5):
        _raises(InvalidRequestError, "max_model_len", lambda: LLM(path, max_model_len=bad))


# -- length -------------------------------------------------------------------------------------


def test_over_long_prompt_needs_truncate(llm):
    ids = llm.tokenizer(LONG)["input_ids"]
    assert len(ids) > MAX_LEN
    err = _raises(PromptTooLongError, "prompts", lambda: llm.next_token(LONG))
    assert str(MAX_LEN) in str(err) and "truncate" in str(err)
    _raises(PromptTooLongError, "prompts", lambda: llm.classify(LONG, labels=["a", "b"]))
    _raises(PromptTooLongError, "texts", lambda: llm.embed(LONG))
    _raises(PromptTooLongError, "prompts", lambda: llm.next_token(ids))


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncate_cuts_the_chosen_side(llm, side):
    ids = llm.tokenizer(LONG + " omega")["input_ids"]
    n = 20
    kept = ids[:n] if side == "right" else ids[-n:]
    fed = []
    llm.runner.observers.append(lambda step: fed.append(step.input_ids.tolist()))
    try:
        res = llm.next_token(LONG + " omega", truncate=n, truncation_side=side)
        emb = llm.embed(LONG + " omega", truncate=n, truncation_side=side, pooling="mean")
    finally:
        llm.runner.observers.clear()
    assert fed[0] == kept and fed[1] == kept
    direct = llm.next_token(kept)  # the same ids given directly
    assert res.token_id == direct.token_id and res.logprob == pytest.approx(direct.logprob, abs=1e-6)
    np.testing.assert_allclose(emb.embedding, llm.embed(kept, pooling="mean").embedding, atol=1e-6)
    # truncate larger than max_model_len still fits the model
    assert llm.next_token(LONG, truncate=10_000, truncation_side=side).error is None


def test_truncate_reserves_room_for_multi_token_labels(llm):
    labels = ["very positive", "not sure at all"]  # up to 3 tokens appended after the prompt
    longest = max(len(llm.tokenizer.encode(lab, add_special_tokens=False)) for lab in labels)
    fed = []
    llm.runner.observers.append(lambda step: fed.extend(len(s) for s in step.seqs))
    try:
        res = llm.classify(LONG, labels=labels, truncate=10_000)
    finally:
        llm.runner.observers.clear()
    # the prompt is cut to MAX_LEN - (longest - 1) so that prompt + label[:-1] fits exactly
    assert longest >= 3 and res.error is None and max(fed) == MAX_LEN


# -- a bad item in a list -----------------------------------------------------------------------


def test_bad_items_fail_alone(llm):
    good = [PROMPTS[1], PROMPTS[3], PROMPTS[6]]
    mixed = [good[0], "", LONG, good[1], 42, [], good[2]]
    results = llm.next_token(mixed, top_k=3)
    assert len(results) == len(mixed)
    errors = {i: r.error for i, r in enumerate(results) if r.error}
    assert sorted(errors) == [1, 2, 4, 5]
    assert errors[1].startswith("prompts[1]: ") and "empty" in errors[1]
    assert errors[2].startswith("prompts[2]: ") and str(MAX_LEN) in errors[2]
    assert errors[4].startswith("prompts[4]: ")
    for i in errors:
        assert results[i].token_id is None and results[i].top_logprobs == []
    for i, prompt in zip([0, 3, 6], good):
        alone = llm.next_token(prompt, top_k=3)
        assert [t.token_id for t in results[i].top_logprobs] == [t.token_id for t in alone.top_logprobs]
        np.testing.assert_allclose([t.logprob for t in results[i].top_logprobs],
                                   [t.logprob for t in alone.top_logprobs], atol=1e-5)


def test_bad_items_fail_alone_in_every_task(llm, tiny_llm):
    labels = ["very positive", " negative"]
    cls = llm.classify([PROMPTS[2], "", PROMPTS[4][:100]], labels=labels)
    assert cls[1].error and cls[1].probs == {} and cls[0].error is None and cls[2].error is None
    assert cls[0].probs == pytest.approx(llm.classify(PROMPTS[2], labels=labels).probs, abs=1e-6)
    emb = llm.embed(["a text", "   ", LONG, "another text"])
    assert [e.error is None for e in emb] == [True, False, False, True]
    assert emb[1].embedding is None
    np.testing.assert_allclose(emb[3].embedding, llm.embed("another text").embedding, atol=1e-6)
    llm = tiny_llm("qwen3_tied")  # max_model_len 512: room for the reranker template
    docs = ["Beijing is the capital.", "", 7, "Paris is in France.", LONG * 4]
    scores = llm.score("What is the capital of China?", docs)
    assert [s.error is None for s in scores] == [True, False, False, True, False]
    assert scores[4].error.startswith("documents[4]: ") and "512" in scores[4].error
    assert scores[3].score == pytest.approx(llm.score("What is the capital of China?", docs[3]).score, abs=1e-6)
    ranked = llm.rerank("What is the capital of China?", ["Beijing is the capital.", "", "Paris is in France."])
    assert [r.index for r in ranked][-1] == 1 and ranked[-1].score is None and ranked[-1].error


# -- checkpoints --------------------------------------------------------------------------------


@pytest.fixture
def ckpt_copy(tiny_path, tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_path("llama_gqa_untied"), dest)
    return dest


def _checkpoint_error(path, *needles):
    with pytest.raises(CheckpointError) as info:
        LLM(path, dtype="float32", use_tqdm=False)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return info.value


def test_checkpoint_copy_loads(ckpt_copy):
    assert LLM(ckpt_copy, dtype="float32", use_tqdm=False).next_token("hello").error is None


def test_missing_directory(tmp_path):
    _checkpoint_error(tmp_path / "nope", "nope")
    (tmp_path / "file.bin").write_bytes(b"x")
    _checkpoint_error(tmp_path / "file.bin", "config.json")


def test_missing_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    _checkpoint_error(ckpt_copy, "config.json")


def test_invalid_config_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{not json")
    _checkpoint_error(ckpt_copy, "config.json")


def test_missing_safetensors(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    _checkpoint_error(ckpt_copy, "safetensors")


@pytest.mark.parametrize("how", ["truncated", "garbage_header"])
def test_corrupt_safetensors(ckpt_copy, how):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\xff" * 64 + data[64:])
    _checkpoint_error(ckpt_copy, "model.safetensors")


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "MistralForCausalLM", "BertModel"])
def test_unsupported_architecture(ckpt_copy, arch):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["architectures"] = [arch]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    err = _checkpoint_error(ckpt_copy, arch, "LlamaForCausalLM")
    assert "supported" in str(err)


def test_tensor_with_wrong_shape(ckpt_copy):
    from safetensors.torch import load_file, save_file

    f = ckpt_copy / "model.safetensors"
    tensors = load_file(f)
    key = "model.layers.1.self_attn.k_proj.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, f, metadata={"format": "pt"})
    _checkpoint_error(ckpt_copy, "k_proj", "shape")


def test_config_disagrees_with_tensors(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    _checkpoint_error(ckpt_copy, "shape")


def test_missing_tensor(ckpt_copy):
    from safetensors.torch import load_file, save_file

    f = ckpt_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    _checkpoint_error(ckpt_copy, "missing", "gate_up_proj")


def test_missing_tokenizer(ckpt_copy):
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (ckpt_copy / name).unlink()
    _checkpoint_error(ckpt_copy, "tokenizer")


def test_checkpoint_error_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        LLM(tmp_path / "nope")
