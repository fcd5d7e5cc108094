"""Vision-language score/rerank/embed with ``truncate``: only the document's (or the input's) text
is cut, the template, instruction, query and every image stay whole; bad documents fail alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TEST_DEVICE

from prefillonly import LLM, InvalidRequestError, PromptTooLongError

from .vlm_helpers import rand_image

LONG_TEXT = " ".join(f"Sentence {i} is about rivers, mountains and lakes." for i in range(60))
QUERY = "Which sentence mentions rivers?"
IMG = rand_image(80, 60, 31)
PAD = "<|image_pad|>"


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("qwen2_5_vl"), dtype="float32", device=TEST_DEVICE, use_tqdm=False)


@pytest.fixture(scope="module")
def jina(checkpoint, tmp_path_factory):
    """The tiny Qwen2-VL checkpoint as a JinaVLForRanking (a random two-layer score head)."""
    path = tmp_path_factory.mktemp("jina_trunc") / "jina"
    shutil.copytree(checkpoint("qwen2_vl"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["JinaVLForRanking"]
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    tensors.update({"score.0.weight": torch.randn(64, 64, generator=g) * 0.3, "score.0.bias": torch.zeros(64),
                    "score.2.weight": torch.randn(1, 64, generator=g) * 0.3, "score.2.bias": torch.zeros(1)})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return LLM(path, dtype="float32", device=TEST_DEVICE, use_tqdm=False)


def _fed(llm, call):
    """(call's result, the token ids of every sequence the model was fed, in input order of steps)."""
    seen: list[list[int]] = []

    def observe(step):
        seen.extend(list(s.token_ids) for s in step.seqs)

    llm.runner.observers.append(observe)
    try:
        return call(), seen
    finally:
        llm.runner.observers.remove(observe)


def _split(text: str, marker: str, end: str) -> tuple[str, str, str]:
    """(before the document, the document text, after it) of a decoded prompt."""
    before, rest = text.split(marker, 1)
    doc, after = rest.split(end, 1)
    return before, doc, after


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("with_image", [False, True])
def test_qwen_vl_score_cuts_only_the_document_text(llm, side, with_image):
    tok = llm.tokenizer
    doc = {"text": LONG_TEXT, "image": IMG} if with_image else LONG_TEXT
    full, (full_ids,) = _fed(llm, lambda: llm.score({"text": QUERY, "image": IMG}, doc))
    n = 200 if with_image else 120
    assert full.error is None and len(full_ids) > n + 100
    res, (ids,) = _fed(llm, lambda: llm.score({"text": QUERY, "image": IMG}, doc, truncate=n, truncation_side=side))
    assert res.error is None and n - 2 <= len(ids) <= n
    before, kept, after = _split(tok.decode(ids), "\n<Document>:", "<|im_end|>")
    full_before, _, full_after = _split(tok.decode(full_ids), "\n<Document>:", "<|im_end|>")
    assert before == full_before and f"<Query>:<|vision_start|>{PAD}" in before and before.endswith(QUERY)
    assert after == full_after
    assert ids.count(llm.model.info.image_token_id) == full_ids.count(llm.model.info.image_token_id)
    if with_image:
        assert kept.startswith(f"<|vision_start|>{PAD}") and kept.count("<|vision_end|>") == 1
        kept = kept.split("<|vision_end|>")[1]
    assert 20 < len(kept) < len(LONG_TEXT) / 2
    assert LONG_TEXT.startswith(kept) if side == "right" else LONG_TEXT.endswith(kept)


def test_qwen_vl_truncate_too_small_and_bad_documents(llm):
    docs = [LONG_TEXT, 7, "", {"image": IMG}, {"txt": "typo"}, "short document"]
    out = llm.score(QUERY, docs, truncate=100)
    assert out[0].error is None and out[5].error is None and out[3].error is None
    assert out[1].error == "documents[1]: expected a string, an image, or a {'text', 'image'} dict; got int"
    assert out[2].error == "documents[2]: document is empty"
    assert out[4].error.startswith("documents[4]: unknown keys ['txt']")
    ranked = llm.rerank(QUERY, docs, truncate=100)
    assert {r.index for r in ranked[-3:]} == {1, 2, 4} and all(r.score is None for r in ranked[-3:])
    with pytest.raises(InvalidRequestError) as e:
        llm.score(QUERY, LONG_TEXT, truncate=30)
    assert e.value.field == "documents" and e.value.reason.startswith("truncate=30 leaves no room for the document")
    with pytest.raises(PromptTooLongError) as e:  # no truncate: refused, not cut
        llm.score(QUERY, LONG_TEXT * 8)
    assert "max_model_len=4096" in str(e.value) and "truncate" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        llm.rerank(QUERY, 3.5)
    assert e.value.field == "documents"


@pytest.mark.parametrize("side", ["right", "left"])
def test_jina_keeps_the_query_after_a_cut_document(jina, side):
    tok = jina.tokenizer
    full, (full_ids,) = _fed(jina, lambda: jina.score(QUERY, LONG_TEXT))
    res, (ids,) = _fed(jina, lambda: jina.score(QUERY, LONG_TEXT, truncate=80, truncation_side=side))
    assert full.error is None and res.error is None and len(full_ids) > 300 and 78 <= len(ids) <= 80
    assert ids[-1] == 100 and full_ids[-1] == 100
    before, kept, after = _split(tok.decode(ids[:-1]), "**Document**:\n", "\n**Query**:\n")
    assert before == "" and after == QUERY
    assert LONG_TEXT.startswith(kept) if side == "right" else LONG_TEXT.endswith(kept)
    assert 100 < len(kept) < len(LONG_TEXT) / 2
    assert res.score != pytest.approx(full.score, abs=1e-9)


def test_vl_embed_truncate_keeps_the_instruction(llm):
    tok = llm.tokenizer
    instruction = "Represent the user's input for retrieval of river facts."
    full, (full_ids,) = _fed(llm, lambda: llm.embed(LONG_TEXT, instruction=instruction))
    res, (ids,) = _fed(llm, lambda: llm.embed(LONG_TEXT, instruction=instruction, truncate=64, truncation_side="left"))
    assert full.error is None and res.error is None and len(full_ids) > 600 and 62 <= len(ids) <= 64
    before, kept, after = _split(tok.decode(ids), "<|im_start|>user\n", "<|im_end|>")
    assert before == f"<|im_start|>system\n{instruction}<|im_end|>\n" and after == "\n<|im_start|>assistant\n"
    assert LONG_TEXT.endswith(kept) and 40 < len(kept) < len(LONG_TEXT) / 4
    out = llm.embed([LONG_TEXT, 7, [1, 2, 3]], instruction=instruction, truncate=10)  # ids: the system turn is theirs
    assert out[0].error == ("texts[0]: truncate=10 leaves no room for the text: the rest of the prompt (template, "
                            "instruction, query, images) takes 24 tokens; pass truncate > 24")
    assert out[1].error.startswith("texts[1]: expected a string, an image")
    assert out[2].error is None and out[2].embedding.shape == (64,)
